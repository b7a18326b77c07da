"""Bad input, end to end: every broken file and odd sample a crawl produces, through a real run,
each with its documented outcome (RELIABILITY.md); and the same job under another worker
layout, which must write the same dataset.

One input of 6 shards (4 tars, 2 parquet files) holds every case; two runs read it in one
Ray session: `reference` (1 actor, 1 CPU worker, batches of 4) and `rearranged` (2 actors,
2 CPU workers, batches of 3, one batch in flight).
"""

import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from dr_pipeline.cli import app

from dr_pipeline.core.config import parse_job
from dr_pipeline.read.reader import open_dataset
from dr_pipeline.execution.runner import run_job
from dr_pipeline.core.schema import KEY_PATTERN
from dr_pipeline.tools.validate import validate_dataset
from teachers import build_teacher

pytestmark = pytest.mark.usefixtures("local_ray")
MAX_PIXELS = 100_000
LONG_CAPTION = " ".join(f"word{i}" for i in range(3000))
KEPT = "kept"


@dataclass(frozen=True)
class Case:
    """One bad input: the source key it carries and its outcome (a failure reason, or KEPT)."""

    key: str
    outcome: str


CASES = {
    "corrupt_jpeg": Case("corrupt_jpeg", "undecodable_image"),
    "corrupt_png": Case("corrupt_png", "undecodable_image"),
    "corrupt_webp": Case("corrupt_webp", "undecodable_image"),
    "truncated_jpeg": Case("truncated_jpeg", "undecodable_image"),
    "truncated_png": Case("truncated_png", "undecodable_image"),
    "truncated_webp": Case("truncated_webp", "undecodable_image"),
    "no_image": Case("no_image", "missing_image"),
    "no_text": Case("no_text", "missing_text"),
    "whitespace_text": Case("whitespace_text", "empty_text"),
    "duplicate_key_in_shard": Case("twice", "duplicate_key"),
    "cmyk_jpeg": Case("cmyk", KEPT),
    "la_png": Case("grey_alpha", KEPT),
    "palette_png": Case("palette", KEPT),
    "png_16_bit": Case("grey16", KEPT),
    "exif_rotated_jpeg": Case("rotated", KEPT),
    "one_pixel": Case("one_pixel", KEPT),
    "over_pixel_limit": Case("huge", "image_too_large"),
    "non_utf8_caption": Case("latin1", KEPT),
    "long_caption": Case("long", KEPT),
    "unsafe_key": Case("../../etc/passwd x?*", KEPT),
    "truncated_tar": Case("cut_here", "truncated_shard"),
    "parquet_missing_columns": Case("f_no_columns.parquet#unreadable", "unreadable_shard"),
    "parquet_null_image": Case("null_image", "missing_image"),
    "parquet_null_text": Case("null_text", "missing_text"),
    "duplicate_key_across_shards": Case("good", KEPT),
    "empty_tar": Case("", KEPT),  # no sample: a committed unit of 0 samples and 0 failures
    "symlink_image": Case("linked", "missing_image"),  # its detail says it is a link (test below)
}


