"""One input shard: which format it is, and its samples streamed through that format's reader.

What becomes of a problem:
- a shard's own content (not a tar, cut short, parquet without an image column) is an
  InputFailure in the stream, so the caller records it;
- a shard that cannot be opened (absent, not permitted) raises ShardUnavailable: its unit is
  not committed, so a rerun reads it once it is back;
- an error of the storage layer underneath (connection reset, timeout, disk error) propagates:
  it says nothing about the shard, and the caller should retry the unit rather than commit it
  with a permanent failure.
Reading never loads a whole shard.
"""

from __future__ import annotations

from typing import Iterator

from dr_pipeline.core.config import InputConfig
from dr_pipeline.core.errors import ConfigError, error_line
from dr_pipeline.core.storage import redact_url
from dr_pipeline.sources.formats import INPUT_FORMATS, InputFormat, format_by_file_name, format_by_signature
from dr_pipeline.sources.formats.base import UNOPENABLE, open_input, shard_name
from dr_pipeline.sources.records import InputFailure, RawSample, ShardUnavailable


def detect_format(url: str, config: InputConfig) -> InputFormat:
    """config.format if set, else the file name's extension, else the file's first bytes."""
    if config.format is not None:
        return INPUT_FORMATS[config.format]
    named = format_by_file_name(url)
    if named is not None:
        return named
    try:
        with open_input(url, config) as file:
            head = file.read(512)
    except (*UNOPENABLE, ValueError) as error:  # a storage hiccup propagates, as when reading
        raise ConfigError(f"{url}: cannot read it to detect its format ({error_line(error, with_type=True)})") from None
    found = format_by_signature(head)
    if found is None:
        raise ConfigError(f"{url}: neither a tar nor a parquet file by name or content; set input.format")
    return found


def iter_shard(url: str, config: InputConfig) -> Iterator[RawSample | InputFailure]:
    """The shard's samples in shard order, with InputFailures where it cannot be read (see the
    format modules for what a sample is in each). Samples without an image or a caption are
    still yielded with None there. A shard that opens but is of no known format is one
    unreadable_shard failure."""
    try:
        file = open_input(url, config)
    except UNOPENABLE as error:
        raise ShardUnavailable(f"input shard {redact_url(url)} cannot be opened ({error_line(error, with_type=True)})") from None
    try:
        shard_format = detect_format(url, config)
    except ConfigError as error:
        file.close()
        yield InputFailure(f"{shard_name(url)}#unreadable", "unreadable_shard", error_line(error, with_type=True))
        return
    with file:
        yield from shard_format.read(file, url, config)
