"""Images whose decode is not a plain `Image.open(...).convert("RGB")`, and inputs of every
format, through one real run and `dr-gen export --format datacompdr`, read back as MobileCLIP's
loader reads them (webdataset decode("pilrgba"), then convert("RGB"), then the reference replay).

One job over three shards: a DataComp-style webdataset tar (json uid), a DataComp-style parquet
(uid and key columns) and an img2dataset parquet (key, no uid)."""

import hashlib
import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from dr_pipeline.core.records import ViewParams
from dr_pipeline.views.augment import render_view
from dr_pipeline.cli import app
from dr_pipeline.core.config import parse_job
from dr_pipeline.views.decode import decode_image
from dr_pipeline.views.fidelity import reference_view, view_difference
from dr_pipeline.read.reader import open_dataset
from dr_pipeline.read.replay import dataset_job
from dr_pipeline.execution.runner import run_job
from dr_pipeline.core.schema import sample_uid

MEAN_ABS_BOUND = 0.5


def _encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _gradient(width: int, height: int) -> np.ndarray:
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(255, 0, height)[:, None].repeat(width, 1)
    return np.stack([x, y, (x + y) / 2], axis=2).astype(np.uint8)


def fixture_images() -> dict[str, bytes]:
    """name -> encoded bytes, one of each decode case of decode.py's rule."""
    rgba = np.zeros((60, 90, 4), np.uint8)
    rgba[..., :3] = _gradient(90, 60) // 4  # dark colours under a transparent background
    rgba[15:45, 20:70, 3] = 255
    rgba[15:45, 20:70, :3] = (200, 40, 90)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: upright is rotated 90 degrees clockwise
    palette = Image.fromarray(_gradient(70, 50)).quantize(16)
    palette_pixels = np.array(palette)
    palette_pixels[:, :20] = 0
    palette = Image.fromarray(palette_pixels, mode="P")
    palette.putpalette(Image.fromarray(_gradient(70, 50)).quantize(16).getpalette())
    grey16 = Image.fromarray((np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16))
    cmyk = Image.fromarray(_gradient(72, 56)).convert("CMYK")
    frames = [Image.new("P", (66, 44), colour) for colour in (3, 9)]
    for frame, rgb in zip(frames, ((10, 200, 30), (250, 250, 0))):
        frame.putpalette(list(rgb) * 256)
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        "rgba": _encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "exif": _encode(Image.fromarray(_gradient(80, 52)), "JPEG", quality=95, exif=exif),
        "palette": _encode(palette, "PNG", transparency=0),
        "grey16": _encode(grey16, "PNG"),
        "cmyk": _encode(cmyk, "JPEG", quality=95),
        "gif": buffer.getvalue(),
        "plain": _encode(Image.fromarray(_gradient(64, 64)), "JPEG", quality=90),
    }


DATACOMP_UID = {name: hashlib.md5(name.encode()).hexdigest() for name in ("rgba", "exif", "palette", "grey16", "cmyk")}
# image kinds the export writes as their decoded PNG (a plain decode sees other pixels, or the loader
# does not read the format); CMYK converts the same both ways and a plain JPEG is plain.
NORMALISED = {"rgba", "exif", "palette", "grey16", "gif"}


def _tar(samples: list[tuple[str, str, bytes, dict]]) -> bytes:
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, encoder=False, mtime=0) as tar:
        for key, suffix, image, meta in samples:
            tar.write({"__key__": key, suffix: image, "txt": f"a picture of {key}".encode(), "json": json.dumps(meta).encode()})
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decode_inputs")
    images = fixture_images()
    (folder / "datacomp.tar").write_bytes(_tar([
        (name, "png" if name != "exif" else "jpg", images[name], {"uid": DATACOMP_UID[name], "key": f"00000{i}"})
        for i, name in enumerate(("rgba", "exif", "palette"))
    ]))
    pq.write_table(pa.table({
        "key": ["000100", "000101"], "uid": [DATACOMP_UID["grey16"], DATACOMP_UID["cmyk"]],
        "caption": ["grey ramp", "cmyk ramp"], "jpg": [images["grey16"], images["cmyk"]],
    }), folder / "datacomp.parquet")
    pq.write_table(pa.table({
        "key": ["000200", "000201"], "caption": ["two frames", "a plain jpeg"],
        "url": ["https://example.org/a.gif", "https://example.org/b.jpg"], "jpg": [images["gif"], images["plain"]],
    }), folder / "img2dataset.parquet")
    names = {"000200": "gif", "000201": "plain", "000100": "grey16", "000101": "cmyk"}
    names.update({DATACOMP_UID[name]: name for name in ("rgba", "exif", "palette")})  # a tar's json uid is its key
    return [str(folder / f) for f in ("datacomp.tar", "datacomp.parquet", "img2dataset.parquet")], images, names