def _encoded(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _photo(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    return _encoded(_photo(40, 24, seed=5), "JPEG", exif=exif)


def _members(key: str, image: tuple[str, bytes] | None, text: bytes | None, meta: dict | None = None):
    members = [(f"{key}.json", json.dumps(meta or {"key": key}).encode())]
    if image is not None:
        members.append((f"{key}.{image[0]}", image[1]))
    if text is not None:
        members.append((f"{key}.txt", text))
    return members


def _write_tar(path, members) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _write_shards(folder) -> list[str]:
    jpeg, png, webp = (_encoded(_photo(seed=1), f) for f in ("JPEG", "PNG", "WEBP"))
    noise = np.random.default_rng(9).bytes(400)
    grey16 = Image.fromarray((np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21))
    palette = _photo(seed=3).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    samples = [
        ("good", ("jpg", jpeg), b"A good photo."),
        ("corrupt_jpeg", ("jpg", jpeg[:4] + noise), b"Noise after a JPEG header."),
        ("corrupt_png", ("png", png[:8] + noise), b"Noise after a PNG signature."),
        ("corrupt_webp", ("webp", webp[:12] + noise), b"Noise after a WebP header."),
        ("truncated_jpeg", ("jpg", jpeg[: len(jpeg) // 2]), b"Half a JPEG."),
        ("truncated_png", ("png", png[: len(png) // 2]), b"Half a PNG."),
        ("truncated_webp", ("webp", webp[: len(webp) // 2]), b"Half a WebP."),
        ("no_image", None, b"A caption without its image."),
        ("no_text", ("jpg", jpeg), None),
        ("whitespace_text", ("jpg", jpeg), b" \n\t "),
        ("twice", ("jpg", jpeg), b"The first sample with this key."),
        ("twice", ("png", png), b"The second sample with this key."),
        ("cmyk", ("jpg", _encoded(_photo(seed=2).convert("CMYK"), "JPEG")), b"A CMYK JPEG."),
        ("grey_alpha", ("png", _encoded(_photo(seed=4).convert("LA"), "PNG")), b"Grey with alpha."),
        ("palette", ("png", _encoded(palette, "PNG")), b"A palette PNG with a transparent colour."),
        ("grey16", ("png", _encoded(grey16, "PNG")), b"A 16-bit grey PNG."),
        ("rotated", ("jpg", _rotated_jpeg()), b"A JPEG whose EXIF says rotate."),
        ("one_pixel", ("png", _encoded(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG")), b"One red pixel."),
        ("huge", ("png", _encoded(Image.new("RGB", (400, 300)), "PNG")), b"More pixels than allowed."),
        ("latin1", ("jpg", jpeg), "Caf\u00e9 au lait.".encode("latin-1")),
        ("long", ("jpg", jpeg), LONG_CAPTION.encode()),
    ]
    members = [m for key, image, text in samples for m in _members(key, image, text)]
    members += _members("unsafe", ("jpg", jpeg), b"A key unsafe as a file name.", {"key": CASES["unsafe_key"].key})
    paths = {name: str(folder / name) for name in ("a_mixed.tar", "b_cut.tar", "c_empty.tar", "d_again.tar",
                                                     "e_nulls.parquet", "f_no_columns.parquet")}
    _write_tar(paths["a_mixed.tar"], members)
    with tarfile.open(paths["a_mixed.tar"], "a") as tar:  # a sample whose image member is a symbolic link
        link = tarfile.TarInfo("linked.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        for name, data in _members("linked", None, b"An image that is a link."):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.addfile(link)
    _write_tar(folder / "whole.tar", _members("before_cut", ("jpg", jpeg), b"Complete.")
               + _members("cut_here", ("jpg", jpeg), b"Cut inside its image."))
    whole = (folder / "whole.tar").read_bytes()
    (folder / "b_cut.tar").write_bytes(whole[: whole.index(jpeg[:64], whole.index(b"cut_here.jpg")) + 100])
    _write_tar(paths["c_empty.tar"], [])
    _write_tar(paths["d_again.tar"], _members("good", ("png", png), b"Another sample under an existing key."))
    table = pa.table({"key": ["null_image", "null_text", "parquet_good"], "jpg": [None, jpeg, jpeg],
                      "caption": ["An image went missing.", None, "A parquet row."]})
    pq.write_table(table, paths["e_nulls.parquet"])
    pq.write_table(pa.table({"key": ["k"], "caption": ["No image column."]}), paths["f_no_columns.parquet"])
    return list(paths.values())


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    return _write_shards(tmp_path_factory.mktemp("bad_input"))


def _run(shards, small_job_dict, out, resources):
    job = parse_job(small_job_dict(shards, out, input={"max_image_pixels": MAX_PIXELS}, resources=resources))
    summary = run_job(job)
    assert not summary.units_failed
    return job, open_dataset(str(out))


@pytest.fixture(scope="module")
def reference(bad_shards, small_job_dict, tmp_path_factory):
    return _run(bad_shards, small_job_dict, tmp_path_factory.mktemp("reference") / "out",
                {"actors": 1, "cpu_workers": 1, "batch_size": 4})


@pytest.fixture(scope="module")
def rearranged(bad_shards, small_job_dict, tmp_path_factory):
    return _run(bad_shards, small_job_dict, tmp_path_factory.mktemp("rearranged") / "out",
                {"actors": 2, "cpus_per_actor": 0, "cpu_workers": 2, "batch_size": 3, "batches_in_flight": 1})


def _failures(dataset):
    return [dict(record, unit=unit["id"]) for unit in dataset.units for record in dataset.failures(unit)]


def _rows(dataset):
    return [dict(row, unit=unit["id"]) for unit in dataset.units for row in dataset.iter_unit(unit)]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_outcome(reference, case):
    """Each case ends where RELIABILITY.md says, once, with a one-line reason naming it."""
    _, dataset = reference
    expected = CASES[case]
    kept = [r for r in _rows(dataset) if r["source_key"] == expected.key]
    failed = [f for f in _failures(dataset) if f["key"] == expected.key]
    if case == "empty_tar":
        unit = next(u for u in dataset.units if u["id"] == "c_empty")
        assert (unit["input_samples"], unit["samples"], unit["failures"]) == (0, 0, 0)
    elif case == "duplicate_key_across_shards":
        assert sorted(r["unit"] for r in kept) == ["a_mixed", "d_again"] and not failed
    elif case == "duplicate_key_in_shard":
        assert [r["text"] for r in kept] == ["The first sample with this key."]
        assert [f["reason"] for f in failed] == ["duplicate_key"]
    elif expected.outcome == KEPT:
        assert len(kept) == 1 and not failed
        assert KEY_PATTERN.match(kept[0]["key"])
    else:
        assert not kept and [f["reason"] for f in failed] == [expected.outcome]
        assert failed[0]["detail"] and "\n" not in failed[0]["detail"]


def test_every_input_sample_is_accounted_for_once(reference):
    _, dataset = reference
    rows, failures = _rows(dataset), _failures(dataset)
    totals = dataset.manifest["totals"]
    assert totals["input_samples"] == totals["samples"] + totals["failures"] == len(rows) + len(failures)
    for unit in dataset.units:
        assert unit["input_samples"] == unit["samples"] + unit["failures"]
    # 24 tar samples + 2 tar samples cut + 3 parquet rows + 1 unreadable parquet file
    assert len(rows) + len(failures) == 24 + 2 + 3 + 1
    assert sorted(r["source_key"] for r in rows if r["unit"] == "b_cut") == ["before_cut"]
    assert len({(r["unit"], r["key"]) for r in rows}) == len(rows)
    assert totals["failures_by_reason"] == dict(sorted(Counter(f["reason"] for f in failures).items()))


def test_odd_images_decode_upright_in_rgb(reference):
    job, dataset = reference
    rows = {r["source_key"]: r for r in _rows(dataset)}
    assert (rows["rotated"]["image_height"], rows["rotated"]["image_width"]) == (40, 24)  # stored 40 wide, 24 high
    assert (rows["one_pixel"]["image_height"], rows["one_pixel"]["image_width"]) == (1, 1)
    assert all(view.crop == (0, 0, 1, 1) for view in rows["one_pixel"]["aug"])
    for key in ("cmyk", "grey_alpha", "palette", "grey16"):
        assert (rows[key]["image_height"], rows[key]["image_width"]) == (48, 64)
        for name in dataset.layout.embedding_shapes():
            assert np.isfinite(rows[key][name]).all()


def test_captions_non_utf8_kept_and_long_truncated_to_each_teachers_context(reference):
    job, dataset = reference
    rows = {r["source_key"]: r for r in _rows(dataset)}
    assert rows["latin1"]["text"] == "Caf\ufffd au lait."
    assert rows["long"]["text"] == LONG_CAPTION  # stored whole; each teacher reads its context's worth
    for config in job.teachers:
        teacher = build_teacher(config)
        context = teacher.card.context_length
        assert context and len(LONG_CAPTION.split()) > context
        stored = torch.from_numpy(rows["long"][f"text_emb_{config.id}"][0])
        changed_tail = teacher.encode_text([LONG_CAPTION + " an entirely different ending"])[0]
        assert F.cosine_similarity(stored, changed_tail, dim=0) > 0.999


def test_unsafe_keys_are_mapped_to_safe_ones_and_output_names_come_from_units(reference):
    _, dataset = reference
    row = next(r for r in _rows(dataset) if r["source_key"] == CASES["unsafe_key"].key)
    assert KEY_PATTERN.match(row["key"]) and "/" not in row["key"] and ".." not in row["key"]
    names = dataset.location.fs.ls(dataset.location.join("data"), detail=False)
    units = {u["id"] for u in dataset.units}
    assert {n.rsplit("/", 1)[-1].split(".")[0] for n in names} == units


def test_validate_reports_only_the_key_repeated_across_shards(reference):
    job, _ = reference
    report = validate_dataset(job.output.url)
    assert len(report.problems) == 1, report.problems
    assert "good" in report.problems[0] and "a_mixed" in report.problems[0] and "d_again" in report.problems[0]


def test_another_worker_layout_writes_the_same_dataset(reference, rearranged):
    """Actors, CPU workers, batch size and batches in flight change nothing but speed."""
    (_, first), (_, second) = reference, rearranged
    assert _failures(first) == _failures(second)
    a, b = _rows(first), _rows(second)
    assert [(r["unit"], r["key"]) for r in a] == [(r["unit"], r["key"]) for r in b]
    for row, other in zip(a, b):
        assert row["aug"] == other["aug"]
        assert row["captions_tiny_coca"] == other["captions_tiny_coca"]
        assert row["image_sha256"] == other["image_sha256"] and row["text"] == other["text"]
        for name in first.layout.embedding_shapes():
            np.testing.assert_allclose(row[name], other[name], atol=2e-3)


def test_a_symlink_member_failure_says_it_is_a_link(reference):
    _, dataset = reference
    (failure,) = [f for f in _failures(dataset) if f["key"] == "linked"]
    assert failure["reason"] == "missing_image"
    assert "symbolic link to '/etc/passwd'" in failure["detail"] and "never followed" in failure["detail"]


# --------------------------------------------------------------------------- the command line's bad input


def _cli(args):
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.stdout, result.stderr


def _one_error_line(code, err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


def test_a_job_file_that_is_not_utf8_is_one_line(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    line = _one_error_line(*_cli(["run", str(job)])[::2])
    assert "not a UTF-8 text file" in line and str(job) in line


def test_an_input_path_with_brackets_is_printed_as_given(tmp_path, sample_shards, small_job_dict):
    """rich markup in a path ([/b]) is neither parsed (MarkupError) nor dropped."""
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(small_job_dict(sample_shards, tmp_path / "out")))
    code, _, err = _cli(["run", str(job), "--input", "/path/a[/b].tar"])
    assert "/path/a[/b].tar" in _one_error_line(code, err)


def test_error_texts_keep_their_brackets(tmp_path, sample_shards, small_job_dict):
    job = tmp_path / "job.yaml"
    teachers = [{"id": "Bad Id!", "spec": "open_clip:dr-tiny-vit-32"}]
    job.write_text(json.dumps(small_job_dict(sample_shards, tmp_path / "out", teachers=teachers)))
    line = _one_error_line(*_cli(["run", str(job)])[::2])
    assert "teachers.0.id" in line and "'^[a-z][a-z0-9_]{0,47}$'" in line


@pytest.mark.parametrize("url, package", [("s3://bucket/out", "s3fs"), ("https://example.invalid/out", "aiohttp")])
def test_inspect_of_a_url_without_its_filesystem_package_is_one_line(url, package):
    """As `run` and `plan` do: the package is named, no ImportError traceback."""
    script = (f"import sys; sys.modules[{package!r}] = None\n"
              "from dr_pipeline.cli import app\n"
              f"sys.argv = ['dr-gen', 'inspect', {url!r}]\napp()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    line = _one_error_line(done.returncode, done.stderr)
    assert url in line and ("s3fs" in line if package == "s3fs" else "aiohttp" in line)
    assert "Traceback" not in done.stderr


def test_extend_over_a_changed_input_shard_says_what_can_help(tmp_path, small_job_dict):
    """The input changed since the run: rerunning cannot help, so the advice is to restore it (exit 2)."""
    shard = tmp_path / "in.tar"
    _write_tar(shard, _members("one", ("jpg", _encoded(_photo(seed=1), "JPEG")), b"One photo.")
               + _members("two", ("jpg", _encoded(_photo(seed=2), "JPEG")), b"Another photo."))
    base = small_job_dict([str(shard)], tmp_path / "out", captioners=[], augmentation={"num_views": 2},
                          teachers=[{"id": "tiny_vit_32", "spec": "open_clip:dr-tiny-vit-32"}])
    assert not run_job(parse_job(base)).units_failed
    _write_tar(shard, _members("one", ("jpg", _encoded(_photo(seed=3), "JPEG")), b"One photo.")
               + _members("two", ("jpg", _encoded(_photo(seed=2), "JPEG")), b"Another photo."))
    added = {"id": "tiny_vit_16_160", "spec": "open_clip:dr-tiny-vit-16-160"}
    extended = dict(base, teachers=[*base["teachers"], added])
    job = tmp_path / "extend.yaml"
    job.write_text(json.dumps(extended))
    code, _, err = _cli(["run", str(job), "--extend", str(tmp_path / "out")])
    assert code == 2, err
    assert "sha256 mismatch" in err and "put the original shard back" in err
    assert "rerun the same command" not in err and "Exception ignored" not in err


def test_show_says_when_a_key_is_ambiguous(reference, tmp_path):
    """"good" is in two input shards (both kept): show draws the first and names the other."""
    job, _ = reference
    code, out, err = _cli(["show", job.output.url, "--key", "good", "--out", str(tmp_path / "grid.png")])
    assert code == 0, err
    assert "--key good is ambiguous: 2 samples match" in err and "unit a_mixed" in out + err and "d_again" in err
