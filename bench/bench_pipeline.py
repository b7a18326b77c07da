"""End-to-end throughput of the quickstart job against bare teacher forward on the same views.

Runs, in one process: the quickstart job on local Ray (fresh output), then the same
teachers called directly on the same rendered views (the CPU stage re-run to get
them). Prints end-to-end samples/s, bare teacher-forward samples/s and their ratio,
plus the per-stage seconds the units recorded.

    python bench/bench_pipeline.py [--job jobs/quickstart.yaml] [--views K]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import ray
import torch

from dr_pipeline.config import load_job
from dr_pipeline.manifest import read_manifest
from dr_pipeline.model_worker import ModelWorker
from dr_pipeline.prepare import prepare_unit
from dr_pipeline.runner import run_job
from dr_pipeline.sample_data import write_sample_data

ROOT = Path(__file__).resolve().parent.parent


def bare_forward_seconds(job, shards, caption_sizes) -> tuple[int, float, float]:
    """(samples, teacher-forward seconds, captioning seconds) with the models called in-process."""
    worker = ModelWorker(job, use_gpu=torch.cuda.is_available())
    samples, forward, captioning = 0, 0.0, 0.0
    for shard in shards:
        for prepared in prepare_unit(shard, job, caption_sizes):
            batch = prepared.view_batch()
            if batch is None:
                continue
            result = worker.process(batch)
            samples += len(batch)
            forward += result.seconds["teacher_forward"]
            captioning += result.seconds.get("captioning", 0.0)
    return samples, forward, captioning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default=str(ROOT / "jobs" / "quickstart.yaml"))
    parser.add_argument("--shards", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory() as scratch:
        shards = write_sample_data(f"{scratch}/input", num_shards=args.shards)
        job = load_job(args.job, input_urls=shards, output_url=f"{scratch}/out")
        ray_start = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False)
        ray_seconds = time.perf_counter() - ray_start
        summary = run_job(job)
        _, manifest = read_manifest(job.output.url)
        stages: Counter[str] = Counter()
        for unit in manifest["units"]:
            stages.update(unit["seconds_by_stage"])
        ray.shutdown()
        caption_sizes = tuple(sorted({c["card"]["input_size"] for c in manifest["captioners"]}))
        samples, forward, captioning = bare_forward_seconds(job, shards, caption_sizes)

    steady = summary.seconds - summary.startup_seconds
    end_to_end = summary.samples / steady
    bare = samples / forward
    print(f"job {job.name}: {summary.samples} samples x {job.augmentation.num_views} views, "
          f"{len(job.teachers)} teachers, {job.num_captions} captions per sample, {os.cpu_count()} CPUs, "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"ray start {ray_seconds:.1f} s; run_job {summary.seconds:.1f} s of which startup "
          f"(actors up, models loaded) {summary.startup_seconds:.1f} s")
    print(f"end-to-end (after startup): {end_to_end:.2f} samples/s")
    print(f"bare teacher forward on the same views: {bare:.2f} samples/s")
    print(f"bare teacher forward + captioning: {samples / (forward + captioning):.2f} samples/s")
    print(f"ratio end-to-end / bare teacher forward: {end_to_end / bare:.3f}")
    print("stage seconds summed over units: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(stages.items())))


if __name__ == "__main__":
    main()
