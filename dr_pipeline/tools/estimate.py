"""`dr-gen plan`: what a job will cost before any of it runs.

Input shards are listed as `run` lists them (inputs.list_shards). Samples are
counted from what is cheap to read, on at most COUNTED_SHARDS shards spread
evenly over the listing, and extrapolated to the rest:
- parquet: the row count in each counted shard's footer;
- webdataset tars: img2dataset's `NAME_stats.json` beside the shard ("successes"), else
  the shard's member index (headers only); a shard without stats is indexed, never the
  whole count dropped to a cruder method (at most INDEXED_SHARDS tars are indexed).
Work follows from the config: K views per sample, per teacher one image forward
per view and one text forward per text (the real caption and S synthetic ones),
per captioner one image encode per sample and S captions of at most max_length
tokens. FLOPs come from the models' architecture configs (teachers/flops.py), never
from loaded weights; GPU-hours divide them by a GPU's peak tensor throughput times
an assumed model FLOPs utilisation (MFU). Output bytes follow the schema layout:
embedding bytes are exact, the rest is estimated from the input.
"""

from __future__ import annotations

import json
import re
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table
from webdataset.tariterators import base_plus_ext

from dr_pipeline.core.config import InputConfig, JobConfig
from dr_pipeline.core.errors import ConfigError
from dr_pipeline.sources.inputs import (
    PARQUET_IMAGE_COLUMNS,
    PARQUET_TEXT_COLUMNS,
    TAR_IMAGE_SUFFIXES,
    detect_format,
    list_shards,
)
from dr_pipeline.generate.model_worker import check_job
from schemas import load_spec
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
ASSUMED_CAPTION_BYTES = 60
"""Bytes of a caption when the input does not tell (DataComp captions average about ten words)."""
ASSUMED_METADATA_BYTES = 200
"""key, source key, url, image format, size and sha256 of one sample."""
_READERS = 16  # shards read at once: counting is I/O-bound
_TAR_NAME = re.compile(r"\.(tar|tar\.gz|tgz)$", re.IGNORECASE)


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


def _parquet_counts(url: str, config: InputConfig) -> tuple[int, float | None, float | None]:
    """(rows, image bytes, caption bytes) from the footer: uncompressed sizes of the column chunks."""
    with fsspec.open(url, "rb", **config.storage_options) as handle:
        metadata = pq.ParquetFile(handle).metadata
    names = [metadata.schema.column(i).path.split(".")[0] for i in range(metadata.num_columns)]
    image_column = config.image_column or next((c for c in PARQUET_IMAGE_COLUMNS if c in names), None)
    text_column = config.text_column or next((c for c in PARQUET_TEXT_COLUMNS if c in names), None)
    sizes = {name: 0 for name in names}
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for i in range(row_group.num_columns):
            sizes[names[i]] += row_group.column(i).total_uncompressed_size
    return metadata.num_rows, sizes.get(image_column), sizes.get(text_column)


def _img2dataset_successes(url: str, config: InputConfig) -> int | None:
    """Samples in a tar according to img2dataset's stats file beside it; None when there is none."""
    stats_url = _TAR_NAME.sub("_stats.json", url)
    if stats_url == url:
        return None
    try:
        with fsspec.open(stats_url, "rb", **config.storage_options) as handle:
            return int(json.load(handle)["successes"])
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        return None


def _tar_index(url: str, config: InputConfig) -> tuple[int, float | None, float | None]:
    """(samples, image bytes, caption bytes) of one tar from its member headers only."""
    image_suffixes = {config.image_column} if config.image_column else set(TAR_IMAGE_SUFFIXES)
    text_suffix = config.text_column or "txt"
    keys: set[str] = set()
    image_bytes = text_bytes = 0
    with fsspec.open(url, "rb", **config.storage_options) as handle, tarfile.open(fileobj=handle, mode="r:*") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, suffix = base_plus_ext(member.name)
            if key is None:
                continue
            keys.add(key)
            suffix = suffix.lower()
            if suffix in image_suffixes:
                image_bytes += member.size
            elif suffix == text_suffix:
                text_bytes += member.size
    return len(keys), image_bytes, text_bytes or None


