"""dataset.json: the one file that says what a dataset is.

It is rebuilt from the per-unit stats markers (the source of truth for what is
committed) and the run records in runs.json, so it can always be regenerated
after a crash, and it is written atomically, so readers see either the old or
the new version. The driver never holds every unit's stats at once: markers are
listed once, read in batches and streamed into dataset.json, so planning,
resuming and writing the manifest of a 100k-unit job take memory linear in the
unit ids only (bench/bench_driver_scale.py).
"""

from __future__ import annotations

import datetime
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from dr_pipeline import __version__
from dr_pipeline.core.config import JobConfig
from dr_pipeline.core.errors import ConfigError, DatasetError, error_line
from dr_pipeline.core.records import ModelCards, Totals, UnitStats
from dr_pipeline.dataset.formats import format_for
from dr_pipeline.dataset.plan import DATA_DIR, Unit
from dr_pipeline.core.schema import SCHEMA_VERSION, CaptionerColumns, DatasetLayout, TeacherColumns, validate_manifest
from dr_pipeline.core.storage import Location, redact_url

MANIFEST_FILE = "dataset.json"
RUNS_FILE = "runs.json"
STATS_SUFFIX = ".stats.json"
MARKERS_PER_READ = 1000
"""Stats markers fetched per batched read (`fs.cat` of many paths: concurrent on object stores)."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def committed_unit_ids(out: Location, units: Iterable[Unit], folder: str = DATA_DIR) -> set[str]:
    """Ids of the units of the plan whose stats marker exists in `folder`: one fresh listing, no reads."""
    wanted = {u.id for u in units}
    names = (path.rsplit("/", 1)[-1] for path in out.glob(f"{folder}/*{STATS_SUFFIX}"))
    return {name[: -len(STATS_SUFFIX)] for name in names} & wanted


def iter_unit_stats(out: Location, unit_ids: Iterable[str], folder: str = DATA_DIR) -> Iterator[UnitStats]:
    """The stats markers of committed units, in the given order, read MARKERS_PER_READ at a time."""
    batch: list[str] = []
    for unit_id in unit_ids:
        batch.append(out.join(folder, unit_id + STATS_SUFFIX))
        if len(batch) == MARKERS_PER_READ:
            yield from _read_markers(out, batch)
            batch = []
    yield from _read_markers(out, batch)


def _read_markers(out: Location, paths: list[str]) -> Iterator[UnitStats]:
    if paths:
        contents = out.cat(paths)
        yield from (json.loads(contents[path]) for path in paths)


def read_unit_stats(out: Location, units: Iterable[Unit], folder: str = DATA_DIR) -> dict[str, UnitStats]:
    """Stats of every committed unit of the plan (in `folder`: data, or a sidecar folder), keyed by unit id."""
    units = list(units)
    committed = committed_unit_ids(out, units, folder)
    return {s["id"]: s for s in iter_unit_stats(out, [u.id for u in units if u.id in committed], folder)}


@dataclass
class StatsSum:
    """Running sums over unit stats, for the manifest's totals and a run's record, in O(1) memory."""

    units: int = 0
    input_samples: int = 0
    samples: int = 0
    failures: int = 0
    bytes: int = 0
    seconds: float = 0.0
    failures_by_reason: Counter[str] = field(default_factory=Counter)
    seconds_by_stage: Counter[str] = field(default_factory=Counter)
    units_by_node: Counter[str] = field(default_factory=Counter)
    storage_retries: int = 0  # counted by the unit tasks that returned these stats (not in the markers)

    def add(self, stats: UnitStats) -> None:
        self.units += 1
        self.input_samples += stats["input_samples"]
        self.samples += stats["samples"]
        self.failures += stats["failures"]
        self.bytes += sum(f["bytes"] for f in stats["files"].values())
        self.seconds += stats.get("seconds", 0.0)
        self.failures_by_reason.update(stats.get("failures_by_reason", {}))
        self.seconds_by_stage.update(stats.get("seconds_by_stage", {}))
        if stats.get("node_id"):
            self.units_by_node[stats["node_id"]] += 1
        self.storage_retries += stats.get("storage_retries", 0)

    def totals(self, units_planned: int) -> Totals:
        """The manifest's "totals"."""
        return {"units_planned": units_planned, "units_done": self.units, "input_samples": self.input_samples,
                "samples": self.samples, "failures": self.failures, "bytes": self.bytes,
                "failures_by_reason": dict(sorted(self.failures_by_reason.items()))}


def totals(units_planned: int, unit_stats: Iterable[UnitStats]) -> Totals:
    summed = StatsSum()
    for stats in unit_stats:
        summed.add(stats)
    return summed.totals(units_planned)


def layout_for(job: JobConfig, cards: ModelCards) -> DatasetLayout:
    """The columns of JOB's dataset, its models having these cards."""
    return DatasetLayout(
        num_views=job.augmentation.num_views,
        embedding_dtype=job.output.embedding_dtype,
        teachers=tuple(
            TeacherColumns(t.id, card["embedding_dim"], card["has_image"], card["has_text"])
            for t, card in zip(job.teachers, cards["teachers"])
        ),
        captioners=tuple(CaptionerColumns(c.id, c.num_captions) for c in job.captioners),
    )


