"""img2dataset's conventions around its shards: not a format of its own, but files beside them.

Beside each shard NNNNN.tar img2dataset writes NNNNN.parquet (one row per URL it tried, with
`status` and `error_message`) and NNNNN_stats.json (with `successes`, the samples in the tar);
its parquet output carries `status` and `error_message` columns beside the image. Listing
skips the sidecar files, reading turns img2dataset's failed downloads into download_failed
failures, and `plan` counts a tar from its stats file.
"""

from __future__ import annotations

import json
import re
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from dr_pipeline.core.config import InputConfig
from dr_pipeline.sources.formats.base import UNOPENABLE, ShardCount, open_input
from dr_pipeline.sources.records import InputFailure

_TAR_NAME = re.compile(r"\.tar(\?.*)?$", re.IGNORECASE)
_STATS_OF = re.compile(r"\.(tar|tar\.gz|tgz)$", re.IGNORECASE)


def without_sidecars(urls: list[str]) -> list[str]:
    """Of a folder or glob's files, a .parquet whose .tar is listed too, and every .json file,
    are dropped (the metadata is read with its tar); shards named one by one are all read."""
    tars = {url[: -len(".tar")] for url in urls if url.endswith(".tar")}
    return [url for url in urls
            if not url.endswith(".json") and not (url.endswith(".parquet") and url[: -len(".parquet")] in tars)]


def download_failures(tar_url: str, config: InputConfig) -> Iterator[InputFailure]:
    """The URLs img2dataset failed to download into the tar at `tar_url`, from the metadata it wrote
    beside it (NNNNN.parquet: key, status, error_message): a download_failed failure each, with
    img2dataset's status and message ("failed_to_download: HTTP Error 404: Not Found") as detail.
    Nothing when there is no such file or it has no status column."""
    match = _TAR_NAME.search(tar_url)
    if match is None:
        return
    metadata_url = tar_url[: match.start()] + ".parquet" + (match.group(1) or "")
    try:
        with open_input(metadata_url, config) as file:
            metadata = pq.ParquetFile(file)
            names = set(metadata.schema_arrow.names)
            if not {"key", "status"} <= names:
                return
            table = metadata.read(columns=[c for c in ("key", "status", "error_message") if c in names])
    except (*UNOPENABLE, OSError, ValueError, pa.ArrowException):
        return
    messages = table.column("error_message").to_pylist() if "error_message" in table.column_names else None
    for row, (key, status) in enumerate(zip(table.column("key").to_pylist(), table.column("status").to_pylist())):
        if status is None or status == "success":
            continue
        message = messages[row] if messages else None
        yield InputFailure(str(key), "download_failed", _failure_detail(status, message))


def download_status(parquet: pq.ParquetFile) -> Callable[[int], tuple[str, str] | None]:
    """For img2dataset's parquet output (status and error_message columns beside the image): a
    row's download_failed (reason, detail) when img2dataset recorded a failure, else None.
    The two small columns are read once per shard."""
    if not {"status", "error_message"} <= set(parquet.schema_arrow.names):
        return lambda index: None
    table = parquet.read(columns=["status", "error_message"], use_threads=False)
    statuses, messages = table.column("status").to_pylist(), table.column("error_message").to_pylist()

    def problem(index: int) -> tuple[str, str] | None:
        status, message = statuses[index], messages[index]
        if status is None or status == "success":
            return None
        return "download_failed", _failure_detail(status, message)

    return problem


def _failure_detail(status: str, message: str | None) -> str:
    return f"{status}: {message}" if message else str(status)


def stats_count(tar_url: str, config: InputConfig) -> ShardCount | None:
    """Samples in a tar according to img2dataset's stats file beside it; None when there is none."""
    stats_url = _STATS_OF.sub("_stats.json", tar_url)
    if stats_url == tar_url:
        return None
    try:
        with open_input(stats_url, config) as file:
            return ShardCount(int(json.load(file)["successes"]))
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        return None