def survey_input(config: InputConfig, counted_shards: int = COUNTED_SHARDS) -> InputSurvey:
    started = time.perf_counter()
    shards = list_shards(config)
    listed = time.perf_counter()
    shard_format = detect_format(shards[0], config)
    picked = [shards[i] for i in _spread(len(shards), counted_shards)]
    counts: list[tuple[int, float | None, float | None]] = []
    with ThreadPoolExecutor(_READERS) as pool:
        if shard_format == "parquet":
            source = "parquet footer row counts"
            counts = [c for c in pool.map(lambda url: _try(_parquet_counts, url, config), picked) if c]
        else:
            successes = list(pool.map(lambda url: _img2dataset_successes(url, config), picked))
            without_stats = [url for url, s in zip(picked, successes) if s is None]
            indexed = [without_stats[i] for i in _spread(len(without_stats), INDEXED_SHARDS)]
            picked = [url for url, s in zip(picked, successes) if s is not None] + indexed
            counts = [(s, None, None) for s in successes if s is not None]
            counts += [c for c in pool.map(lambda url: _try(_tar_index, url, config), indexed) if c]
            source = " and ".join(part for part, used in (
                ("img2dataset stats files", len(picked) > len(indexed)), ("member indexes", bool(indexed))) if used)
    if not counts:
        raise ConfigError(f"cannot count the input's samples: none of {len(picked)} shards read could be opened")
    rows = [c[0] for c in counts]
    exact = len(counts) == len(shards)
    if exact:
        samples, method = sum(rows), f"exact: {source} of all {len(shards)} shards"
    else:
        samples = int(round(np.mean(rows) * len(shards)))
        unread = f"; {len(picked) - len(counts)} unreadable" if len(counts) < len(picked) else ""
        method = (f"estimate: {source} of {len(counts)} of {len(shards)} shards{unread}, "
                  f"{np.mean(rows):.1f} samples per shard extrapolated")
    total_rows = sum(rows) or 1
    image_sizes = [c[1] for c in counts if c[1] is not None]
    caption_sizes = [c[2] for c in counts if c[2] is not None]
    return InputSurvey(
        shards=len(shards),
        format=shard_format,
        samples=samples,
        exact=exact,
        method=method,
        listing_seconds=round(listed - started, 3),
        counting_seconds=round(time.perf_counter() - listed, 3),
        image_bytes=sum(image_sizes) / total_rows if image_sizes else None,
        caption_bytes=sum(caption_sizes) / total_rows if caption_sizes else None,
    )


def _try(read: Any, url: str, config: InputConfig) -> Any:
    """A shard that cannot be read is left out of the count (the survey says how many)."""
    try:
        return read(url, config)
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


def _bytes_per_sample(job: JobConfig, survey: InputSurvey, dims: list[int | None]) -> tuple[dict, dict]:
    """Bytes of one output sample by part, and how each was obtained; before Parquet compression
    (float16 embeddings hardly compress)."""
    aug = job.augmentation
    dtype = load_spec()["embedding_dtypes"][job.output.embedding_dtype]
    itemsize = np.dtype(dtype["numpy"]).itemsize
    scale_bytes = np.dtype(dtype["scale"]).itemsize if "scale" in dtype else 0  # per row, quantised dtypes
    rows = aug.num_views + 1 + job.num_captions
    per_view = 16 + 1  # crop box, flip
    if aug.rand_augment.p > 0:
        per_view += aug.rand_augment.num_ops * 5  # int8 op + float32 magnitude
    if aug.random_erasing.p > 0:
        per_view += 16
    caption = survey.caption_bytes or ASSUMED_CAPTION_BYTES
    caption_basis = "mean of the counted input captions" if survey.caption_bytes else "assumed"
    sizes = {
        "embeddings": float(sum(rows * (d * itemsize + scale_bytes) for d in dims if d is not None)),
        "augmentation_params": float(aug.num_views * per_view),
        "real_caption": caption,
        "synthetic_captions": job.num_captions * caption,
        "metadata": float(ASSUMED_METADATA_BYTES),
    }
    basis = {
        "embeddings": "exact: (K + 1 + S) x (D x dtype bytes + scale bytes) per teacher"
        if all(d is not None for d in dims) else "exact for teachers of known dimension, others left out",
        "augmentation_params": "exact (RandAugment ops counted as if never skipped)",
        "real_caption": caption_basis,
        "synthetic_captions": "S x the real caption's bytes",
        "metadata": "assumed",
    }
    if job.output.keep_images:
        sizes["images"] = survey.image_bytes or 0.0
        basis["images"] = "mean of the input's images" if survey.image_bytes else "unknown (not in the counted metadata)"
    return sizes, basis


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
    sizes, basis = _bytes_per_sample(job, survey, [m.embedding_dim for m in models if m.role == "teacher"])
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
