"""One shard through the format registry: its format by config, name or content; a shard that
cannot be opened; streaming; storage errors that propagate instead of being recorded."""

import io
import random

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dr_pipeline.core.errors import ConfigError
from dr_pipeline.sources.formats import base
from dr_pipeline.sources.records import RawSample, ShardUnavailable
from dr_pipeline.sources.shards import detect_format, iter_shard
from tests.sources.shard_files import config, memory_url, put, read_all, tar_bytes


def test_detect_format_by_config_then_extension():
    assert detect_format("x/data.bin", config(format="parquet")).name == "parquet"
    assert detect_format("x/00000.tar", config(format="parquet")).name == "parquet"
    for name in ("a.tar", "a.TAR", "a.tar.gz", "a.tgz", "https://h/a.tar?token=1"):
        assert detect_format(name, config()).name == "webdataset"
    for name in ("a.parquet", "s3://b/a.PARQUET"):
        assert detect_format(name, config()).name == "parquet"


def test_detect_format_sniffs_the_content_when_the_name_does_not_tell():
    tar_url = put(memory_url("shard-a"), tar_bytes([("k.txt", b"hello")]))
    buffer = io.BytesIO()
    pq.write_table(pa.table({"caption": ["c"]}), buffer)
    parquet_url = put(memory_url("shard-b"), buffer.getvalue())
    assert detect_format(tar_url, config()).name == "webdataset"
    assert detect_format(parquet_url, config()).name == "parquet"
    with pytest.raises(ConfigError, match="set input.format"):
        detect_format(put(memory_url("shard-c"), b"plain text, neither format"), config())
    with pytest.raises(ConfigError, match="cannot read it"):
        detect_format(memory_url("missing"), config())


def test_a_shard_that_cannot_be_opened_raises_rather_than_yielding_a_failure():
    """Its unit must fail (and a rerun retry it), never be committed without its samples."""
    with pytest.raises(ShardUnavailable, match="missing.tar cannot be opened .*FileNotFoundError"):
        read_all(memory_url("missing.tar"))


def test_tar_reading_streams(sample_shards, monkeypatch):
    """The first sample arrives after reading a small part of the shard, not all of it."""
    data = fsspec.open(sample_shards[1], "rb").open().read()
    file = io.BytesIO(data)
    monkeypatch.setattr(base.fsspec, "open", lambda url, mode, **options: _Opener(file))
    samples = iter_shard("s3://bucket/00001.tar", config())
    next(samples)
    assert file.tell() < len(data) / 2


class _Opener:
    def __init__(self, file):
        self.file = file

    def open(self):
        return self.file


class _FailingFile(io.BytesIO):
    """A remote file whose connection drops once `limit` bytes have been read."""

    def __init__(self, data: bytes, limit: int):
        super().__init__(data)
        self.left = limit

    def read(self, size=-1):
        if self.left <= 0:
            raise ConnectionResetError("connection reset by peer")
        data = super().read(size)
        self.left -= len(data)
        return data


@pytest.mark.parametrize("name", ["00000.tar", "00000.parquet"])
def test_storage_errors_propagate_instead_of_being_recorded(monkeypatch, name):
    """A dropped connection says nothing about the shard: the caller must retry, not record a failure."""
    images = [random.Random(i).randbytes(2_000) for i in range(200)]
    if name.endswith(".parquet"):
        buffer = io.BytesIO()
        table = pa.table({"jpg": images, "caption": ["c"] * len(images)})
        pq.write_table(table, buffer, row_group_size=10, compression="none")
        data = buffer.getvalue()
    else:
        data = tar_bytes([(f"{i}.jpg", image) for i, image in enumerate(images)])
    dropping = _FailingFile(data, limit=len(data) * 4 // 5)
    monkeypatch.setattr(base.fsspec, "open", lambda url, mode, **options: _Opener(dropping))
    samples = iter_shard(f"s3://bucket/{name}", config())
    assert isinstance(next(samples), RawSample)
    with pytest.raises(ConnectionResetError):
        list(samples)
