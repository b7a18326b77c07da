"""What reading an input yields: its samples as found, and the failures that stand in for samples
(or whole shards) that could not be read. Every input format yields these two records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dr_pipeline.core.errors import DrGenError

UID_FIELD = "uid"  # the input's own uid (DataComp's 32-hex): json field or parquet column (schema.sample_uid)


class ShardUnavailable(DrGenError):
    """An input shard cannot be opened now: its unit fails and is retried by the next run,
    rather than committed without its samples."""


@dataclass
class RawSample:
    """One input sample as found in its shard; nothing is validated or decoded yet."""

    source_key: str
    text: str | None
    image: bytes | None
    image_format: str | None
    url: str | None
    uid: str | None = None  # the input's own uid field when it has one (schema.sample_uid)
    # (failure reason, detail) of a missing image, when the shard says more than "absent"
    image_problem: tuple[str, str] | None = None


@dataclass
class InputFailure:
    """A sample (or a whole shard) that could not be read; `reason` is a schema failure_reasons key."""

    key: str
    reason: str
    detail: str


def json_key(meta: dict[str, Any], fields: tuple[str, ...]) -> str | None:
    """The first of `fields` that holds a usable key (a non-empty string, or an integer)."""
    for name in fields:
        value = meta.get(name)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
    return None


def utf8_text(data: bytes) -> str:
    """Captions are UTF-8; a stray invalid byte becomes U+FFFD rather than costing the sample."""
    return data.decode("utf-8", errors="replace")

