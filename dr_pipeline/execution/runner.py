"""`dr-gen run`: plan a job's output, run one Ray task per unit over the model actors, commit each unit.

Data flow per unit (one Ray task, placed on its actor's node):
    read shard -> decode -> params -> render views      (this task, CPU)
    -> ModelWorker.process (captions + embeddings)        (actor, GPU), a few batches in flight
    -> DataSink.write_unit: temp file -> rename -> failures -> stats marker (this task)
The driver only plans, hands units to tasks with a bound on how many run at once
(unit_tasks.run_unit_tasks), and has the sink rebuild dataset.json from the stats markers.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import ray
import torch

from dr_pipeline.core.config import JobConfig
from dr_pipeline.core.records import FailureRecord, UnitStats
from dr_pipeline.core.errors import ConfigError, error_line
from dr_pipeline.core.storage import Location, redact_url, retrying, storage_retries
from dr_pipeline.dataset.manifest import MANIFEST_FILE, layout_for, manifest_cards, manifest_head, read_runs
from dr_pipeline.dataset.plan import Plan, Unit, check_plan_matches, make_plan, read_plan, write_plan
from dr_pipeline.dataset.sink import DataSink, UnitTaskContext
from dr_pipeline.generate.columns import unit_columns
from dr_pipeline.execution.lease import OutputLease
from dr_pipeline.execution.model_actors import ModelActors
from dr_pipeline.execution.progress import RunProgress, UnitReporter, run_record
from dr_pipeline.execution.unit_tasks import (
    RunSummary, model_results, ray_session, run_unit_tasks, storage_retried, unit_task,
)
from dr_pipeline.generate.model_worker import ModelWorker, check_job
from dr_pipeline.generate.prepare import ViewBatch, caption_input_sizes, failure_record, prepare_unit
from dr_pipeline.sources.listing import list_shards


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


@storage_retried
def process_unit(unit: Unit, job: JobConfig, models: list[Any], worker: Any, tally: Any = None) -> UnitStats:
    """Ray task: produce and commit one unit through the DataSink; returns its stats (also
    written as the marker).

    `models` holds, unresolved, the ref of the model actors' `describe()`: the task starts (and
    imports) while the actors load their models, and waits for their cards only here.
    While it runs it reports the unit's counts so far to `tally` (a progress.ProgressTally actor).
    """
    torch.set_num_threads(1)
    task = UnitTaskContext(ray.get_runtime_context().get_node_id())
    sink = DataSink(job.output, job.output_hash())
    if (committed := sink.committed_stats(unit.id)) is not None:
        return committed
    cards = ray.get(models[0])
    layout = layout_for(job, cards)
    caption_sizes = caption_input_sizes(cards)
    failures: list[FailureRecord] = []
    report_progress = UnitReporter(tally, unit.id)
    report_progress(0, 0, force=True)

    def view_batches() -> Iterator[tuple[list, ViewBatch]]:
        for prepared in prepare_unit(unit.input, job, caption_sizes, task.clock):
            failures.extend(prepared.failures)
            batch = prepared.view_batch()
            if batch is not None:
                yield prepared.samples, batch

    def rows() -> Iterator[dict[str, Any]]:
        written = 0
        for samples, result in model_results(view_batches(), worker, job.resources, task.clock):
            if isinstance(result, str):
                failures.extend(failure_record(s.source_key, "model_error", result) for s in samples)
                continue
            task.clock.add(result.seconds)
            with task.clock.stage("write"):
                columns = unit_columns(samples, result, layout)
            yield columns
            written += len(samples)
            report_progress(written, len(failures))

    stats = sink.write_unit(unit, layout, rows(), failures, task)
    report_progress.finish(stats["samples"], stats["failures"])
    return stats


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
    sink = DataSink(job.output, job.output_hash())
    todo = sink.start(units)
    summary = RunSummary(output=out.url(), units_planned=len(units), units_skipped=len(units) - len(todo))
    if todo:
        _check_writable(out)  # storage may have turned read-only since the plan was written
    if not todo and out.exists(MANIFEST_FILE):
        previous = out.read_json(MANIFEST_FILE)
        if previous["status"] != "complete":  # killed after the last unit, before the manifest
            head = manifest_head(job, manifest_cards(previous), plan.created_at)
            del previous
            sink.write_manifest(head, units, read_runs(out))
        summary.seconds = time.time() - started
        return summary
    with ray_session(address):
        # Unit tasks start while the actors load their models (their worker processes import
        # torch meanwhile); on a cluster of several nodes they wait for the actors' node ids.
        actors = ModelActors.start(job, ModelWorker)
        if not actors.live:
            actors.wait_started()
        runs = read_runs(out)
        cards: dict[str, Any] = {}

        def write_started_manifest() -> None:
            """Once the models are up: the manifest with their cards (status incomplete)."""
            described = actors.wait_started()
            summary.startup_seconds = time.time() - started
            cards.update(teachers=described["teachers"], captioners=described["captioners"])
            with _storage_errors_noted(summary):
                sink.write_manifest(manifest_head(job, cards, plan.created_at), units, runs)

        task_args = (job, [actors.first[0]])
        try:
            written, progress = run_unit_tasks(
                unit_task(process_unit), todo, task_args, actors, job, summary, report_progress, write_started_manifest
            )
        finally:
            actors.close()
        del todo
        summary.seconds = time.time() - started
        retries = written.storage_retries + storage_retries() - retries_at_start
        runs.append(run_record(started, summary.seconds, summary.startup_seconds, progress, written,
                               actors.nodes_used, retries))
        if not cards:  # interrupted before the models were up: nothing new to record
            return summary
        with _storage_errors_noted(summary):
            sink.finish(manifest_head(job, cards, plan.created_at), units, runs)
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
