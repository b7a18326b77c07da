"""`dr-gen export --format datacompdr`, read back the way the DataCompDR training loader reads it."""

import copy
import dataclasses
import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import torchvision.transforms as T
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from dr_pipeline.core.records import ViewParams
from dr_pipeline.cli import app
from dr_pipeline.views.decode import decode_image
from dr_pipeline.tools.export import datacompdr_members, datacompdr_problems, export_datacompdr
from dr_pipeline.read.replay import unit_rows_with_images

PUBLIC_MEMBERS = {"url.txt", "txt", "syn.json", "paug.json", "npz", "json"}


@pytest.fixture(scope="module")
def exported(generated, tmp_path_factory):
    dest = tmp_path_factory.mktemp("datacompdr")
    code, _, err = _cli(["export", generated["from_input"].job.output.url, str(dest), "--format", "datacompdr"])
    assert code == 0, err
    return dest


def _cli(args):
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.stdout, result.stderr


def _rows(dataset):
    return {row["key"]: row for unit in dataset.units for row in unit_rows_with_images(dataset, unit)}


def _tar_samples(path):
    """key -> {suffix: bytes}, read with tarfile alone."""
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, suffix = member.name.partition(".")
            samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return samples


def test_members_hold_the_source_dataset(generated, exported):
    dataset = generated["from_input"].dataset
    rows = _rows(dataset)
    tars = sorted(exported.glob("*.tar"))
    assert [t.name for t in tars] == [f"{u['id']}.tar" for u in dataset.units]
    seen = set()
    for tar in tars:
        for key, members in _tar_samples(tar).items():
            row = rows[key]
            seen.add(key)
            assert set(members) == PUBLIC_MEMBERS | {row["image_format"]}
            assert members["url.txt"].decode() == row["url"]
            assert members["txt"].decode() == row["text"]
            assert json.loads(members["syn.json"]) == {"syn_text": row["captions_tiny_coca"]}
            sample_json = json.loads(members["json"])
            assert {k: sample_json[k] for k in ("uid", "sha256")} == {"uid": row["uid"], "sha256": row["image_sha256"]}
            if sample_json.get("normalised_image") == "png":  # the decoded image, losslessly
                decoded = np.asarray(Image.open(io.BytesIO(members["png"])).convert("RGB")).transpose(2, 0, 1)
                np.testing.assert_array_equal(decoded, decode_image(row["image"], 10**8).numpy())
            else:
                assert hashlib.sha256(members[row["image_format"]]).hexdigest() == row["image_sha256"]
            param_aug = json.loads(members["paug.json"])["param_aug"]
            assert len(param_aug) == 3
            for entry, view in zip(param_aug, row["aug"]):
                crop, ops = entry
                replayable = ViewParams(tuple(crop), False, None if ops is None else tuple(map(tuple, ops)), None)
                assert replayable == view
            with np.load(io.BytesIO(members["npz"]), allow_pickle=False) as npz:
                assert set(npz.files) == {"image_emb", "text_emb"}
                image_emb, text_emb = npz["image_emb"], npz["text_emb"]
            assert image_emb.shape == (3, 64 + 96) and text_emb.shape == (1 + 2, 64 + 96)
            assert image_emb.dtype == np.float32  # bfloat16 source: widened exactly
            np.testing.assert_array_equal(image_emb[:, :64], row["image_emb_tiny_vit_32"])
            np.testing.assert_array_equal(image_emb[:, 64:], row["image_emb_tiny_vit_16_160"])
            np.testing.assert_array_equal(text_emb[:, :64], row["text_emb_tiny_vit_32"])
            np.testing.assert_array_equal(text_emb[:, 64:], row["text_emb_tiny_vit_16_160"])
    assert seen == set(rows)
    sizes = json.loads((exported / "sizes.json").read_text())
    assert sizes == {tar.name: len(_tar_samples(tar)) for tar in tars}


