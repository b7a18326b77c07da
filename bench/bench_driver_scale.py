"""The driver's memory and time with a large plan (default 100k units), without data or models.

Each phase is measured with tracemalloc: `peak` is the most Python memory the phase held
above what it started with, `held` what it still holds when done, plus wall seconds
(tracemalloc slows Python about twofold):

  plan      make_plan over N shard URLs, write plan.json, read it back (the plan stays held:
            the driver needs the unit list)
  resume    the committed units of the plan from N stats markers (one listing), the units left
  schedule  unit_tasks.run_unit_tasks over N units with the unit tasks faked: each returns its stats
            at once, so only the driver's own bookkeeping is measured (Ray's wait/get replaced)
  manifest  dataset.json streamed from N stats markers (manifest.write_manifest)

The markers live in an in-memory fsspec filesystem, made before anything is measured;
plan.json and dataset.json in a local temp folder.

    python bench/bench_driver_scale.py [--units 100000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
import tracemalloc
import types
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import ray
from fsspec.implementations.memory import MemoryFileSystem

from dr_pipeline.execution import unit_tasks
from dr_pipeline.core.config import JobConfig, parse_job
from dr_pipeline.dataset.manifest import StatsSum, committed_unit_ids, iter_unit_stats, manifest_head, write_manifest
from dr_pipeline.dataset.plan import Unit, make_plan, read_plan, write_plan
from dr_pipeline.core.storage import Location

CARDS = {
    "teachers": [{"embedding_dim": 768, "has_image": True, "has_text": True, "normalized": True}] * 2,
    "captioners": [{"input_size": 224}],
}
MB = 1024 * 1024


@dataclass
class Phase:
    name: str
    seconds: float
    peak_mb: float
    held_mb: float


def synthetic_job(units: int, output: str) -> JobConfig:
    """The DataCompDR-12M shape (two teachers, one captioner) over `units` shard URLs."""
    return parse_job({
        "input": {"urls": [f"s3://bucket/datacomp/{i:08d}.tar" for i in range(units)]},
        "output": {"url": output},
        "augmentation": {"num_views": 30},
        "teachers": [{"id": "vit_l_14_openai", "spec": "open_clip:ViT-L-14"},
                     {"id": "vit_l_14_datacomp", "spec": "open_clip:ViT-L-14"}],
        "captioners": [{"id": "coca", "spec": "open_clip:coca_ViT-L-14", "num_captions": 5}],
        "resources": {"actors": 8, "cpu_workers": 64},
    })


def unit_stats(unit: Unit, config_hash: str) -> dict[str, Any]:
    """A stats marker as process_unit writes it, for a unit of 12,500 samples."""
    def file(suffix: str, size: int) -> dict[str, Any]:
        return {"path": f"data/{unit.id}.{suffix}", "bytes": size, "sha256": uuid.uuid4().hex * 2}

    return {
        "id": unit.id, "input": unit.input, "node_id": "ab" * 28, "config_hash": config_hash,
        "input_samples": 12_500, "samples": 12_480, "failures": 20,
        "failures_by_reason": {"empty_text": 5, "undecodable_image": 15},
        "files": {"data": file("parquet", 1_400_000_000), "failures": file("failures.jsonl", 2_000)},
        "seconds": 3600.5,
        "seconds_by_stage": {"read": 20.0, "decode": 300.0, "augment": 900.0, "wait_for_models": 10.0,
                             "captioning": 1500.0, "teacher_forward": 800.0, "write": 60.0},
    }


def write_markers(markers: Location, units: list[Unit], config_hash: str) -> None:
    for unit in units:
        markers.fs.pipe_file(markers.join("data", f"{unit.id}.stats.json"), json.dumps(unit_stats(unit, config_hash)).encode())


class _PrivateMemoryFileSystem(MemoryFileSystem):
    """An in-memory filesystem with its own store (fsspec's is shared by the process), freed with it."""

    def __init__(self) -> None:
        super().__init__(skip_instance_cache=True)
        self.store: dict[str, Any] = {}
        self.pseudo_dirs = [""]


class _Ref:
    def __init__(self, value: Any):
        self.value = value


class _FakeTask:
    """Stands for a Ray remote function: `.options(...).remote(unit, ...)` returns the unit's stats at once."""

    def __init__(self, config_hash: str):
        self.config_hash = config_hash

    def options(self, **_: Any) -> "_FakeTask":
        return self

    def remote(self, unit: Unit, *_: Any) -> _Ref:
        return _Ref(unit_stats(unit, self.config_hash))


class _OneActor:
    """Stands for model_actors.ModelActors: one live actor on a node that never leaves."""

    def __init__(self) -> None:
        self.live = [unit_tasks.ModelActor("actor", "ab" * 28, None)]
        self.starting: dict[Any, Any] = {}

    def watch(self, force: bool = False) -> None:
        pass

    def least_loaded(self) -> unit_tasks.ModelActor:
        return self.live[0]


_FAKE_TALLY = types.SimpleNamespace(totals=types.SimpleNamespace(remote=lambda: _Ref((0, 0))))
_FAKE_RAY = types.SimpleNamespace(
    wait=lambda refs, num_returns, timeout: (refs[:num_returns], refs[num_returns:]),
    get=lambda ref: ref.value,
    exceptions=ray.exceptions,
)


@contextlib.contextmanager
def fake_unit_tasks() -> Iterator[None]:
    """unit_tasks' Ray calls answered at once (restored after), so the scheduling loop runs without Ray."""
    saved = unit_tasks.ray, unit_tasks.start_tally
    unit_tasks.ray, unit_tasks.start_tally = _FAKE_RAY, lambda: _FAKE_TALLY
    try:
        yield
    finally:
        unit_tasks.ray, unit_tasks.start_tally = saved


def measured(name: str, phases: list[Phase], work: Callable[[], Any]) -> Any:
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    started = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - started
    current, peak = tracemalloc.get_traced_memory()
    phases.append(Phase(name, seconds, (peak - before) / MB, (current - before) / MB))
    return result


def measure(units: int, folder: str) -> list[Phase]:
    """The four phases over a plan of `units` units, plan.json and dataset.json in `folder`."""
    job = synthetic_job(units, folder)
    out = Location.from_url(folder)
    markers = Location(_PrivateMemoryFileSystem(), "/markers")
    config_hash = job.output_hash()
    write_markers(markers, make_plan(job.input.url_list), config_hash)
    phases: list[Phase] = []
    tracemalloc.start()
    try:
        def plan() -> list[Unit]:
            write_plan(out, job, make_plan(job.input.url_list))
            return read_plan(out).units

        planned = measured("plan", phases, plan)

        def resume() -> list[Unit]:
            committed = committed_unit_ids(markers, planned)
            return [u for u in planned if u.id not in committed]

        left = measured("resume", phases, resume)
        assert not left
        summary = unit_tasks.RunSummary(output=folder, units_planned=units)
        with fake_unit_tasks():
            written: StatsSum = measured("schedule", phases, lambda: unit_tasks.run_unit_tasks(
                _FakeTask(config_hash), planned, (), _OneActor(), job, summary, None)[0])
        assert written.units == summary.units_done == units
        head = manifest_head(job, CARDS, "2025-01-01T00:00:00+00:00")
        totals = measured("manifest", phases, lambda: write_manifest(
            out, head, iter_unit_stats(markers, (u.id for u in planned)), units, {"runs": []}))
        assert totals["units_done"] == units
    finally:
        tracemalloc.stop()
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--units", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        phases = measure(args.units, folder)
        manifest_mb = Location.from_url(folder).fs.size(f"{folder}/dataset.json") / MB
    print(f"{args.units} units; dataset.json {manifest_mb:.1f} MB")
    for phase in phases:
        print(f"{phase.name:9s} {phase.seconds:7.2f} s   peak {phase.peak_mb:7.1f} MB   held {phase.held_mb:7.1f} MB")


if __name__ == "__main__":
    main()
