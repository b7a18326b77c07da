"""`dr-gen plan`: what a job will cost before any of it runs.

Input shards are listed as `run` lists them (sources.listing). Samples are
counted by the input format's own module (the sources.formats registry), reading
through the storage layer's retried reader, from what is cheap to read, on at most
COUNTED_SHARDS shards spread evenly over the listing, and extrapolated to the rest:
- parquet: the row count in each counted shard's footer;
- webdataset tars: img2dataset's `NAME_stats.json` beside the shard ("successes"), else
  the shard's member index (headers only); a shard without stats is indexed, never the
  whole count dropped to a cruder method (at most INDEXED_SHARDS tars are indexed).
Work follows from the config: K views per sample, per teacher one image forward
per view and one text forward per text (the real caption and S synthetic ones),
per captioner one image encode per sample and S captions of at most max_length
tokens. FLOPs come from the models' architecture configs (teachers/flops.py), never
from loaded weights; GPU-hours divide them by a GPU's peak tensor throughput times
an assumed model FLOPs utilisation (MFU). Output bytes are the output format's estimate (dataset/formats):
embedding bytes are exact, the rest is estimated from the input.
"""

from __future__ import annotations

import re
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
from rich.console import Console
from rich.table import Table

from dr_pipeline.core.config import InputConfig, JobConfig
from dr_pipeline.core.errors import ConfigError
from dr_pipeline.sources.formats import ShardCount
from dr_pipeline.sources.listing import list_shards
from dr_pipeline.sources.shards import detect_format
from dr_pipeline.generate.job_check import check_job
from dr_pipeline.dataset.formats import format_for
from teachers import model_cost

GPU_PEAK_TFLOPS = {
    # dense (no sparsity) bf16 tensor-core peak from the vendors' datasheets; fp16 for GPUs without bf16
    "a100": 312.0,
    "a10": 125.0,
    "l4": 121.0,
    "l40s": 362.0,
    "h100": 989.0,  # SXM
    "h100-pcie": 756.0,
    "h200": 989.0,
    "b200": 2250.0,
    "mi300x": 1307.0,
    "v100": 125.0,
    "t4": 65.0,
}
DEFAULT_GPU = "h100"
DEFAULT_MFU = 0.4
"""Assumed utilisation of image and text forwards: large batches of ViT / text-transformer matmuls."""
DEFAULT_DECODE_MFU = 0.1
"""Assumed utilisation of caption decoding: one token per row per step, bound by memory traffic."""
COUNTED_SHARDS = 16
INDEXED_SHARDS = 4
"""Tars without img2dataset stats whose member index is read (each read costs the shard's headers)."""
_READERS = 16  # shards read at once: counting is I/O-bound


@dataclass
class InputSurvey:
    """The input as counted: shards, samples (exact or extrapolated) and typical sizes."""

    shards: int
    format: str
    samples: int
    exact: bool
    method: str
    listing_seconds: float
    counting_seconds: float
    caption_bytes: float | None = None  # mean bytes of a real caption, where the input tells
    image_bytes: float | None = None  # mean bytes of an encoded image, where the input tells


@dataclass
class ModelWork:
    id: str
    spec: str
    role: str
    architecture: str
    embedding_dim: int | None
    items: dict[str, int]  # what it processes: image forwards, text forwards, images, captions, tokens
    gflops_per_item: dict[str, float | None]
    flops: float | None  # forward FLOPs of all its items; None when its architecture is not covered
    encoder_flops: float | None = None  # the part at the encoder MFU (the rest is decoding)


@dataclass
class JobPlan:
    job: str
    input: InputSurvey
    views: int
    models: list[ModelWork]
    flops: float | None
    gpu: dict[str, Any]
    gpu_hours: float | None
    bytes_per_sample: dict[str, float]
    bytes_basis: dict[str, str]
    output_bytes: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        exact, estimated = exactness(self)
        return {**asdict(self), "exact": exact, "estimated": estimated}


# ---------------------------------------------------------------------- counting samples


def _spread(count: int, wanted: int) -> list[int]:
    """`wanted` indices spread evenly over range(count), first and last included."""
    if count <= wanted:
        return list(range(count))
    return sorted(set(np.linspace(0, count - 1, wanted).round().astype(int).tolist()))


