"""dataset.json: the one file that says what a dataset is.

It is rebuilt from the per-unit stats markers (the source of truth for what is
committed), so it can always be regenerated after a crash, and it is written
atomically, so readers see either the old or the new version.
"""

from __future__ import annotations

import datetime
import json
from collections import Counter
from typing import Any, Iterable

from dr_pipeline import __version__
from dr_pipeline.config import JobConfig
from dr_pipeline.errors import DatasetError
from dr_pipeline.plan import DATA_DIR, Unit
from dr_pipeline.schema import SCHEMA_VERSION, DatasetLayout, validate_manifest
from dr_pipeline.storage import Location, redact_url

MANIFEST_FILE = "dataset.json"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_unit_stats(out: Location, units: Iterable[Unit], folder: str = DATA_DIR) -> dict[str, dict[str, Any]]:
    """Stats of every committed unit of the plan (in `folder`: data, or a sidecar folder),
    keyed by unit id (one listing, batched reads)."""
    wanted = {u.id for u in units}
    present = out.fs.glob(out.join(folder, "*.stats.json"))
    paths = [p for p in present if p.rsplit("/", 1)[-1][: -len(".stats.json")] in wanted]
    if not paths:
        return {}
    contents = out.fs.cat(paths)
    stats = (json.loads(contents[p]) for p in paths)
    return {s["id"]: s for s in stats}


def totals(units_planned: int, unit_stats: Iterable[dict[str, Any]]) -> dict[str, Any]:
    by_reason: Counter[str] = Counter()
    summary = {"units_planned": units_planned, "units_done": 0, "input_samples": 0, "samples": 0, "failures": 0,
               "bytes": 0}
    for stats in unit_stats:
        summary["units_done"] += 1
        for name in ("input_samples", "samples", "failures"):
            summary[name] += stats[name]
        summary["bytes"] += sum(f["bytes"] for f in stats["files"].values())
        by_reason.update(stats["failures_by_reason"])
    summary["failures_by_reason"] = dict(sorted(by_reason.items()))
    return summary


def build_manifest(
    job: JobConfig,
    layout: DatasetLayout,
    cards: dict[str, list[dict[str, Any]]],
    units: list[Unit],
    unit_stats: dict[str, dict[str, Any]],
    created_at: str | None = None,
) -> dict[str, Any]:
    done = [unit_stats[u.id] for u in units if u.id in unit_stats]
    config = job.public_dump()
    config["input"]["urls"] = [redact_url(u) for u in job.input.url_list]
    config["output"]["url"] = redact_url(job.output.url)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "dr_gen_version": __version__,
        "status": "complete" if len(done) == len(units) else "incomplete",
        "format": job.output.format,
        "created_at": created_at or _now(),
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
        "units": [{**stats, "input": redact_url(stats["input"])} for stats in done],
        "totals": totals(len(units), done),
    }
    validate_manifest(manifest)
    return manifest


def write_manifest(out: Location, manifest: dict[str, Any]) -> None:
    out.write_json_atomic(manifest, MANIFEST_FILE)


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Location, dict[str, Any]]:
    """The dataset folder and its validated manifest; a clear error when it is not a dr-gen dataset."""
    out = Location.from_url(url, storage_options)
    if not out.exists(MANIFEST_FILE):
        raise DatasetError(f"{redact_url(url)}: no {MANIFEST_FILE} here; is this a dr-gen output folder?")
    manifest = out.read_json(MANIFEST_FILE)
    validate_manifest(manifest)
    return out, manifest
