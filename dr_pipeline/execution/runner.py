"""Execution on Ray: model actors, one CPU task per output unit, exactly-once commits.

Data flow per unit (one Ray task, placed on its actor's node):
    read shard -> decode -> params -> render views      (this task, CPU)
    -> ModelWorker.process (captions + embeddings)        (actor, GPU), a few batches in flight
    -> stream into a temp file -> rename -> failures -> stats marker (this task)
The driver only plans, hands units to tasks with a bound on how many run at
once, and rebuilds dataset.json from the stats markers.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, TypeVar

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dr_pipeline.core.config import JobConfig, ResourcesConfig
from dr_pipeline.core.errors import ConfigError, DatasetError, DrGenError, error_line
from dr_pipeline.core.records import FailureRecord, ModelCards, UnitStats
from dr_pipeline.sources.listing import list_shards
from dr_pipeline.execution.lease import OutputLease
from dr_pipeline.dataset.manifest import (
    MANIFEST_FILE,
    StatsSum,
    committed_unit_ids,
    failures_bytes,
    iter_unit_stats,
    manifest_head,
    read_runs,
    write_manifest,
    write_runs,
)
from dr_pipeline.execution.model_actors import ModelActor, ModelActors
from dr_pipeline.generate.model_worker import BatchResult, ModelWorker
from dr_pipeline.dataset.plan import DATA_DIR, Plan, Unit, check_plan_matches, make_plan, read_plan, write_plan
from dr_pipeline.generate.prepare import ViewBatch, caption_input_sizes, failure_record, prepare_unit
from dr_pipeline.execution.progress import POLL_SECONDS, ProgressTracker, RunProgress, UnitReporter, run_record, start_tally
from dr_pipeline.core.schema import CaptionerColumns, DatasetLayout, TeacherColumns
from dr_pipeline.core.storage import (
    STORAGE_ATTEMPTS, Location, backoff, count_retry, is_transient, redact_url, retrying, storage_retries,
)
from dr_pipeline.core.timing import StageClock
from dr_pipeline.dataset.formats import format_for, open_unit_writer
from dr_pipeline.generate.columns import unit_columns
from teachers import check_spec


T = TypeVar("T")


@dataclass
class RunSummary:
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


def check_job(job: JobConfig) -> None:
    """Everything that can be checked without loading a model or starting Ray."""
    format_for(job.output.format)
    for teacher in job.teachers:
        check_spec(teacher.spec, "teacher", teacher.options)
    for captioner in job.captioners:
        check_spec(captioner.spec, "captioner", captioner.options)


def _check_writable(out: Location) -> None:
    probe = ".dr-gen-write-probe"
    try:
        out.fs.makedirs(out.path, exist_ok=True)
        out.write_bytes_atomic(b"", probe)
        out.fs.rm(out.join(probe))
    except Exception as error:  # any backend error means the same thing to the user
        raise ConfigError(f"output {redact_url(out.url())} is not writable ({error_line(error, part='last')})") from None


def plan_output(job: JobConfig, overwrite: bool) -> tuple[Location, Plan]:
    """Validate the output folder and return the frozen plan (listing the input only on a first run)."""
    out = Location.from_url(job.output.url, job.output.storage_options)
    existing = read_plan(out) if out.exists() else None
    if existing and overwrite:
        OutputLease(out).refuse_if_held()  # never delete what another run is writing
        retrying(lambda: out.fs.rm(out.path, recursive=True))
        existing = None
    if existing:
        check_plan_matches(out, job, existing.config_hash)
        return out, existing
    shards = retrying(lambda: list_shards(job.input))
    _check_writable(out)
    return out, write_plan(out, job, make_plan(shards))


def layout_for(job: JobConfig, cards: ModelCards) -> DatasetLayout:
    return DatasetLayout(
        num_views=job.augmentation.num_views,
        embedding_dtype=job.output.embedding_dtype,
        teachers=tuple(
            TeacherColumns(t.id, card["embedding_dim"], card["has_image"], card["has_text"])
            for t, card in zip(job.teachers, cards["teachers"])
        ),
        captioners=tuple(CaptionerColumns(c.id, c.num_captions) for c in job.captioners),
    )


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
            if isinstance(result, BatchResult):
                break
            result = attempt(worker.process.remote(batch_ref))
        if isinstance(result, BatchResult) or len(items) == 1:
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


def with_storage_retries(produce: Callable[[], UnitStats]) -> UnitStats:
    """A unit's stats from `produce()`, which is redone from scratch (with backoff, at most
    STORAGE_ATTEMPTS times) when a transient storage error escapes it, e.g. a connection dropped
    mid-shard; the stats returned (not the marker) count the storage retries of this unit."""
    retries_before = storage_retries()
    for attempt in range(1, STORAGE_ATTEMPTS + 1):
        try:
            stats = produce()
            break
        except Exception as error:
            if attempt == STORAGE_ATTEMPTS or not is_transient(error):
                raise
        count_retry()
        backoff(attempt)
    return {**stats, "storage_retries": storage_retries() - retries_before}


def process_unit(unit: Unit, job: JobConfig, models: list[Any], worker: Any, tally: Any = None) -> UnitStats:
    """Ray task: produce and commit one unit, redone on transient storage errors; returns its stats."""
    return with_storage_retries(lambda: produce_unit(unit, job, models, worker, tally))


def produce_unit(unit: Unit, job: JobConfig, models: list[Any], worker: Any, tally: Any = None) -> UnitStats:
    """Produce and commit one unit; returns its stats (also written as the marker).

    `models` holds, unresolved, the ref of the model actors' `describe()`: the task starts (and
    imports) while the actors load their models, and waits for their cards only here.
    While it runs it reports the unit's counts so far to `tally` (a progress.ProgressTally actor).
    """
    torch.set_num_threads(1)
    started = time.time()
    out = Location.from_url(job.output.url, job.output.storage_options)
    if out.exists(unit.stats_file):  # committed by an earlier attempt whose node died before it returned
        return out.read_json(unit.stats_file)
    cards = ray.get(models[0])
    layout = layout_for(job, cards)
    caption_sizes = caption_input_sizes(cards)
    for path in (unit.data_file(job.output.format), unit.failures_file, unit.stats_file):
        out.remove_stale_temps(path)
    failures: list[FailureRecord] = []
    written = 0
    clock = StageClock()
    report_progress = UnitReporter(tally, unit.id)
    report_progress(0, 0, force=True)

    def view_batches() -> Iterator[tuple[list, ViewBatch]]:
        for prepared in prepare_unit(unit.input, job, caption_sizes, clock):
            failures.extend(prepared.failures)
            batch = prepared.view_batch()
            if batch is not None:
                yield prepared.samples, batch

    with open_unit_writer(out, unit.data_file(job.output.format), layout, job.output) as (writer, committed):
        for samples, result in model_results(view_batches(), worker, job.resources, clock):
            if isinstance(result, str):
                failures.extend(failure_record(s.source_key, "model_error", result) for s in samples)
                continue
            clock.add(result.seconds)
            with clock.stage("write"):
                writer.write(unit_columns(samples, result, layout))
            written += len(samples)
            report_progress(written, len(failures))
    failures_info = out.write_bytes_atomic(failures_bytes(failures), unit.failures_file)
    stats: UnitStats = {
        "id": unit.id,
        "input": unit.input,
        "node_id": ray.get_runtime_context().get_node_id(),
        "config_hash": job.output_hash(),
        "input_samples": written + len(failures),
        "samples": written,
        "failures": len(failures),
        "failures_by_reason": dict(sorted(Counter(f["reason"] for f in failures).items())),
        "files": {"data": committed[0].to_dict(), "failures": failures_info.to_dict()},
        "seconds": round(time.time() - started, 3),
        "seconds_by_stage": clock.rounded(),
    }
    out.write_json_atomic(stats, unit.stats_file)
    report_progress.finish(written, len(failures))
    return stats


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray; reuse one already running."""
    if ray.is_initialized():
        yield
        return
    ray.init(address=address, include_dashboard=False, log_to_driver=True, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


def start_actors(job: JobConfig, worker_class: type = ModelWorker, worker_arg: Any = None) -> ModelActors:
    """The model actors, `worker_class(worker_arg or job, use_gpu)` placed by the job's resources
    and spread over the cluster's nodes (unit tasks follow their actor, so the CPU work spreads
    too); returns at once, while they start and load their models (see ModelActors)."""
    return ModelActors.start(job, worker_class, worker_arg)


def started_cards(actors: ModelActors) -> ModelCards:
    """Wait for the first actors to be up; the cards of their models."""
    try:
        return actors.wait_started()
    except ray.exceptions.RayError as error:
        raise DrGenError(f"model actors failed to start: {error_line(error, part='last')}") from None


def manifest_cards(manifest: dict[str, Any]) -> ModelCards:
    """The teacher and captioner cards a manifest records, as `describe()` gives them."""
    return {kind: [entry["card"] for entry in manifest[kind]] for kind in ("teachers", "captioners")}


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
    was lost is handed to a live actor (its redo is safe: see process_unit). `on_progress` gets
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


def _committed_ids(out: Location, units: list[Unit]) -> Iterator[str]:
    """Ids of the committed units, in plan order (listed again: this run may have added some)."""
    committed = committed_unit_ids(out, units)
    return (u.id for u in units if u.id in committed)


def run_job(
    job: JobConfig,
    *,
    address: str | None = None,
    overwrite: bool = False,
    on_progress: Callable[[RunProgress], None] | None = None,
) -> RunSummary:
    """Run (or resume) a job; committed units are skipped, the manifest is rebuilt at the end.

    `on_progress` is called about every progress.POLL_SECONDS while units run; the manifest's
    "runs" gets one record per run that wrote units (progress.run_record).
    """
    started = time.time()
    check_job(job)
    out, plan = plan_output(job, overwrite)
    with OutputLease(out) as lease:
        return _run_planned(job, out, plan, started, address, on_progress, lease)


def _write_manifest_from_markers(
    out: Location, head: dict[str, Any], units: list[Unit], tail: dict[str, Any]
) -> None:
    """dataset.json from a fresh listing of the markers; streamed, so retried as a whole."""
    retrying(lambda: write_manifest(out, head, iter_unit_stats(out, _committed_ids(out, units)), len(units), tail))


def _run_planned(
    job: JobConfig, out: Location, plan: Plan, started: float, address: str | None,
    on_progress: Callable[[RunProgress], None] | None, lease: OutputLease,
) -> RunSummary:
    """run_job once the plan is fixed and this run holds the output's lease."""
    retries_at_start = storage_retries()

    def report_progress(progress: RunProgress) -> None:
        lease.check()
        if on_progress:
            on_progress(progress)

    units = plan.units
    for folder in ("", DATA_DIR):  # left by a killed run (between an object's copy and delete, on S3)
        out.remove_temps_in(folder)
    committed = committed_unit_ids(out, units)
    summary = RunSummary(output=out.url(), units_planned=len(units), units_skipped=len(committed))
    todo = [u for u in units if u.id not in committed]
    del committed
    if todo:
        _check_writable(out)  # storage may have turned read-only since the plan was written
    if not todo and out.exists(MANIFEST_FILE):
        previous = out.read_json(MANIFEST_FILE)
        if previous["status"] != "complete":  # killed after the last unit, before the manifest
            cards = manifest_cards(previous)
            head = manifest_head(job, layout_for(job, cards), cards, plan.created_at)
            del previous
            _write_manifest_from_markers(out, head, units, {"runs": read_runs(out)})
        summary.seconds = time.time() - started
        return summary
    with ray_session(address):
        # Unit tasks start while the actors load their models (their worker processes import
        # torch meanwhile); on a cluster of several nodes they wait for the actors' node ids.
        actors = start_actors(job)
        if not actors.live:
            started_cards(actors)
        runs = read_runs(out)
        head: dict[str, Any] = {}

        def write_started_manifest() -> None:
            """Once the models are up: the manifest with their cards (status incomplete)."""
            described = started_cards(actors)
            summary.startup_seconds = time.time() - started
            cards = {"teachers": described["teachers"], "captioners": described["captioners"]}
            head.update(manifest_head(job, layout_for(job, cards), cards, plan.created_at))
            with _storage_errors_noted(summary):
                _write_manifest_from_markers(out, head, units, {"runs": runs})

        unit_task = ray.remote(num_cpus=1, max_retries=2, retry_exceptions=[OSError])(process_unit)
        task_args = (job, [actors.first[0]])
        try:
            written, progress = run_unit_tasks(
                unit_task, todo, task_args, actors, job, summary, report_progress, write_started_manifest
            )
        finally:
            actors.close()
        del todo
        summary.seconds = time.time() - started
        retries = written.storage_retries + storage_retries() - retries_at_start
        runs.append(run_record(started, summary.seconds, summary.startup_seconds, progress, written,
                               actors.nodes_used, retries))
        if not head:  # interrupted before the models were up: nothing new to record
            return summary
        cards = manifest_cards(head)
        final_head = manifest_head(job, layout_for(job, cards), cards, plan.created_at)
        with _storage_errors_noted(summary):
            write_runs(out, runs)
            _write_manifest_from_markers(out, final_head, units, {"runs": runs})
    return summary


@contextlib.contextmanager
def _storage_errors_noted(summary: RunSummary) -> Iterator[None]:
    """The driver's own writes (dataset.json, runs.json): a storage error is reported with the
    units' outcome (summary.manifest_error) instead of ending the run with a traceback; the
    units' markers are the truth and the next run writes the manifest again."""
    try:
        yield
    except OSError as error:
        summary.manifest_error = f"dataset.json not updated: {type(error).__name__}: {error_line(error, part='last')}"
