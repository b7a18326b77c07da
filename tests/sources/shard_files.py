"""Input shards built in memory for the tests of sources/: configs, memory:// files, tars."""

import io
import tarfile
import uuid

import fsspec

from dr_pipeline.core.config import InputConfig
from dr_pipeline.sources.records import InputFailure, RawSample
from dr_pipeline.sources.shards import iter_shard


def config(urls="unused", **settings) -> InputConfig:
    return InputConfig(urls=urls, **settings)


def memory_url(name: str) -> str:
    """A fresh memory:// folder per call, so tests never see each other's files."""
    return f"memory://{uuid.uuid4().hex}/{name}"


def put(url: str, data: bytes) -> str:
    with fsspec.open(url, "wb") as file:
        file.write(data)
    return url


def tar_bytes(members: list[tuple[str, bytes]], directories: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in directories:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def read_all(url: str, **settings) -> list[RawSample | InputFailure]:
    return list(iter_shard(url, config(**settings)))
