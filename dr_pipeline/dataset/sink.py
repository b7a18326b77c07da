"""The commit protocol of a dataset's units: one sink that `dr-gen run` and `--extend` both write through.

A run (or an extension) writes its units through a sink in three steps, as Ray Data's `Datasink`
does (on_write_start, write, on_write_complete):

- `start` (the driver, holding the output's lease, before any unit task): temp files a killed
  run left are removed, and the units still to write are listed (a unit whose stats marker
  exists is committed and skipped);
- `write_unit` (one unit task): the unit's data file streams into a temp file renamed into
  place once complete, then its failures file, then its stats marker, last: the marker's
  presence is what says the unit is committed, so a unit killed at any instant is redone
  from scratch by the next run, and a task redone after its marker returns the marker;
- `write_manifest` / `finish` (the driver): dataset.json rebuilt from the markers, the one place
  it is written, and the runs' records in runs.json.

`DataSink` writes a run's units (OUT/data/); `SidecarSink` an extension's sidecar files
(OUT/sidecars/<extension>/, no failures file: an extension drops no row). A sink holds only
settings, so each unit task builds its own.
"""

from __future__ import annotations

import posixpath
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from dr_pipeline.core.config import OutputConfig
from dr_pipeline.core.records import FailureRecord, UnitStats
from dr_pipeline.core.schema import DatasetLayout
from dr_pipeline.core.storage import Location, retrying
from dr_pipeline.core.timing import StageClock
from dr_pipeline.dataset.manifest import (
    STATS_SUFFIX,
    committed_unit_ids,
    iter_unit_stats,
    write_manifest,
    write_runs,
)
from dr_pipeline.dataset.plan import DATA_DIR, Unit
from dr_pipeline.dataset.sidecars import SidecarLayout, sidecar_folder
from dr_pipeline.dataset.formats import format_for, open_unit_writer
from dr_pipeline.dataset.manifest import failures_bytes


@dataclass
class UnitTaskContext:
    """What a unit's marker records of the task that wrote it: its node, its start, its time per stage."""

    node_id: str | None
    clock: StageClock = field(default_factory=StageClock)
    started: float = field(default_factory=time.time)