@pytest.fixture(scope="module")
def exported(shards, small_job_dict, tmp_path_factory):
    urls, _, _ = shards
    root = tmp_path_factory.mktemp("decode_run")
    job = parse_job(small_job_dict(
        urls, root / "out", augmentation={"num_views": 6, "horizontal_flip": {"p": 0.0}, "random_erasing": {"p": 0.0}},
    ))
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2, log_to_driver=False)
    try:
        run_job(job)
    finally:
        if started_here:
            ray.shutdown()
    result = CliRunner().invoke(app, ["export", job.output.url, str(root / "export"), "--format", "datacompdr"])
    assert result.exit_code == 0, result.stderr
    return open_dataset(job.output.url), root / "export", result.stdout


def _loader_samples(folder):
    """MobileCLIP's loader steps: tar samples, decode("pilrgba"), rename, then .convert('RGB')."""
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(sorted(str(t) for t in folder.glob("*.tar"))),
        wds.tarfile_to_samples(),
        wds.decode("pilrgba"),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
    )
    return {sample["__key__"]: sample for sample in pipeline}


def test_uid_follows_one_rule_across_input_formats(shards, exported):
    _, images, names = shards
    dataset, folder, _ = exported
    rows = {row["source_key"]: row for row in dataset.iter_samples()}
    assert set(rows) == set(names)
    for source_key, row in rows.items():
        name = names[source_key]
        expected = DATACOMP_UID.get(name) or sample_uid(None, source_key, hashlib.sha256(images[name]).hexdigest())
        assert row["uid"] == expected, name
    assert rows["000100"]["uid"] == DATACOMP_UID["grey16"]  # the parquet's uid column, not its key column
    assert re.fullmatch("[0-9a-f]{32}", rows["000200"]["uid"])
    for key, sample in _loader_samples(folder).items():
        assert sample["json"]["uid"] == next(r["uid"] for r in rows.values() if r["key"] == key)


def test_export_gives_the_loader_the_pixels_the_teachers_saw(shards, exported):
    _, images, names = shards
    dataset, folder, stdout = exported
    job_augmentation = dataset_job(dataset).augmentation
    size = job_augmentation.random_resized_crop.size
    rows = {row["key"]: row for row in dataset.iter_samples()}
    samples = _loader_samples(folder)
    assert set(samples) == set(rows)  # every sample has an image member the loader reads
    normalised = {names[rows[key]["source_key"]] for key, s in samples.items() if s["json"].get("normalised_image")}
    assert normalised == NORMALISED
    assert f"{len(NORMALISED)} images written as their decoded PNG" in " ".join(stdout.split())
    worst = 0.0
    for key, sample in samples.items():
        row = rows[key]
        name = names[row["source_key"]]
        picture = sample["image"].convert("RGB")
        teachers_saw = decode_image(images[name], 10**8)
        assert picture.size == (teachers_saw.shape[2], teachers_saw.shape[1]) == (row["image_width"], row["image_height"])
        for entry, stored in zip(sample["paug.json"]["param_aug"], row["aug"]):
            (top, left, height, width), ops = entry
            assert top + height <= picture.height and left + width <= picture.width, name
            params = ViewParams((top, left, height, width), False, None if ops is None else tuple(map(tuple, ops)), None)
            assert params == stored
            view = reference_view(picture, params, job_augmentation)
            mean, _ = view_difference(view, render_view(teachers_saw, stored, size, job_augmentation))
            worst = max(worst, mean)
            assert mean <= MEAN_ABS_BOUND, (name, mean)
    assert worst == 0.0  # the export and the renderer are exact; the bound leaves room for other builds


def test_plain_decode_of_the_originals_would_not_match(shards):
    """What the export guards against: the loader on the original bytes sees other pixels."""
    _, images, _ = shards
    for name in NORMALISED - {"gif"}:
        plain = np.asarray(Image.open(io.BytesIO(images[name])).convert("RGBA").convert("RGB"))
        ours = decode_image(images[name], 10**8).permute(1, 2, 0).numpy()
        assert plain.shape != ours.shape or np.abs(plain.astype(int) - ours).mean() > 5, name
