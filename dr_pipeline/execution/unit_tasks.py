"""One Ray task per unit: how the driver runs them over the model actors, and what every unit task
shares, whether it writes a run's unit (runner) or an extension's sidecar (extend).

Driver: `run_unit_tasks` keeps at most `resources.cpu_workers` tasks in flight, each placed on
the node of the least loaded live model actor, hands a unit whose actor or node was lost to a
live one, and cancels the tasks in flight on Ctrl-C. Ray runs a task again when it fails with
an `OSError` (twice); inside, `storage_retried` redoes the unit on transient storage errors.
Task: `model_results` keeps a few batches queued on the actor, retries a failing batch, then
its rows one by one.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, TypeVar

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dr_pipeline.core.config import JobConfig, ResourcesConfig
from dr_pipeline.core.records import UnitStats
from dr_pipeline.core.errors import ConfigError, DatasetError, error_line
from dr_pipeline.core.storage import STORAGE_ATTEMPTS, backoff, count_retry, is_transient, storage_retries
from dr_pipeline.core.timing import StageClock
from dr_pipeline.dataset.manifest import StatsSum
from dr_pipeline.dataset.plan import Unit
from dr_pipeline.execution.model_actors import ModelActor, ModelActors
from dr_pipeline.execution.progress import POLL_SECONDS, ProgressTracker, RunProgress, start_tally

if TYPE_CHECKING:  # the driver imports this module and needs no torch: only the unit tasks do
    from dr_pipeline.generate.model_worker import BatchResult
    from dr_pipeline.generate.prepare import ViewBatch

T = TypeVar("T")


@dataclass
class RunSummary:
    """What one `dr-gen run` (or `--extend`) did, for the command's closing lines and exit code."""

    output: str
    units_planned: int
    units_skipped: int = 0
    units_done: int = 0
    samples: int = 0
    failures: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0  # until the model actors are up (Ray start, model load)
    units_failed: list[tuple[str, str]] = field(default_factory=list)
    # of units_failed, those that failed on bad input (ConfigError, DatasetError): rerunning cannot help
    units_refused: list[str] = field(default_factory=list)
    interrupted: bool = False  # stopped by Ctrl-C (SIGINT): units in flight were cancelled
    manifest_error: str | None = None  # the driver could not write dataset.json / runs.json (storage)