def survey_input(config: InputConfig, counted_shards: int = COUNTED_SHARDS) -> InputSurvey:
    """The input's shards, counted as its format (sources.formats) counts them: every picked
    shard cheaply, then the format's reading count on at most INDEXED_SHARDS of those the cheap
    count says nothing of."""
    started = time.perf_counter()
    shards = list_shards(config)
    listed = time.perf_counter()
    shard_format = detect_format(shards[0], config)
    picked = [shards[i] for i in _spread(len(shards), counted_shards)]
    with ThreadPoolExecutor(_READERS) as pool:
        cheap = list(pool.map(lambda url: _try(shard_format.count_cheaply, url, config), picked))
        counts = [count for count in cheap if count]
        source = shard_format.cheap_count_source
        if shard_format.count_by_reading is not None:
            uncounted = [url for url, count in zip(picked, cheap) if count is None]
            indexed = [uncounted[i] for i in _spread(len(uncounted), INDEXED_SHARDS)]
            picked = [url for url, count in zip(picked, cheap) if count is not None] + indexed
            counts += [c for c in pool.map(lambda url: _try(shard_format.count_by_reading, url, config), indexed) if c]
            source = " and ".join(part for part, used in (
                (source, len(picked) > len(indexed)), (shard_format.reading_count_source, bool(indexed))) if used)
    if not counts:
        raise ConfigError(f"cannot count the input's samples: none of {len(picked)} shards read could be opened")
    rows = [c.samples for c in counts]
    exact = len(counts) == len(shards)
    if exact:
        samples, method = sum(rows), f"exact: {source} of all {len(shards)} shards"
    else:
        samples = int(round(np.mean(rows) * len(shards)))
        unread = f"; {len(picked) - len(counts)} unreadable" if len(counts) < len(picked) else ""
        method = (f"estimate: {source} of {len(counts)} of {len(shards)} shards{unread}, "
                  f"{np.mean(rows):.1f} samples per shard extrapolated")
    total_rows = sum(rows) or 1
    image_sizes = [c.image_bytes for c in counts if c.image_bytes is not None]
    caption_sizes = [c.caption_bytes for c in counts if c.caption_bytes is not None]
    return InputSurvey(
        shards=len(shards),
        format=shard_format.name,
        samples=samples,
        exact=exact,
        method=method,
        listing_seconds=round(listed - started, 3),
        counting_seconds=round(time.perf_counter() - listed, 3),
        image_bytes=sum(image_sizes) / total_rows if image_sizes else None,
        caption_bytes=sum(caption_sizes) / total_rows if caption_sizes else None,
    )


def _try(count: Callable[[str, InputConfig], ShardCount | None], url: str, config: InputConfig) -> ShardCount | None:
    """A shard that cannot be read is left out of the count (the survey says how many)."""
    try:
        return count(url, config)
    except (OSError, tarfile.TarError, ValueError):
        return None


# ---------------------------------------------------------------------- work, FLOPs, bytes


def gpu_name_of_device(device_name: str) -> str | None:
    """The GPU_PEAK_TFLOPS entry of a device name as torch.cuda.get_device_name() gives it
    ("NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA H100 PCIe" -> "h100-pcie"); None when unknown."""
    words = set(re.split(r"[^a-z0-9]+", device_name.lower()))
    matches = [name for name in GPU_PEAK_TFLOPS if set(name.split("-")) <= words]
    return max(matches, key=lambda name: len(name.split("-")), default=None)


def _gflops(value: float | None) -> float | None:
    return None if value is None else round(value / 1e9, 4)


def teacher_work(teacher: Any, samples: int, views: int, texts_per_sample: int) -> ModelWork:
    cost = model_cost(teacher.spec, "teacher")
    items = {"image_forwards": views, "text_forwards": samples * texts_per_sample}
    image, text = (cost.image_flops, cost.text_flops) if cost else (None, None)
    flops = None if image is None or text is None else views * image + items["text_forwards"] * text
    return ModelWork(teacher.id, teacher.spec, "teacher", cost.architecture if cost else "unknown",
                     cost.embedding_dim if cost else None, items,
                     {"image_forward": _gflops(image), "text_forward": _gflops(text)}, flops, flops)


def _captioner_work(captioner: Any, samples: int) -> ModelWork:
    cost = model_cost(captioner.spec, "captioner")
    tokens = captioner.sampler.max_length
    items = {"images": samples, "captions": samples * captioner.num_captions,
             "caption_tokens_at_most": samples * captioner.num_captions * tokens}
    decoder = cost.decoder if cost else None
    per_image = None if cost is None or cost.image_flops is None or decoder is None else (
        cost.image_flops + decoder.image_flops())
    per_caption = decoder.caption_flops(tokens) if decoder else None
    flops = encoder = None
    if per_image is not None and per_caption is not None:
        encoder = samples * per_image
        flops = encoder + items["captions"] * per_caption
    return ModelWork(captioner.id, captioner.spec, "captioner", cost.architecture if cost else "unknown", None,
                     items, {"image_encode": _gflops(per_image), "caption_at_most": _gflops(per_caption)},
                     flops, encoder)