def test_webdataset_pipeline_of_the_training_loader_reads_it(generated, exported):
    """The loader's steps: tarfile_to_samples, decode to PIL, rename image/text, pick a view and a caption."""
    rows = _rows(generated["from_input"].dataset)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(sorted(str(t) for t in exported.glob("*.tar"))),
        wds.tarfile_to_samples(),
        wds.select(lambda s: "txt" in s and any(f in s for f in ("jpg", "png", "jpeg", "webp"))),
        wds.decode("pilrgb"),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
    )
    samples = list(pipeline)
    assert len(samples) == len(rows)
    rng = np.random.default_rng(0)
    for sample in samples:
        row = rows[sample["__key__"]]
        assert sample["image"].size == (row["image_width"], row["image_height"])
        assert sample["text"] == row["text"]
        scapi = rng.integers(len(sample["syn.json"]["syn_text"]))
        np.testing.assert_array_equal(sample["npz"]["text_emb"][1 + scapi][:64], row["text_emb_tiny_vit_32"][1 + scapi])
        aug_idx = rng.integers(len(sample["paug.json"]["param_aug"]))
        np.testing.assert_array_equal(sample["npz"]["image_emb"][aug_idx][64:], row["image_emb_tiny_vit_16_160"][aug_idx])


def test_config_describes_teachers_and_builds_the_loaders_transforms(generated, exported):
    config = json.loads((exported / "config.json").read_text())
    manifest = generated["from_input"].dataset.manifest
    cards = [t["card"] for t in manifest["teachers"]]
    assert config["model_name"] == "dr-tiny-vit-32,dr-tiny-vit-16-160"
    assert config["pretrained"] == ",".join(card["weights"] for card in cards)
    assert config["num_samples"] == 3
    assert [(t["embedding_dim"], t["logit_scale"]) for t in config["teachers"]] == [
        (card["embedding_dim"], card["logit_scale"]) for card in cards]
    assert config["text_emb_rows"] == manifest["text_rows"]
    augmentation = config["reinforce"]["image_augmentation"]
    assert augmentation["normalize"] == {"mean": cards[0]["mean"], "std": cards[0]["std"]}
    # The loader drops "enable" and passes the rest as keyword arguments to torchvision's classes.
    crop = {k: v for k, v in augmentation["random_resized_crop"].items() if k != "enable"}
    crop["interpolation"] = T.InterpolationMode(crop["interpolation"])
    assert T.RandomResizedCrop(**crop).size == (224, 224)
    rand_augment = {k: v for k, v in augmentation["rand_augment"].items() if k not in ("enable", "p")}
    assert T.RandAugment(**rand_augment).magnitude == 9
    assert augmentation["rand_augment"]["enable"] is True


def test_export_without_images_and_reexport_are_byte_reproducible(generated, exported, tmp_path):
    dataset = generated["from_input"].dataset
    export_datacompdr(dataset, str(tmp_path / "again"))
    for tar in exported.glob("*.tar"):
        assert (tmp_path / "again" / tar.name).read_bytes() == tar.read_bytes()
    summary = export_datacompdr(dataset, str(tmp_path / "no_images"), images=False)
    assert summary.samples == len(dataset) and summary.units == 3
    for tar in (tmp_path / "no_images").glob("*.tar"):
        assert all(set(members) == PUBLIC_MEMBERS for members in _tar_samples(tar).values())


def test_float16_embeddings_stay_float16(generated):
    dataset = generated["kept"].dataset
    row = next(iter(dataset.iter_samples()))
    members = datacompdr_members(dataset, row, with_image=True)
    with np.load(io.BytesIO(members["npz"]), allow_pickle=False) as npz:
        assert npz["image_emb"].dtype == np.float16
        np.testing.assert_array_equal(npz["image_emb"][:, :64], row["image_emb_tiny_vit_32"])
    assert members[row["image_format"]] == row["image"]


def test_layout_it_cannot_represent_is_refused_with_one_line(generated, tmp_path):
    code, _, err = _cli(["export", generated["kept"].job.output.url, str(tmp_path / "dest"), "--format", "datacompdr"])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1
    assert "flips views (horizontal_flip.p = 0.5)" in lines[0] and "erases boxes (random_erasing.p = 0.5)" in lines[0]
    assert not (tmp_path / "dest").exists()


def test_text_only_teacher_is_refused(generated):
    dataset = copy.deepcopy(generated["from_input"].dataset)
    teachers = dataset.layout.teachers
    text_only = dataclasses.replace(teachers[1], has_image=False)
    dataset.layout = dataclasses.replace(dataset.layout, teachers=(teachers[0], text_only))
    assert datacompdr_problems(dataset) == ["teacher tiny_vit_16_160 has no image embeddings"]
    assert datacompdr_problems(generated["from_input"].dataset) == []
