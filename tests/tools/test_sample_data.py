"""The bundled sample data: deterministic, img2dataset-like, with exactly one corrupt image and one empty caption."""

import io
import json
import tarfile
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dr_pipeline.views.decode import ImageRejected, decode_image
from dr_pipeline.tools.sample_data import sample_records, write_sample_data
from tests.sample_parquet import write_sample_parquet


def test_two_writes_give_identical_bytes(tmp_path):
    first = write_sample_data(str(tmp_path / "a"))
    second = write_sample_data(f"memory://{tmp_path.name}/b")
    assert first == [str(tmp_path / "a" / f"{index:05d}.tar") for index in range(3)]
    assert [Path(url).read_bytes() for url in first] == [fsspec.open(url, "rb").open().read() for url in second]


def test_shards_hold_img2dataset_members_for_every_sample_in_key_order(tmp_path):
    records = {record.key: record for record in sample_records()}
    seen = []
    for url in write_sample_data(str(tmp_path), num_shards=4):
        with tarfile.open(url) as tar:
            members = {member.name: tar.extractfile(member).read() for member in tar}
        keys = sorted({name.split(".")[0] for name in members})
        seen += keys
        for key in keys:
            record = records[key]
            assert members[f"{key}.{record.image_format}"] == record.image
            assert members[f"{key}.txt"].decode() == record.caption
            assert json.loads(members[f"{key}.json"]) == {"key": key, "url": record.url, "caption": record.caption}
        assert len(members) == 3 * len(keys)
    assert seen == sorted(records) == [f"{index:09d}" for index in range(len(records))]
    assert sum(path.stat().st_size for path in tmp_path.glob("*.tar")) < 3_000_000


def test_exactly_one_corrupt_image_and_one_empty_caption():
    records = sample_records()
    rejected, sides = [], []
    for record in records:
        try:
            sides.append(max(decode_image(record.image, 10**8).shape[1:]))
        except ImageRejected as error:
            rejected.append((record.key, error.reason))
    assert len(rejected) == 1 and rejected[0][1] == "undecodable_image"
    assert max(sides) <= 512
    uncaptioned = [record.key for record in records if record.caption == ""]
    assert len(uncaptioned) == 1 and uncaptioned[0] != rejected[0][0]
    assert all(record.caption.endswith(".") for record in records if record.caption)
    assert len(records) == 20 and {record.image_format for record in records} == {"jpg", "png"}
    assert all(record.url.startswith("https://example.org/") for record in records)


def test_png_samples_keep_their_transparency():
    modes = {
        Image.open(io.BytesIO(record.image)).mode for record in sample_records() if record.image_format == "png"
    }
    assert "RGBA" in modes


def test_parquet_has_img2dataset_columns(tmp_path):
    url = write_sample_parquet(str(tmp_path / "samples.parquet"))
    table = pq.read_table(url)
    assert table.column_names == ["key", "caption", "url", "jpg"]
    assert table.column("jpg").to_pylist() == [record.image for record in sample_records()]


def test_num_shards_must_fit_the_sample_count(tmp_path):
    with pytest.raises(ValueError, match="num_shards"):
        write_sample_data(str(tmp_path), num_shards=0)
    assert len(write_sample_data(str(tmp_path), num_shards=20)) == 20