class UnitSink:
    """The units of one folder of the dataset at `output.url` (see the module docstring)."""

    folder: str
    keeps_failures: bool  # whether a unit has a failures file (and failures_by_reason in its marker)

    def __init__(self, output: OutputConfig):
        self.output = output
        self.out = Location.from_url(output.url, output.storage_options)

    def data_file(self, unit_id: str) -> str:
        return posixpath.join(self.folder, f"{unit_id}.{format_for(self.output.format).suffix}")

    def failures_file(self, unit_id: str) -> str:
        return posixpath.join(self.folder, f"{unit_id}.failures.jsonl")

    def stats_file(self, unit_id: str) -> str:
        """Written last: its presence marks the unit as committed."""
        return posixpath.join(self.folder, unit_id + STATS_SUFFIX)

    def _unit_files(self, unit_id: str) -> list[str]:
        failures = [self.failures_file(unit_id)] if self.keeps_failures else []
        return [self.data_file(unit_id), *failures, self.stats_file(unit_id)]

    def _marker_identity(self, unit: Unit, node_id: str | None) -> dict[str, Any]:
        """The marker's fields between the unit's id and its counts."""
        raise NotImplementedError

    # ------------------------------------------------------------------ driver, before the units

    def start(self, units: list[Unit]) -> list[Unit]:
        """The units still to write. Removes first the temp files a killed run left (beside
        dataset.json and in this sink's folder; on S3, between an object's copy and delete):
        only the holder of the output's lease may call it, a live writer's temps look the same."""
        for folder in ("", self.folder):
            self.out.remove_temps_in(folder)
        return self.pending(units)

    def pending(self, units: list[Unit]) -> list[Unit]:
        """The units of the plan without a stats marker, in plan order (one fresh listing)."""
        committed = committed_unit_ids(self.out, units, self.folder)
        return [u for u in units if u.id not in committed]

    # ------------------------------------------------------------------ unit task

    def committed_stats(self, unit_id: str) -> UnitStats | None:
        """The unit's marker when it is committed: a task Ray runs again after an attempt that
        committed (its node died before it returned) returns it and rewrites nothing."""
        marker = self.stats_file(unit_id)
        return self.out.read_json(marker) if self.out.exists(marker) else None

    def write_unit(
        self, unit: Unit, layout: DatasetLayout | SidecarLayout, rows: Iterable[dict[str, Any]],
        failures: list[FailureRecord], task: UnitTaskContext,
    ) -> UnitStats:
        """Commit one unit: `rows` (column name -> values, one dict per batch) into its data file,
        then `failures` (complete once `rows` is exhausted) into its failures file, then its
        marker. Returns the unit's stats, as the marker holds them."""
        for path in self._unit_files(unit.id):  # left by an attempt killed on this unit
            self.out.remove_stale_temps(path)
        written = 0
        with open_unit_writer(self.out, self.data_file(unit.id), layout, self.output) as (writer, committed):
            for columns in rows:
                with task.clock.stage("write"):
                    writer.write(columns)
                written += len(columns["key"])
        files = {"data": committed[0].to_dict()}
        counts: dict[str, Any] = {"input_samples": written + len(failures), "samples": written, "failures": len(failures)}
        if self.keeps_failures:
            failures_info = self.out.write_bytes_atomic(failures_bytes(failures), self.failures_file(unit.id))
            files["failures"] = failures_info.to_dict()
            counts["failures_by_reason"] = dict(sorted(Counter(f["reason"] for f in failures).items()))
        stats = {
            "id": unit.id,
            **self._marker_identity(unit, task.node_id),
            **counts,
            "files": files,
            "seconds": round(time.time() - task.started, 3),
            "seconds_by_stage": task.clock.rounded(),
        }
        self.out.write_json_atomic(stats, self.stats_file(unit.id))
        return stats

    # ------------------------------------------------------------------ driver, after the units

    def write_manifest(
        self, head: dict[str, Any], units: list[Unit], runs: list[dict[str, Any]],
        extensions: list[dict[str, Any]] | None = None,
    ) -> None:
        """dataset.json: `head` (manifest.manifest_head), an entry per committed unit of the plan
        from a fresh listing of the markers, then `extensions` (each a SidecarLayout's dict) and
        `runs`. The only writer of dataset.json; streamed, so retried as a whole."""
        tail = {"extensions": extensions} if extensions else {}
        sidecars = [extension["extension"] for extension in extensions or []]
        retrying(lambda: write_manifest(
            self.out, head, self._manifest_units(units, sidecars), len(units), {**tail, "runs": runs}))

    def _manifest_units(self, units: list[Unit], sidecars: list[str]) -> Iterator[dict[str, Any]]:
        """Each committed unit's marker, in plan order, with the data file of each sidecar added to
        its files (every sidecar holds every unit: an extension is listed once it is complete)."""
        committed = committed_unit_ids(self.out, units)
        unit_ids = [u.id for u in units if u.id in committed]
        sidecar_stats = [iter_unit_stats(self.out, unit_ids, sidecar_folder(name)) for name in sidecars]
        for stats, *added in zip(iter_unit_stats(self.out, unit_ids), *sidecar_stats):
            if added:
                stats["files"] = {**stats["files"], **{name: s["files"]["data"] for name, s in zip(sidecars, added)}}
            yield stats

    def finish(
        self, head: dict[str, Any], units: list[Unit], runs: list[dict[str, Any]],
        extensions: list[dict[str, Any]] | None = None,
    ) -> None:
        """At the end of a run: every run's record in runs.json, then dataset.json."""
        write_runs(self.out, runs)
        self.write_manifest(head, units, runs, extensions)


class DataSink(UnitSink):
    """A run's units: OUT/data/UNIT.parquet|tar, UNIT.failures.jsonl, UNIT.stats.json."""

    folder = DATA_DIR
    keeps_failures = True

    def __init__(self, output: OutputConfig, config_hash: str):
        super().__init__(output)
        self.config_hash = config_hash

    def _marker_identity(self, unit: Unit, node_id: str | None) -> dict[str, Any]:
        return {"input": unit.input, "node_id": node_id, "config_hash": self.config_hash}


class SidecarSink(UnitSink):
    """One extension's sidecar units: OUT/sidecars/EXTENSION/UNIT.parquet|tar, UNIT.stats.json
    (key and the new columns; never the images, which the units' own files hold)."""

    keeps_failures = False

    def __init__(self, output: OutputConfig, extension: str):
        super().__init__(output.model_copy(update={"keep_images": False}))
        self.extension = extension
        self.folder = sidecar_folder(extension)

    def _marker_identity(self, unit: Unit, node_id: str | None) -> dict[str, Any]:
        return {"extension": self.extension, "node_id": node_id}
