"""`dr-gen run`: plan a job's output, run one Ray task per unit over the model actors, commit each unit.

Data flow per unit (one Ray task, placed on its actor's node):
    read shard -> decode -> params -> render views      (this task, CPU)
    -> ModelWorker.process (captions + embeddings)        (actor, GPU), a few batches in flight
    -> DataSink.write_unit: temp file -> rename -> failures -> stats marker (this task)
The driver only plans, hands units to tasks with a bound on how many run at once
(unit_tasks.run_unit_tasks), and has the sink rebuild dataset.json from the stats markers.

Start-up, the part a newcomer waits for: the driver imports neither torch nor a model library
(the job's checks read no model; the unit task and the actors' worker class are named, and
imported by the processes that run them); Ray starts in a thread while the driver takes the
output's lease, and the model actors are created the moment Ray is up, so that their processes
import torch and build the models while the unit tasks start.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

from dr_pipeline.core.config import JobConfig
from dr_pipeline.core.errors import ConfigError, error_line
from dr_pipeline.core.records import UnitStats
from dr_pipeline.core.storage import Location, redact_url, retrying, storage_retries
from dr_pipeline.dataset.manifest import MANIFEST_FILE, manifest_cards, manifest_head, read_runs
from dr_pipeline.dataset.plan import Plan, check_plan_matches, make_plan, read_plan, write_plan
from dr_pipeline.dataset.sink import DataSink
from dr_pipeline.execution.lease import OutputLease
from dr_pipeline.execution.model_actors import ModelActors
from dr_pipeline.execution.progress import RunProgress, run_record
from dr_pipeline.execution.unit_tasks import RunSummary, ray_session, run_unit_tasks, unit_task
from dr_pipeline.generate.job_check import check_job
from dr_pipeline.sources.listing import list_shards


MODEL_WORKER = "dr_pipeline.generate.model_worker:ModelWorker"
"""The model actors' worker class, imported by the actors' processes only (it imports torch)."""


def process_unit_task(*args: Any) -> UnitStats:
    """The unit task: run_unit.process_unit, imported by the task's worker process only (with
    torch and the views' rendering, which the driver does without)."""
    from dr_pipeline.execution.run_unit import process_unit  # noqa: PLC0415

    return process_unit(*args)


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
    sink = DataSink(job.output, job.output_hash())
    # Ray starts now (in a thread) unless the output is finished; the lease outlives Ray, whose
    # shutdown stops any unit task still writing.
    models_needed = bool(sink.pending(plan.units)) or not out.exists(MANIFEST_FILE)
    lease = OutputLease(out)
    try:
        with ray_session(address, start_now=models_needed) as ray_up:
            lease.acquire()
            return _run_planned(job, out, plan, sink, started, ray_up, on_progress, lease)
    finally:
        lease.release()


def _run_planned(
    job: JobConfig, out: Location, plan: Plan, sink: DataSink, started: float, ray_up: Callable[[], None],
    on_progress: Callable[[RunProgress], None] | None, lease: OutputLease,
) -> RunSummary:
    """run_job once the plan is fixed and this run holds the output's lease; Ray may be starting."""
    retries_at_start = storage_retries()

    def report_progress(progress: RunProgress) -> None:
        lease.check()
        if on_progress:
            on_progress(progress)

    units = plan.units
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
    ray_up()
    # Unit tasks start while the actors load their models (their worker processes import
    # torch meanwhile); on a cluster of several nodes they wait for the actors' node ids.
    actors = ModelActors.start(job, MODEL_WORKER)
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
            unit_task(process_unit_task), todo, task_args, actors, job, summary, report_progress, write_started_manifest
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