def manifest_cards(manifest: dict[str, Any]) -> ModelCards:
    """The teacher and captioner cards a manifest records, as the models' `describe()` gives them."""
    return {kind: [entry["card"] for entry in manifest[kind]] for kind in ("teachers", "captioners")}


def manifest_head(job: JobConfig, cards: ModelCards, created_at: str) -> dict[str, Any]:
    """Everything in dataset.json but the units, their totals, the status and the runs."""
    layout = layout_for(job, cards)
    config = job.public_dump()
    config["input"]["urls"] = [redact_url(u) for u in job.input.url_list]
    config["output"]["url"] = redact_url(job.output.url)
    return {
        "schema_version": SCHEMA_VERSION,
        "dr_gen_version": __version__,
        "format": config["output"]["format"],  # as job files named it then (core.config.FORMAT_RECORDED_AS)
        "created_at": created_at,
        "updated_at": _now(),
        "config": config,
        "config_hash": job.output_hash(),
        "layout": layout.to_dict(),
        "text_rows": layout.text_sources(),
        "columns": {f.name: str(f.type) for f in layout.arrow_schema()},
        "teachers": [
            {"id": t.id, "spec": t.spec, "card": card}
            for t, card in zip(job.teachers, cards["teachers"])
        ],
        "captioners": [
            {
                "id": c.id,
                "spec": c.spec,
                "card": card,
                "num_captions": c.num_captions,
                "sampler": c.sampler.model_dump(mode="json"),
                "postprocess": c.postprocess.model_dump(mode="json"),
            }
            for c, card in zip(job.captioners, cards["captioners"])
        ],
    }


def write_manifest(
    out: Location, head: dict[str, Any], unit_stats: Iterable[UnitStats], units_planned: int,
    tail: dict[str, Any] | None = None,
) -> Totals:
    """Stream dataset.json: `head`, one line per unit (inputs redacted), then the totals, the status
    and `tail` ("runs", "extensions"). Checked against the manifest schema (with the first unit
    standing for all: every entry is a stats marker written by the same code) before it replaces
    the old one. Returns the totals."""
    summed = StatsSum()
    first_unit: list[dict[str, Any]] = []
    with out.open_atomic(MANIFEST_FILE) as handle:
        opening = json.dumps(head, indent=1, ensure_ascii=False)
        handle.write((opening[: -len("\n}")] + ',\n "units": [').encode())
        for stats in unit_stats:
            entry = {**stats, "input": redact_url(stats["input"])}
            handle.write(((",\n  " if summed.units else "\n  ") + json.dumps(entry, ensure_ascii=False)).encode())
            summed.add(entry)
            first_unit = first_unit or [entry]
        status = "complete" if summed.units == units_planned else "incomplete"
        closing = {"totals": summed.totals(units_planned), "status": status, **(tail or {})}
        handle.write(("\n ],\n" + json.dumps(closing, indent=1, ensure_ascii=False)[len("{\n"):] + "\n").encode())
        validate_manifest({**head, "units": first_unit, **closing})
    return closing["totals"]


def read_runs(out: Location) -> list[dict[str, Any]]:
    """The records of every run so far (runs.json; outputs of older dr-gen keep them in dataset.json only)."""
    if out.exists(RUNS_FILE):
        return out.read_json(RUNS_FILE)["runs"]
    if out.exists(MANIFEST_FILE):
        return out.read_json(MANIFEST_FILE).get("runs", [])
    return []


def failures_bytes(failures: list[dict[str, Any]]) -> bytes:
    """A unit's failures file: one JSON record {"key", "reason", "detail"} per line."""
    return b"".join(json.dumps(f, ensure_ascii=False).encode() + b"\n" for f in failures)


def write_runs(out: Location, runs: list[dict[str, Any]]) -> None:
    out.write_json_atomic({"runs": runs}, RUNS_FILE)  # retried on transient errors (storage.retrying)


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Location, dict[str, Any]]:
    """The dataset folder and its validated manifest; a clear error when it is not a dr-gen dataset."""
    try:
        out = Location.from_url(url, storage_options)
        found = out.exists(MANIFEST_FILE)
    except ImportError as error:  # fsspec names the package its protocol needs
        raise DatasetError(f"{redact_url(url)}: {error_line(error, part='first')} (e.g. pip install 'dr-gen[s3]' for s3://, "
                           f"aiohttp for http(s)://)") from None
    except Exception as error:  # credentials, network, DNS: the folder cannot be read now
        raise DatasetError(f"{redact_url(url)}: cannot reach it ({type(error).__name__}: {error_line(error, part='first')}); "
                           f"check the URL, the network and the credentials") from None
    if not found:
        raise DatasetError(f"{redact_url(url)}: no {MANIFEST_FILE} here; is this a dr-gen output folder?")
    try:
        manifest = out.read_json(MANIFEST_FILE)
    except ValueError as error:  # truncated or hand-edited: a problem to report, not a crash
        raise DatasetError(f"{redact_url(url)}: {MANIFEST_FILE} is not valid JSON ({error})") from None
    validate_manifest(manifest)
    try:
        format_for(manifest["format"])
    except ConfigError as error:
        raise DatasetError(f"{redact_url(url)}: {MANIFEST_FILE}: {error}") from None
    return out, manifest