@contextlib.contextmanager
def ray_session(address: str | None, start_now: bool = True) -> Iterator[Callable[[], None]]:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray; reuse one already running.

    Yields `ray_up()`, which returns once Ray is up (raising what ray.init raised). With
    `start_now`, Ray starts at once in a thread, so that what the caller does meanwhile (take the
    output's lease, import the unit tasks' side) overlaps Ray's start; else at the first
    `ray_up()`, if any. A Ray started here is shut down on exit, also when the body failed while
    it was starting.
    """
    if ray.is_initialized():
        yield lambda: None
        return
    starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dr-gen-ray-start")
    init = functools.partial(ray.init, address=address, include_dashboard=False, log_to_driver=True,
                             logging_level="WARNING")
    starting: list[Future] = [starter.submit(init)] if start_now else []

    def ray_up() -> None:
        if not starting:
            starting.append(starter.submit(init))
        starting[0].result()

    try:
        yield ray_up
    finally:
        wait(starting)
        if ray.is_initialized():
            # From the thread that started it: from any other thread, Ray's driver shutdown waits
            # about 5 s more (1.4 s against 5.0 s on the 2-core VM).
            starter.submit(ray.shutdown).result()
        starter.shutdown()


def model_results(
    batches: Iterable[tuple[list[T], ViewBatch]], worker: Any, resources: ResourcesConfig, clock: StageClock
) -> Iterator[tuple[list[T], BatchResult | str]]:
    """Each batch through the model actor, in order, with `batches_in_flight` queued so the
    actor never waits on this CPU task. `items` are the batch's rows (samples or keys).

    A batch that fails is retried `max_batch_retries` times; then each of its rows is tried
    alone, so one sample the models cannot take costs only itself: a row that fails alone
    comes back as the error's line instead of a result.
    """
    in_flight: deque[tuple[list[T], Any, Any]] = deque()

    def attempt(result_ref: Any) -> BatchResult | str:
        try:
            with clock.stage("wait_for_models"):
                return ray.get(result_ref)
        except ray.exceptions.RayTaskError as error:
            return error_line(error, part="last")

    def finish_oldest() -> Iterator[tuple[list[T], BatchResult | str]]:
        items, batch_ref, result_ref = in_flight.popleft()
        result = attempt(result_ref)
        for _ in range(resources.max_batch_retries):
            if not isinstance(result, str):
                break
            result = attempt(worker.process.remote(batch_ref))
        if not isinstance(result, str) or len(items) == 1:
            yield items, result
            return
        batch = ray.get(batch_ref)
        alone = [worker.process.remote(batch.rows([row])) for row in range(len(items))]
        for item, result_ref in zip(items, alone):
            yield [item], attempt(result_ref)

    for items, batch in batches:
        batch_ref = ray.put(batch)
        in_flight.append((items, batch_ref, worker.process.remote(batch_ref)))
        while len(in_flight) >= resources.batches_in_flight:
            yield from finish_oldest()
    while in_flight:
        yield from finish_oldest()


def storage_retried(produce: Callable[..., UnitStats]) -> Callable[..., UnitStats]:
    """`produce` (it writes one unit and returns its stats), redone from scratch (with backoff, at
    most STORAGE_ATTEMPTS times) when a transient storage error escapes it, e.g. a connection
    dropped mid-shard; the stats returned (not the marker) count the storage retries of this unit."""
    @functools.wraps(produce)
    def produce_retrying(*args: Any) -> UnitStats:
        retries_before = storage_retries()
        for attempt in range(1, STORAGE_ATTEMPTS + 1):
            try:
                stats = produce(*args)
                break
            except Exception as error:
                if attempt == STORAGE_ATTEMPTS or not is_transient(error):
                    raise
            count_retry()
            backoff(attempt)
        return {**stats, "storage_retries": storage_retries() - retries_before}

    return produce_retrying


def unit_task(produce: Callable[..., UnitStats]) -> Any:
    """`produce(unit, *task_args, worker, tally)` as the Ray task `run_unit_tasks` runs: one CPU,
    run again by Ray when it fails with an OSError (twice)."""
    return ray.remote(num_cpus=1, max_retries=2, retry_exceptions=[OSError])(produce)


# Errors that say a unit's task or actor went away with its node or process, not that the unit failed.
LOST_WITH_THE_NODE = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                      ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError)
MAX_UNIT_MOVES = 3  # times a unit is handed to another actor after its actor or node was lost
CANCEL_SECONDS = 30.0  # after Ctrl-C, how long the units in flight get to stop


def run_unit_tasks(
    task: Any,
    units: Iterable[Unit],
    task_args: tuple,
    actors: ModelActors,
    job: JobConfig,
    summary: RunSummary,
    on_progress: Callable[[RunProgress], None] | None,
    on_submitted: Callable[[], None] | None = None,
) -> tuple[StatsSum, RunProgress]:
    """`task(unit, *task_args, actor, tally)` for every unit, at most resources.cpu_workers at
    once, each placed on the node of the least loaded live model actor. Committed units are
    counted into `summary`, failed ones go to summary.units_failed; a unit whose actor or node
    was lost is handed to a live actor (its redo is safe: sink.UnitSink.committed_stats). `on_progress` gets
    a snapshot about every POLL_SECONDS; `on_submitted` is called once the first tasks are
    submitted (at the end when there are none). Returns the sums over the stats this call
    committed and the last snapshot.

    The driver holds only the units in flight and running sums, never every unit's stats."""
    tally = start_tally()
    tracker = ProgressTracker(summary.units_planned, summary.units_skipped)
    written = StatsSum()
    progress = tracker.snapshot(0, 0)
    polled = time.monotonic()
    pending: dict[Any, tuple[Unit, ModelActor]] = {}
    moved: Counter[str] = Counter()
    retry: deque[Unit] = deque()
    queue = iter(units)
    unit = next(queue, None)

    def collect(ref: Any) -> None:
        """Count a finished unit task: committed, failed, or lost with its actor (moved on)."""
        done_unit, actor = pending.pop(ref)
        actor.units -= 1
        try:
            stats = ray.get(ref)
        except ray.exceptions.RayError as error:
            if summary.interrupted:
                return  # cancelled: neither done nor failed, the next run does it
            if isinstance(error, LOST_WITH_THE_NODE):
                actors.drop(actor)
                moved[done_unit.id] += 1
                if moved[done_unit.id] <= MAX_UNIT_MOVES:
                    retry.append(done_unit)
                    return
            summary.units_failed.append((done_unit.id, error_line(error, part="last")))
            if isinstance(error, (ConfigError, DatasetError)):  # a RayTaskError is also its cause's type
                summary.units_refused.append(done_unit.id)
            tracker.unit_failed()
            return
        written.add(stats)
        tracker.unit_done(stats)
        summary.units_done += 1
        summary.samples += stats["samples"]
        summary.failures += stats.get("failures", 0)

    try:
        while unit is not None or retry or pending:
            actors.watch(force=not pending)
            while (retry or unit is not None) and len(pending) < job.resources.cpu_workers:
                actor = actors.least_loaded()
                if actor is None:
                    break
                actor.units += 1
                if retry:
                    todo = retry.popleft()
                else:
                    todo, unit = unit, next(queue, None)
                strategy = NodeAffinitySchedulingStrategy(actor.node_id, soft=True)
                ref = task.options(scheduling_strategy=strategy).remote(todo, *task_args, actor.handle, tally)
                pending[ref] = (todo, actor)
            if on_submitted:
                on_submitted()
                on_submitted = None
            waiting = list(pending) or list(actors.starting)  # no live actor: wait for one to come up
            ready, _ = ray.wait(waiting, num_returns=1, timeout=POLL_SECONDS) if waiting else ([], [])
            for ref in ready:
                if ref in pending:
                    collect(ref)
            if time.monotonic() - polled >= POLL_SECONDS or not (unit is not None or retry or pending):
                polled = time.monotonic()
                progress = tracker.snapshot(*ray.get(tally.totals.remote()), actors=len(actors.live))
                if on_progress:
                    on_progress(progress)
    except KeyboardInterrupt:
        # Ctrl-C: cancel the units in flight (each removes its temp files as it stops) and
        # count those that committed meanwhile; the caller writes what is committed.
        summary.interrupted = True
        on_submitted = None
        for ref in pending:
            ray.cancel(ref)
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_SECONDS) if pending else ([], [])
        for ref in ready:
            collect(ref)
        progress = tracker.snapshot(*ray.get(tally.totals.remote()), actors=len(actors.live))
    if on_submitted:  # there was no unit to run
        on_submitted()
    return written, progress
