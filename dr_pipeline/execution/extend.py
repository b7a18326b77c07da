"""`dr-gen run JOB --extend OUT`: add the teachers and captioners OUT lacks, as sidecar files.

Nothing OUT holds is recomputed or rewritten. JOB names OUT's input, seed, augmentation and
output form (they must match) and any teachers and captioners: those OUT has are skipped
(their settings must match too), the others are added after OUT's, in JOB's order.

Per unit of OUT's plan, one Ray task reads the unit's rows back (keys, texts, captions,
stored augmentation parameters), takes each original image from the row when OUT keeps
images and otherwise from the input shard OUT's plan names (checked by sha256), decodes it,
replays the stored views with augment.render_view (never resampling), and hands them to the
model actors. These hold only what the extension needs: the new captioners caption (seeded
by key and captioner as in any run); the new teachers embed the views and every text row
(the real caption, OUT's synthetic captions, the new ones); OUT's teachers embed only the new
captions. The result is the dataset a run with the combined job would have written.

Commit protocol as for base units, through the same sink (sink.SidecarSink): a sidecar file is
written under a temp name and renamed, its stats marker last; a rerun skips committed sidecar
units. When every unit is committed, dataset.json is rewritten atomically (combined config,
cards, layout and text_rows, the sidecar files per unit, the extension's columns), so readers
see the dataset before or after the extension, never between. A run killed at any point and
rerun ends with the same files.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import ray
import torch

from dr_pipeline.core.config import JobConfig, parse_job
from dr_pipeline.core.records import ModelCards, UnitStats
from dr_pipeline.core.errors import ConfigError, DrGenError
from dr_pipeline.core.schema import DatasetLayout, storage_columns
from dr_pipeline.core.storage import Location, redact_url
from dr_pipeline.core.timing import StageClock
from dr_pipeline.dataset.manifest import manifest_cards, manifest_head, read_manifest, read_runs
from dr_pipeline.dataset.plan import Unit, read_plan
from dr_pipeline.dataset.sidecars import SidecarColumn, SidecarLayout, sidecar_folder
from dr_pipeline.dataset.sink import SidecarSink, UnitTaskContext
from dr_pipeline.execution.lease import OutputLease
from dr_pipeline.execution.model_actors import ModelActors
from dr_pipeline.execution.progress import RunProgress, UnitReporter, run_record
from dr_pipeline.execution.unit_tasks import (
    RunSummary, model_results, ray_session, run_unit_tasks, storage_retried, unit_task,
)
from dr_pipeline.generate.job_check import check_job
from dr_pipeline.generate.model_worker import ModelWorker
from dr_pipeline.generate.prepare import PreparedBatch, ViewBatch, caption_input_sizes
from dr_pipeline.read.reader import ReinforcedDataset
from dr_pipeline.read.replay import unit_rows_with_images
from dr_pipeline.views.decode import decode_image

_FIXED = ("seed", "input", "output", "augmentation")  # what an extension cannot change


@dataclass(frozen=True)
class Extension:
    """What one extension adds to a dataset."""

    id: str  # its sidecar folder name: a sequence number and a digest of what it adds to what
    job: JobConfig  # the dataset once extended: OUT's config with the new teachers and captioners
    teachers: tuple[str, ...]  # ids of the new teachers
    captioners: tuple[str, ...]  # ids of the new captioners
    base_layout: DatasetLayout  # OUT's columns before the extension
    models: JobConfig  # what the model actors load: the new models, and OUT's text teachers for new captions

    @property
    def new_captions(self) -> int:
        return sum(c.num_captions for c in self.job.captioners if c.id in self.captioners)


def _first_difference(ours: Any, theirs: Any, path: str = "") -> tuple[str, str, str] | None:
    """(dotted path, our value, their value) of the first setting where two config dicts differ."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for key in sorted(ours.keys() | theirs.keys()):
            found = _first_difference(ours.get(key), theirs.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    return None if ours == theirs else (path, json.dumps(ours), json.dumps(theirs))


def _not_the_dataset(difference: tuple[str, str, str]) -> str:
    path, job_value, dataset_value = difference
    return f"{path} is {job_value} in the job, {dataset_value} in the dataset"


def _fixed_part(job: JobConfig) -> dict[str, Any]:
    """The content-defining settings an extension must share with the dataset (input URLs as recorded)."""
    data = {key: value for key, value in job.output_defining().items() if key in _FIXED}
    data["input"]["urls"] = [redact_url(url) for url in job.input.url_list]
    return data


def _defining(entry: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in entry.items() if key not in ("batch_size", "precision")}


def _merged(recorded: list[dict[str, Any]], listed: list, kind: str) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    """The dataset's entries (the job's copy where it lists one, for its batch size and
    precision), then the job's new ones; and the ids of the new ones."""
    by_id = {entry.id: entry.model_dump(mode="json") for entry in listed}
    merged = []
    for entry in recorded:
        mine = by_id.pop(entry["id"], entry)
        difference = _first_difference(_defining(mine), _defining(entry))
        if difference:
            message = _not_the_dataset(difference)
            raise ConfigError(f"{kind} {entry['id']!r} is already in the dataset with other settings: {message}")
        merged.append(mine)
    return merged + list(by_id.values()), tuple(by_id)


def plan_extension(job: JobConfig, manifest: dict[str, Any]) -> Extension | None:
    """What JOB adds to the dataset of `manifest`, or None when it adds nothing; a ConfigError
    when JOB does not describe the same dataset (seed, input, augmentation, output form)."""
    recorded = manifest["config"]
    difference = _first_difference(_fixed_part(job), _fixed_part(parse_job(recorded, "dataset.json")))
    if difference:
        raise ConfigError(f"--extend only adds teachers and captioners, but {_not_the_dataset(difference)}")
    teachers, new_teachers = _merged(recorded["teachers"], job.teachers, "teacher")
    captioners, new_captioners = _merged(recorded["captioners"], job.captioners, "captioner")
    if not new_teachers and not new_captioners:
        return None
    extended = parse_job({**job.model_dump(mode="json"), "teachers": teachers, "captioners": captioners}, job.name)
    added = {
        "dataset": manifest["config_hash"],
        "teachers": [_defining(t) for t in teachers if t["id"] in new_teachers],
        "captioners": [_defining(c) for c in captioners if c["id"] in new_captioners],
    }
    digest = hashlib.sha256(json.dumps(added, sort_keys=True).encode()).hexdigest()[:8]
    base_layout = DatasetLayout.from_dict(manifest["layout"])
    text_teachers = {t.id for t in base_layout.teachers if t.has_text} if new_captioners else set()
    models = extended.model_copy(update={
        "teachers": [t for t in extended.teachers if t.id in new_teachers or t.id in text_teachers],
        "captioners": [c for c in extended.captioners if c.id in new_captioners],
    })
    return Extension(
        id=f"{len(manifest.get('extensions', [])) + 1:02d}-{digest}",
        job=extended,
        teachers=new_teachers,
        captioners=new_captioners,
        base_layout=base_layout,
        models=models,
    )


def sidecar_layout(extension: Extension, cards: ModelCards) -> SidecarLayout:
    """The columns the extension writes, from the new models' cards."""
    base = extension.base_layout
    num_texts = base.num_texts + extension.new_captions
    columns = []
    for card in cards["teachers"]:
        if card["has_image"]:
            columns.append(SidecarColumn(card["id"], "image", "add", base.num_views, card["embedding_dim"]))
        if card["has_text"]:
            columns.append(SidecarColumn(card["id"], "text", "add", num_texts, card["embedding_dim"]))
    for captioner in extension.job.captioners:
        if captioner.id in extension.captioners:
            columns.append(SidecarColumn(captioner.id, "captions", "add", captioner.num_captions))
    if extension.new_captions:
        for teacher in base.teachers:
            if teacher.has_text:
                columns.append(SidecarColumn(teacher.id, "text", "append_rows", extension.new_captions, teacher.dim))
    return SidecarLayout(extension.id, base.embedding_dtype, tuple(columns))


@dataclass
class ExtensionBatch(ViewBatch):
    """A ViewBatch (views empty when no new teacher sees images) with the synthetic captions the
    rows already have, in text_rows order."""

    captions: list[list[str]]


class ExtensionWorker(ModelWorker):
    """A model actor that runs one extension's models (see `Extension.models`)."""

    def __init__(self, extension: Extension, use_gpu: bool):
        super().__init__(extension.models, use_gpu)
        self.new_teachers = set(extension.teachers)

    def teacher_inputs(
        self, batch: ExtensionBatch, views: torch.Tensor, added: list[list[str]]
    ) -> Iterator[tuple[torch.Tensor, list[list[str]]]]:
        """A new teacher embeds the views and every text row (the real caption, the dataset's
        captions, the new ones); the dataset's teachers lack only the new captions."""
        every_text = [[text, *known, *new] for text, known, new in zip(batch.texts, batch.captions, added)]
        return (
            (views, every_text) if config.id in self.new_teachers else (views[:, :0], added)
            for config in self.job.teachers
        )


def _extension_batches(
    rows: Iterator[dict[str, Any]], extension: Extension, with_views: bool,
    caption_sizes: tuple[int, ...], clock: StageClock,
) -> Iterator[tuple[list[str], ExtensionBatch]]:
    job = extension.job
    known_captioners = [c.column for c in extension.base_layout.captioners]
    prepared, chosen = PreparedBatch(), []

    def batch() -> tuple[list[str], ExtensionBatch]:
        keys = [row["key"] for row in chosen]
        captions = [[text for column in known_captioners for text in row[column]] for row in chosen]
        texts = [row["text"] for row in chosen]
        return keys, ExtensionBatch(keys, texts, captions=captions, **prepared.stacked_views())

    for row in clock.timed("read", rows):
        with clock.stage("decode"):
            pixels = decode_image(row["image"], job.input.max_image_pixels)
        with clock.stage("augment"):
            prepared.add_views(pixels, row["aug"] if with_views else [], caption_sizes, job.augmentation)
        chosen.append(row)
        if len(chosen) >= job.resources.batch_size:
            yield batch()
            prepared, chosen = PreparedBatch(), []
    if chosen:
        yield batch()


@storage_retried
def extend_unit(
    unit: Unit, extension: Extension, sidecar: SidecarLayout, caption_sizes: tuple[int, ...], worker: Any,
    tally: Any = None,
) -> UnitStats:
    """Ray task: write and commit one unit's sidecar file through the SidecarSink; returns its
    stats (also the marker). Reports its rows so far to `tally` (progress.ProgressTally)."""
    torch.set_num_threads(1)
    task = UnitTaskContext(ray.get_runtime_context().get_node_id())
    job = extension.job
    sink = SidecarSink(job.output, extension.id)
    if (committed := sink.committed_stats(unit.id)) is not None:
        return committed
    dataset = ReinforcedDataset(job.output.url, job.output.storage_options)  # as it was before this extension
    entry = next(u for u in dataset.units if u["id"] == unit.id)
    with_views = any(column.role == "image" for column in sidecar.columns)
    report_progress = UnitReporter(tally, unit.id)
    report_progress(0, 0, force=True)
    rows = unit_rows_with_images(dataset, entry, job.input.storage_options)
    batches = _extension_batches(rows, extension, with_views, caption_sizes, task.clock)

    def sidecar_rows() -> Iterator[dict[str, Any]]:
        written = 0
        for keys, result in model_results(batches, worker, job.resources, task.clock):
            if isinstance(result, str):
                raise DrGenError(f"unit {unit.id}: the models failed on a batch ({result}); rerun to retry")
            task.clock.add(result.seconds)
            columns: dict[str, Any] = {"key": keys}
            for column in sidecar.columns:
                values = {"image": result.image_emb, "text": result.text_emb, "captions": result.captions}[column.role]
                if column.role == "captions":
                    columns[column.name] = values[column.id]
                else:
                    columns.update(storage_columns(column.name, values[column.id], sidecar.embedding_dtype))
            yield columns
            written += len(keys)
            report_progress(written, 0)
        if written != entry["samples"]:  # a sidecar unit reads the rows it extends, and drops none
            raise DrGenError(f"unit {unit.id}: wrote {written} sidecar rows for {entry['samples']} samples")

    stats = sink.write_unit(unit, sidecar, sidecar_rows(), [], task)
    report_progress.finish(stats["samples"], 0)
    return stats


def _check_known_cards(manifest: dict[str, Any], described: dict[str, Any], extension: Extension) -> None:
    """OUT's teachers, loaded again for the new captions, must be the models OUT recorded."""
    recorded = {entry["id"]: entry["card"] for entry in manifest["teachers"]}
    for card in described["teachers"]:
        difference = None if card["id"] in extension.teachers else _first_difference(card, recorded[card["id"]])
        if difference:
            path, now, then = difference
            message = f"{path} is {now}, was {then}"
            raise DrGenError(f"teacher {card['id']!r} no longer loads as the dataset recorded it: {message}")


def extend_dataset(
    job: JobConfig,
    *,
    address: str | None = None,
    on_progress: Callable[[RunProgress], None] | None = None,
) -> RunSummary:
    """Add what JOB has and the dataset at job.output.url lacks; resumes a killed extension.
    `on_progress` as for runner.run_job."""
    started = time.time()
    check_job(job)
    out, manifest = read_manifest(job.output.url, job.output.storage_options)
    if manifest["status"] != "complete":
        raise ConfigError(f"{redact_url(out.url())} is not complete: finish its run before extending it")
    with OutputLease(out):
        return _extend_planned(job, out, manifest, started, address, on_progress)


def _extend_planned(
    job: JobConfig, out: Location, manifest: dict[str, Any], started: float, address: str | None,
    on_progress: Callable[[RunProgress], None] | None,
) -> RunSummary:
    """extend_dataset once this run holds the output's lease."""
    extension = plan_extension(job, manifest)
    units = read_plan(out).units
    summary = RunSummary(output=out.url(), units_planned=len(units))
    if extension is None:
        summary.units_skipped, summary.seconds = len(units), time.time() - started
        return summary
    sink = SidecarSink(extension.job.output, extension.id)
    todo = sink.start(units)
    summary.units_skipped = len(units) - len(todo)
    runs = read_runs(out)
    if todo:
        with ray_session(address) as ray_up:
            ray_up()
            actors = ModelActors.start(extension.job, f"{__name__}:{ExtensionWorker.__name__}", extension)
            described = actors.wait_started()
            summary.startup_seconds = time.time() - started
            _check_known_cards(manifest, described, extension)
            cards = {
                "teachers": [card for card in described["teachers"] if card["id"] in extension.teachers],
                "captioners": described["captioners"],
            }
            sidecar = sidecar_layout(extension, cards)
            out.write_json_atomic({"cards": cards, "layout": sidecar.to_dict()}, sidecar.extension_file)
            task_args = (extension, sidecar, caption_input_sizes(cards))
            try:
                written, progress = run_unit_tasks(unit_task(extend_unit), todo, task_args, actors, extension.job,
                                                   summary, on_progress)
            finally:
                actors.close()
            summary.seconds = time.time() - started
            runs.append(run_record(started, summary.seconds, summary.startup_seconds, progress, written,
                                   actors.nodes_used, written.storage_retries))
    else:  # killed after the last sidecar unit, before the manifest
        saved = out.read_json(sidecar_folder(extension.id), "extension.json")
        cards, sidecar = saved["cards"], SidecarLayout.from_dict(saved["layout"])
    if not sink.pending(units):
        combined = {kind: manifest_cards(manifest)[kind] + cards[kind] for kind in ("teachers", "captioners")}
        head = manifest_head(extension.job, combined, manifest["created_at"])
        extensions = [*manifest.get("extensions", []), {**sidecar.to_dict(), "extends": manifest["config_hash"]}]
        sink.finish(head, units, runs, extensions)
    summary.seconds = time.time() - started
    return summary
