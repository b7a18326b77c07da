"""`dr-gen plan JOB --calibrate N`: the job's real pipeline on this machine's hardware, for N samples.

The FLOP estimate of `dr-gen plan` assumes a utilisation; this measures one: the first N
samples of the input are copied into a temporary folder (webdataset tars, one unit per CPU
worker) and `run_job` runs on them with the job's models, precision and batch sizes and one
model actor, into a temporary output. Its rate after the actor is up (model loading and Ray's
start are a per-run constant, left out) gives the hours of the whole input per actor.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dr_pipeline.core.config import JobConfig, parse_job
from dr_pipeline.core.errors import ConfigError
from dr_pipeline.sources.listing import list_shards
from dr_pipeline.sources.records import RawSample
from dr_pipeline.sources.shards import iter_shard
from dr_pipeline.tools.sample_data import SampleRecord, write_tar_shards


@dataclass
class Calibration:
    samples: int  # run through the pipeline
    failures: int
    seconds: float  # after the model actor was up
    startup_seconds: float
    device: str  # "cuda" or "cpu": what the model actor ran on
    samples_per_second_per_actor: float
    input_samples: int
    hours: float  # GPU-hours on a GPU, actor-hours on a CPU, for the whole input
    hours_unit: str
    price_per_hour: float | None
    cost: float | None
    estimated_gpu_hours: float | None  # the FLOP estimate of `dr-gen plan`
    measured_over_estimated: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def first_samples(job: JobConfig, count: int) -> list[SampleRecord]:
    """The input's first `count` samples that have an image and a caption, in shard order."""
    records: list[SampleRecord] = []
    for shard in list_shards(job.input):
        for item in iter_shard(shard, job.input):
            if isinstance(item, RawSample) and item.image is not None and item.text:
                records.append(SampleRecord(key=f"{len(records):08d}", caption=item.text, url=item.url or "",
                                            image=item.image, image_format=item.image_format or "jpg"))
                if len(records) == count:
                    return records
    return records


def calibration_job(job: JobConfig, input_urls: list[str], output_url: str) -> JobConfig:
    """The job on the copied samples, into the temporary output, with one model actor."""
    data = job.model_dump()
    data["input"] = {"urls": input_urls, "max_image_pixels": job.input.max_image_pixels}
    data["output"] = {**data["output"], "url": output_url, "storage_options": {}}
    data["resources"]["actors"] = 1
    return parse_job(data)


def calibrate(
    job: JobConfig,
    samples: int,
    input_samples: int,
    estimated_gpu_hours: float | None,
    price_per_hour: float | None = None,
    address: str | None = None,
) -> Calibration:
    """Run `samples` input samples through the pipeline here and scale the measured rate to
    `input_samples` (the count `dr-gen plan` found)."""
    from dr_pipeline.execution.runner import run_job  # noqa: PLC0415 - imports Ray and the model adapters

    records = first_samples(job, samples)
    if not records:
        raise ConfigError("--calibrate: the input has no sample with an image and a caption to run")
    workers = max(1, min(job.resources.cpu_workers, os.cpu_count() or 1))
    shards = max(1, min(workers, len(records) // job.resources.batch_size))
    with tempfile.TemporaryDirectory(prefix="dr-gen-calibrate-") as scratch:
        urls = write_tar_shards(f"{scratch}/input", tuple(records), shards)
        calibration = calibration_job(job, urls, f"{scratch}/out")
        summary = run_job(calibration, address=address)
    if summary.units_failed:
        unit, reason = summary.units_failed[0]
        raise ConfigError(f"--calibrate: the pipeline failed on the copied samples (unit {unit}: {reason})")
    seconds = summary.seconds - summary.startup_seconds
    rate = summary.samples / seconds
    on_gpu = job.resources.gpus_per_actor != 0 and torch.cuda.is_available()
    gpus = (1.0 if job.resources.gpus_per_actor == "auto" else float(job.resources.gpus_per_actor)) if on_gpu else 1.0
    hours = input_samples / rate / 3600 * gpus
    return Calibration(
        samples=summary.samples,
        failures=summary.failures,
        seconds=seconds,
        startup_seconds=summary.startup_seconds,
        device="cuda" if on_gpu else "cpu",
        samples_per_second_per_actor=rate,
        input_samples=input_samples,
        hours=hours,
        hours_unit="GPU-hours" if on_gpu else "actor-hours",
        price_per_hour=price_per_hour,
        cost=hours * price_per_hour if price_per_hour is not None else None,
        estimated_gpu_hours=estimated_gpu_hours,
        measured_over_estimated=hours / estimated_gpu_hours if estimated_gpu_hours else None,
    )


def calibration_lines(calibration: Calibration, gpu_name: str) -> list[str]:
    """The calibration as `dr-gen plan` prints it."""
    c = calibration
    lines = [
        f"calibration: {c.samples} samples ({c.failures} failures) through the pipeline on this machine's "
        f"{c.device} in {c.seconds:.1f} s after {c.startup_seconds:.1f} s of start-up: "
        f"{c.samples_per_second_per_actor:.3g} samples/s per actor",
        f"measured: {c.hours:,.4g} {c.hours_unit} for {c.input_samples:,} samples"
        + (f", cost {_money(c.cost)} at {c.price_per_hour:g} per hour" if c.cost is not None else ""),
    ]
    if c.estimated_gpu_hours is not None:
        lines.append(f"FLOP estimate: {c.estimated_gpu_hours:,.4g} GPU-hours on {gpu_name}; measured / estimate "
                     f"{c.measured_over_estimated:.3g}" + ("" if c.device == "cuda" else
                                                           " (measured on a CPU: not comparable)"))
    return lines


def _money(amount: float) -> str:
    return f"{amount:,.2f}" if amount >= 1 else f"{amount:.3g}"