def plan_job(
    job: JobConfig,
    gpu: str = DEFAULT_GPU,
    tflops: float | None = None,
    mfu: float = DEFAULT_MFU,
    decode_mfu: float = DEFAULT_DECODE_MFU,
    counted_shards: int = COUNTED_SHARDS,
) -> JobPlan:
    """Everything `dr-gen plan` reports; reads shard metadata, loads no model.

    Spec problems that would stop `dr-gen run` (a weights file absent from this machine) are
    reported as notes, since the architecture alone sets the cost."""
    notes = []
    try:
        check_job(job)
    except ConfigError as problem:
        notes.append(f"{problem} (`dr-gen run` stops here)")
    if tflops is None and gpu not in GPU_PEAK_TFLOPS:
        raise ConfigError(f"unknown GPU {gpu!r} (known: {', '.join(GPU_PEAK_TFLOPS)}); or give --tflops")
    if not (0 < mfu <= 1 and 0 < decode_mfu <= 1):
        raise ConfigError("MFU must be in (0, 1]")
    survey = survey_input(job.input, counted_shards)
    samples = survey.samples
    views = samples * job.augmentation.num_views
    texts = 1 + job.num_captions
    models = [teacher_work(t, samples, views, texts) for t in job.teachers]
    models += [_captioner_work(c, samples) for c in job.captioners]
    notes += [f"{m.id}: FLOPs unknown ({m.architecture}); left out of the totals" for m in models if m.flops is None]
    known = [m for m in models if m.flops is not None]
    flops = sum(m.flops for m in known) if known else None
    peak = (tflops if tflops is not None else GPU_PEAK_TFLOPS[gpu]) * 1e12
    gpu_hours = None
    if known:
        encoder = sum(m.encoder_flops for m in known)
        seconds = encoder / (peak * mfu) + (flops - encoder) / (peak * decode_mfu)
        gpu_hours = seconds / 3600
    sizes, basis = format_for(job.output.format).bytes_per_sample(
        job, survey.caption_bytes, survey.image_bytes, [m.embedding_dim for m in models if m.role == "teacher"])
    return JobPlan(
        job=job.name,
        input=survey,
        views=views,
        models=models,
        flops=flops,
        gpu={"name": gpu if tflops is None else "custom", "peak_tflops": peak / 1e12, "mfu": mfu,
             "decode_mfu": decode_mfu},
        gpu_hours=gpu_hours,
        bytes_per_sample=sizes,
        bytes_basis=basis,
        output_bytes=sum(sizes.values()) * samples,
        notes=notes,
    )


# ---------------------------------------------------------------------- report


def _count(value: float | None, unit: str = "") -> str:
    """1234567 -> '1.23 M'; SI prefixes, three significant digits."""
    if value is None:
        return "unknown"
    for prefix, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def print_plan(plan: JobPlan, console: Console) -> None:
    survey = plan.input
    console.print(f"[bold]{plan.job}[/bold]: {survey.shards} {survey.format} shards "
                  f"(listed in {survey.listing_seconds:.2f} s, counted in {survey.counting_seconds:.2f} s)")
    console.print(f"samples {survey.samples:,} ({survey.method})", markup=False, highlight=False, soft_wrap=True)
    console.print(f"views {plan.views:,} ({'exact' if survey.exact else 'estimate'}: samples x K)", highlight=False)
    table = Table("model", "role", "work", "GFLOPs per item", "FLOPs", title="Work", title_justify="left")
    for model in plan.models:
        work = ", ".join(f"{name.replace('_', ' ')} {count:,}" for name, count in model.items.items())
        per_item = ", ".join(f"{name.replace('_', ' ')} {value if value is not None else '?'}"
                             for name, value in model.gflops_per_item.items())
        table.add_row(f"{model.id}\n{model.architecture}", model.role, work, per_item, _count(model.flops))
    console.print(table)
    gpu = plan.gpu
    console.print(
        f"total {_count(plan.flops, 'FLOP')}: {plan.gpu_hours:,.3g} GPU-hours on {gpu['name']} "
        f"({gpu['peak_tflops']:g} TFLOP/s peak, MFU {gpu['mfu']:g} for encoders, {gpu['decode_mfu']:g} "
        "for caption decoding)" if plan.gpu_hours is not None else "total FLOPs unknown",
        highlight=False, soft_wrap=True,
    )
    sizes = Table("part", "bytes per sample", "basis", title="Output (before compression)", title_justify="left")
    for part, size in plan.bytes_per_sample.items():
        sizes.add_row(part, f"{size:,.0f}", plan.bytes_basis[part])
    console.print(sizes)
    console.print(f"output about {_count(plan.output_bytes, 'B')} "
                  f"({sum(plan.bytes_per_sample.values()):,.0f} bytes per sample)", highlight=False)
    exact, estimated = exactness(plan)
    console.print(f"exact: {', '.join(exact)}; estimated: {', '.join(estimated)}", highlight=False, soft_wrap=True)
    for note in plan.notes:
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)


def exactness(plan: JobPlan) -> tuple[list[str], list[str]]:
    """Which of the plan's figures are exact and which estimated."""
    counted = ["samples", "views", "forward passes"]
    exact = ["shards", *(counted if plan.input.exact else []), "embedding bytes", "augmentation bytes"]
    estimated = [*([] if plan.input.exact else counted), "caption tokens (at most max_length)",
                 "FLOPs (from architecture configs)", "GPU-hours (assumed MFU)", "image, caption and metadata bytes"]
    return exact, estimated
