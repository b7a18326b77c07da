"""The output read by other libraries gives the values dr-gen's own reader gives."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import webdataset as wds
from datasets import load_dataset

from dr_pipeline.core.records import ViewParams
from dr_pipeline.core.schema import from_storage


def _data_files(dataset):
    return [dataset.location.join(unit["files"]["data"]["path"]) for unit in dataset.units]


def _assert_row_equal(values, row, layout):
    """`values`: one row as another library returned it (lists or arrays); `row`: dr-gen's reader row."""
    for name in ("key", "source_key", "uid", "url", "text", "image", "image_sha256", "image_height", "image_width"):
        assert values[name] == row[name], name
    assert [ViewParams.from_record(record) for record in values["aug"]] == row["aug"]
    for captioner in layout.captioners:
        assert list(values[captioner.column]) == row[captioner.column]
    for name in layout.embedding_shapes():
        stored = np.stack([np.asarray(r) for r in values[name]])
        np.testing.assert_array_equal(from_storage(stored, layout.embedding_dtype), row[name])


def test_hugging_face_datasets_loads_the_arrow_output(generated, tmp_path):
    dataset = generated["kept"].dataset
    rows = list(dataset.iter_samples())
    loaded = load_dataset("parquet", data_files=_data_files(dataset), split="train", cache_dir=str(tmp_path))
    assert loaded.num_rows == len(rows)
    for values, row in zip(loaded, rows):
        _assert_row_equal(values, row, dataset.layout)


@pytest.fixture
def ray_local(generated):
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_data_reads_the_arrow_output(generated, ray_local):
    dataset = generated["kept"].dataset
    rows = {row["key"]: row for row in dataset.iter_samples()}
    records = ray.data.read_parquet(dataset.location.join("data")).take_all()  # reads only the *.parquet files
    assert sorted(r["key"] for r in records) == sorted(rows)
    for values in records:
        _assert_row_equal(values, rows[values["key"]], dataset.layout)


def test_pyarrow_table_as_documented(generated):
    dataset = generated["kept"].dataset
    table = pq.read_table(_data_files(dataset)[0])
    embeddings = table.column("image_emb_tiny_vit_32").combine_chunks().flatten().flatten().to_numpy()
    embeddings = embeddings.reshape(table.num_rows, 3, 64)  # [rows, K, D] float16
    rows = list(dataset.iter_unit(dataset.units[0]))
    np.testing.assert_array_equal(embeddings.astype(np.float32), np.stack([r["image_emb_tiny_vit_32"] for r in rows]))


def test_webdataset_reads_the_tar_output(generated):
    dataset = generated["from_input"].dataset
    rows = {row["key"]: row for row in dataset.iter_samples()}
    samples = list(wds.WebDataset(_data_files(dataset), shardshuffle=False).decode())
    assert sorted(s["__key__"] for s in samples) == sorted(rows)
    for sample in samples:
        row = rows[sample["__key__"]]
        assert sample["json"]["text"] == row["text"] and sample["json"]["source_key"] == row["source_key"]
        assert [ViewParams.from_record(r) for r in sample["aug.json"]] == row["aug"]
        assert sample["captions.tiny_coca.json"] == row["captions_tiny_coca"]
        for teacher in dataset.layout.teachers:
            for role, column in (("image_emb", teacher.image_column), ("text_emb", teacher.text_column)):
                stored = sample[f"{role}.{teacher.id}.npy"]
                assert stored.dtype == np.uint16  # bfloat16 bits
                np.testing.assert_array_equal(from_storage(stored, "bfloat16"), row[column])
