"""The work plan: one output unit per input shard, named from the input, frozen in the output.

Unit names come from the input shard's path, never from completion order, so a
rerun, a retry or another worker layout writes every unit under the same name.
The plan is written once (plan.json) and reused by reruns, so a rerun neither
relists a huge input nor picks up shards that appeared since.
"""

from __future__ import annotations

import datetime
import posixpath
import re
from dataclasses import dataclass
from typing import NamedTuple

from dr_pipeline.core.config import JobConfig
from dr_pipeline.core.errors import ConfigError
from dr_pipeline.core.storage import Location, redact_url
from dr_pipeline.dataset.formats import format_for

PLAN_FILE = "plan.json"
DATA_DIR = "data"
_SHARD_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".parquet")


@dataclass(frozen=True, slots=True)
class Unit:
    id: str
    input: str

    def data_file(self, output_format: str) -> str:
        return posixpath.join(DATA_DIR, f"{self.id}.{format_for(output_format).suffix}")

    @property
    def failures_file(self) -> str:
        return posixpath.join(DATA_DIR, f"{self.id}.failures.jsonl")

    @property
    def stats_file(self) -> str:
        """Written last: its presence marks the unit as committed."""
        return posixpath.join(DATA_DIR, f"{self.id}.stats.json")


def _strip_protocol(url: str) -> str:
    return url.split("://", 1)[-1]


def unit_ids(shard_urls: list[str]) -> list[str]:
    """Ids from each shard's path relative to the shards' common folder, '/' -> '__'."""
    paths = [_strip_protocol(u) for u in shard_urls]
    common = posixpath.dirname(paths[0]) if len(paths) == 1 else posixpath.commonpath(paths)
    ids: list[str] = []
    seen: set[str] = set()
    for path in paths:
        relative = posixpath.relpath(path, common) if common else path
        for suffix in _SHARD_SUFFIXES:
            if relative.endswith(suffix):
                relative = relative[: -len(suffix)]
                break
        unit_id = re.sub(r"[^A-Za-z0-9_.-]+", "_", relative.replace("/", "__")).strip("._") or "shard"
        base, n = unit_id, 1
        while unit_id in seen:
            n += 1
            unit_id = f"{base}_{n}"
        seen.add(unit_id)
        ids.append(unit_id)
    return ids


def make_plan(shard_urls: list[str]) -> list[Unit]:
    return [Unit(unit_id, url) for unit_id, url in zip(unit_ids(shard_urls), shard_urls)]


class Plan(NamedTuple):
    config_hash: str
    units: list[Unit]
    created_at: str  # when the dataset was begun


def read_plan(out: Location) -> Plan | None:
    """The existing plan, or None when the output has none."""
    if not out.exists(PLAN_FILE):
        return None
    data = out.read_json(PLAN_FILE)
    return Plan(data["config_hash"], [Unit(u["id"], u["input"]) for u in data["units"]], data["created_at"])


def write_plan(out: Location, job: JobConfig, units: list[Unit]) -> Plan:
    plan = Plan(job.output_hash(), units, datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    out.write_json_atomic(
        {"config_hash": plan.config_hash, "created_at": plan.created_at,
         "units": [{"id": u.id, "input": u.input} for u in units]},
        PLAN_FILE,
    )
    return plan


def check_plan_matches(out: Location, job: JobConfig, existing_hash: str) -> None:
    if existing_hash != job.output_hash():
        raise ConfigError(
            f"{redact_url(out.url())} was written with a different config "
            f"(config hash {existing_hash}, this job {job.output_hash()}); "
            "pass --overwrite to replace it, --extend OUT to add teachers or captioners to it, or another --output"
        )
