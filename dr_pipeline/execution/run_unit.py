"""The Ray task of `dr-gen run`: produce and commit one unit (see runner.py for the data flow).

Imported by the unit tasks' worker processes only (runner.process_unit_task): torch, the views'
rendering and the models' input side, which the driver does without.
"""

from __future__ import annotations

from typing import Any, Iterator

import ray
import torch

from dr_pipeline.core.config import JobConfig
from dr_pipeline.core.records import FailureRecord, UnitStats
from dr_pipeline.dataset.manifest import layout_for
from dr_pipeline.dataset.plan import Unit
from dr_pipeline.dataset.sink import DataSink, UnitTaskContext
from dr_pipeline.execution.progress import UnitReporter
from dr_pipeline.execution.unit_tasks import model_results, storage_retried
from dr_pipeline.generate.columns import unit_columns
from dr_pipeline.generate.prepare import ViewBatch, caption_input_sizes, failure_record, prepare_unit


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
