"""Input formats, one module each, and their registry.

Adding an input format is one module (an InputFormat: how its shards are recognised, read and
counted) and one entry in INPUT_FORMATS; listing, reading (sources.shards) and `dr-gen plan`
(tools.estimate) go through the registry. img2dataset.py is not a format: it holds the
conventions of the files img2dataset writes beside its shards.
"""

from __future__ import annotations

from dr_pipeline.sources.formats.base import InputFormat, ShardCount
from dr_pipeline.sources.formats.parquet import PARQUET
from dr_pipeline.sources.formats.webdataset import WEBDATASET

INPUT_FORMATS: dict[str, InputFormat] = {
    "webdataset": WEBDATASET,
    "parquet": PARQUET,
}
"""Every input format by its name in input.format, in the order names and contents are tried."""


def format_by_file_name(url: str) -> InputFormat | None:
    """The format a shard's name says it is, or None."""
    return next((known for known in INPUT_FORMATS.values() if known.file_name.search(url)), None)


def format_by_signature(head: bytes) -> InputFormat | None:
    """The format a file's first 512 bytes say it is, or None."""
    return next((known for known in INPUT_FORMATS.values() if known.has_signature(head)), None)


__all__ = ["INPUT_FORMATS", "InputFormat", "ShardCount", "format_by_file_name", "format_by_signature"]
