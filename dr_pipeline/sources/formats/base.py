"""What an input format module provides (recognising its shards, streaming their samples,
counting them for `dr-gen plan`), and the one way every format opens an input file: through
the storage layer's retried, counted reader."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

import fsspec

from dr_pipeline.core.config import InputConfig
from dr_pipeline.core.storage import RetryingReader, filesystem, filesystem_options
from dr_pipeline.sources.records import InputFailure, RawSample

UNOPENABLE = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
"""Errors that mean the file itself is absent or closed to us, not that storage hiccuped."""


@dataclass(frozen=True)
class ShardCount:
    """One shard's samples for `plan`, with the bytes of its images and captions where the
    counted metadata tells them (None where it does not)."""

    samples: int
    image_bytes: float | None = None
    caption_bytes: float | None = None


@dataclass(frozen=True)
class InputFormat:
    """One input format: a module under sources/formats/ builds one and registers it in
    INPUT_FORMATS.

    `read` streams an opened shard's samples (RawSample, or InputFailure where it cannot be
    read; a storage error propagates). Counting is in two steps of rising cost: `count_cheaply`
    reads metadata (a footer, a stats file beside the shard) and gives None where the shard has
    none; `count_by_reading`, where the format has it, reads the shard's own structure (its tar
    headers) and is used on a few shards only."""

    name: str
    file_name: re.Pattern[str]
    """Matches the URL of a shard of this format (its extension, before any query string)."""
    has_signature: Callable[[bytes], bool]
    """Whether a file's first 512 bytes are this format's, for shards whose name does not tell."""
    read: Callable[[RetryingReader, str, InputConfig], Iterator[RawSample | InputFailure]]
    count_cheaply: Callable[[str, InputConfig], ShardCount | None]
    cheap_count_source: str
    """What `count_cheaply` reads, as `plan` names it ("parquet footer row counts")."""
    count_by_reading: Callable[[str, InputConfig], ShardCount] | None = None
    reading_count_source: str | None = None


def open_input(url: str, config: InputConfig) -> RetryingReader:
    """An input file for reading, reopened where it was when a transient storage error cuts a
    read (each retry counted)."""
    filesystem(url, config.storage_options)  # the instance fsspec.open reuses, its own retries cut
    options = filesystem_options(url, config.storage_options)
    return RetryingReader(lambda: fsspec.open(url, "rb", **options).open())


def shard_name(url: str) -> str:
    """The shard's file name: the prefix of its failure keys."""
    return url.rstrip("/").rsplit("/", 1)[-1]
