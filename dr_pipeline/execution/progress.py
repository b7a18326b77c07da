"""Live progress of a run, on one machine or a cluster, and the record of it kept in the manifest.

Unit tasks run anywhere in the cluster; after every batch they tell a small Ray
actor (`ProgressTally`) how many samples and failures their unit holds so far.
The driver polls it between unit completions. Counts are per unit and replaced,
not added, so a unit task that Ray retries starts again from zero and no sample
is counted twice.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dr_pipeline.core.records import UnitStats
from dr_pipeline.dataset.manifest import StatsSum

POLL_SECONDS = 0.5
REPORT_SECONDS = 1.0


class ProgressTally:
    """Runs as a Ray actor: each unit's latest (samples, failures), and their sums kept as they
    change, so a poll costs the same with 100 units or 100k."""

    def __init__(self) -> None:
        self.units: dict[str, tuple[int, int]] = {}
        self.samples = 0
        self.failures = 0

    def report(self, unit_id: str, samples: int, failures: int) -> None:
        before_samples, before_failures = self.units.get(unit_id, (0, 0))
        self.samples += samples - before_samples
        self.failures += failures - before_failures
        self.units[unit_id] = (samples, failures)

    def totals(self) -> tuple[int, int]:
        return self.samples, self.failures


class UnitReporter:
    """Task side: sends one unit's counts to the tally at most every REPORT_SECONDS (always when
    forced), so thousands of unit tasks in a cluster do not flood the one actor."""

    def __init__(self, tally: Any, unit_id: str):
        self.tally = tally
        self.unit_id = unit_id
        self.last = 0.0

    def __call__(self, samples: int, failures: int, force: bool = False) -> None:
        if self.tally is not None and (force or time.monotonic() - self.last >= REPORT_SECONDS):
            self.last = time.monotonic()
            self.tally.report.remote(self.unit_id, samples, failures)

    def finish(self, samples: int, failures: int) -> None:
        """The unit's final counts, in the tally before its task returns: the driver takes its
        last snapshot when the task's result arrives, and would otherwise miss them."""
        if self.tally is not None:
            ray.get(self.tally.report.remote(self.unit_id, samples, failures))


def start_tally() -> Any:
    """The tally actor; zero CPUs so it never waits for a slot, on the driver's node so it lives
    as long as the driver (a worker node may leave the cluster mid-run)."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(ProgressTally).options(scheduling_strategy=here).remote()


@dataclass
class RunProgress:
    """What a run has done so far, as the driver sees it."""

    units_planned: int
    units_skipped: int  # committed before this run
    units_done: int  # committed by this run
    units_failed: int
    samples: int  # written by this run, units in progress included
    failures: int
    seconds: float  # since the units started (model start-up excluded)
    eta_seconds: float | None
    actors: int = 0  # model actors in use now (elastic runs: nodes join and leave)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


class ProgressTracker:
    """Driver side: exact unit completions plus the tally's live counts; estimates the time left."""

    def __init__(self, units_planned: int, units_skipped: int):
        self.units_planned = units_planned
        self.units_skipped = units_skipped
        self.started = time.time()
        self.units_done = 0
        self.done_input_samples = 0
        self.units_failed = 0

    def unit_done(self, stats: UnitStats) -> None:
        self.units_done += 1
        self.done_input_samples += stats["input_samples"]

    def unit_failed(self) -> None:
        self.units_failed += 1

    def snapshot(self, samples: int, failures: int, actors: int = 0) -> RunProgress:
        seconds = time.time() - self.started
        done = self.units_done
        remaining_units = self.units_planned - self.units_skipped - done - self.units_failed
        eta = None
        read = samples + failures
        if done and read and seconds > 0:
            # input samples still to read (units not started at the mean size of the finished ones,
            # less what units in progress have read), at the rate input samples were read so far
            finished = self.done_input_samples
            left = remaining_units * finished / done - (read - finished)
            eta = max(left, 0.0) / (read / seconds)
        return RunProgress(self.units_planned, self.units_skipped, done, self.units_failed, samples, failures,
                           seconds, eta, actors)


def run_record(
    started_at: float, wall_seconds: float, startup_seconds: float, progress: RunProgress, written: StatsSum,
    actor_nodes: list[str], storage_retries: int = 0,
) -> dict[str, Any]:
    """This run's entry in the manifest's "runs": what it did, how fast, where the time went
    (seconds by stage summed over the units it wrote; stages of different units overlap in time)
    and where it ran (Ray node ids of the model actors, units written per node); `storage_retries`:
    transient storage errors retried by the driver and by the unit tasks that committed."""
    return {
        "started_at": datetime.datetime.fromtimestamp(started_at, datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(wall_seconds, 3),
        "startup_seconds": round(startup_seconds, 3),
        "units_written": written.units,
        "units_skipped": progress.units_skipped,
        "units_failed": progress.units_failed,
        "samples": written.samples,
        "failures": written.failures,
        "samples_per_second": round(written.samples / progress.seconds, 3) if progress.seconds > 0 else None,
        "unit_seconds": round(written.seconds, 3),
        "seconds_by_stage": {name: round(value, 3) for name, value in sorted(written.seconds_by_stage.items())},
        "actor_nodes": actor_nodes,
        "units_by_node": dict(sorted(written.units_by_node.items())),
        "storage_retries": storage_retries,
    }


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return str(datetime.timedelta(seconds=int(seconds)))


class ProgressDisplay:
    """A live rich bar in a terminal; without one (cluster job logs), a line every `log_seconds`
    and whenever the number of model actors changes (nodes joined or left)."""

    def __init__(self, console: Console, title: str, log_seconds: float = 30.0):
        self.console = console
        self.title = title
        self.log_seconds = log_seconds
        self._last_log = 0.0
        self._last_actors = 0
        self._bar: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> "ProgressDisplay":
        if self.console.is_terminal:
            self._bar = Progress(
                TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
                TextColumn("units"),
                TextColumn("{task.fields[line]}"), TimeElapsedColumn(), console=self.console,
                # what libraries print goes to the run's log (run_log), not through the bar onto the screen
                redirect_stdout=False, redirect_stderr=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.title, total=None, line="starting models")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    @staticmethod
    def line(progress: RunProgress) -> str:
        return (f"{progress.samples} samples, {progress.samples_per_second:.1f} samples/s, "
                f"{progress.failures} failures, ETA {_duration(progress.eta_seconds)}"
                + (f", {progress.actors} model actor{'s' if progress.actors > 1 else ''}" if progress.actors else ""))

    def update(self, progress: RunProgress) -> None:
        completed = progress.units_skipped + progress.units_done
        if self._bar is not None:
            self._bar.update(self._task, total=progress.units_planned, completed=completed, line=self.line(progress))
        elif time.time() - self._last_log >= self.log_seconds or progress.actors != self._last_actors:
            self._last_log = time.time()
            self._last_actors = progress.actors
            self.console.print(f"{self.title}: {completed}/{progress.units_planned} units, {self.line(progress)}",
                               markup=False, highlight=False, soft_wrap=True)
