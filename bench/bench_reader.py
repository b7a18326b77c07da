"""Reader throughput on one CPU core: raw rows, and training samples with view replay and collation.

Without --dataset, first generates the quickstart dataset from the bundled sample data
(local Ray; images not kept, so replay reads the originals back from the input shards).
Then, in this process with one torch thread and no DataLoader workers (so: one core):

  rows/s     ReinforcedDataset.iter_samples: Parquet/tar decoding, embeddings to float32
  samples/s  ReinforcedTorchDataset through a DataLoader with batch collation: original
             image joined and decoded, one view replayed at --image-size, normalised,
             embeddings and captions picked, batches collated

Each loops over the dataset (new epoch each pass) for at least --seconds.

    python bench/bench_reader.py [--dataset URL] [--image-size 224] [--batch-size 32] [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import ray
import torch
from torch.utils.data import DataLoader

from dr_pipeline.config import load_job
from dr_pipeline.reader import open_dataset
from dr_pipeline.runner import run_job
from dr_pipeline.sample_data import write_sample_data
from dr_pipeline.torch_dataset import ReinforcedTorchDataset

ROOT = Path(__file__).resolve().parent.parent


def per_second(one_pass: Callable[[int], int], seconds: float) -> float:
    """Items per second over whole passes (pass index = epoch) lasting at least `seconds` together."""
    one_pass(0)  # warm-up: imports, first file opens
    items, epoch, started = 0, 1, time.perf_counter()
    while time.perf_counter() - started < seconds:
        items += one_pass(epoch)
        epoch += 1
    return items / (time.perf_counter() - started)


def generate_quickstart(scratch: str) -> str:
    shards = write_sample_data(f"{scratch}/input", num_shards=3)
    job = load_job(ROOT / "jobs" / "quickstart.yaml", input_urls=shards, output_url=f"{scratch}/out")
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        run_job(job)
    finally:
        ray.shutdown()
    return job.output.url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="an existing dataset (default: generate the quickstart one)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory() as scratch:
        url = args.dataset or generate_quickstart(scratch)
        torch.set_num_threads(1)
        dataset = open_dataset(url)
        samples = ReinforcedTorchDataset(dataset, image_size=args.image_size, shuffle_buffer=args.batch_size)

        def read_rows(epoch: int) -> int:
            return sum(1 for _ in dataset.iter_samples())

        def load_batches(epoch: int) -> int:
            samples.set_epoch(epoch)
            return sum(len(batch["key"]) for batch in DataLoader(samples, batch_size=args.batch_size))

        rows_per_second = per_second(read_rows, args.seconds)
        samples_per_second = per_second(load_batches, args.seconds)
        sizes = np.array([(r["image_height"], r["image_width"]) for r in dataset.iter_samples()])

    manifest = dataset.manifest
    print(f"dataset: {len(dataset)} samples, {manifest['format']}, {manifest['layout']['embedding_dtype']}, "
          f"K={dataset.layout.num_views}, images {'kept' if manifest['config']['output']['keep_images'] else 'read from the input shards'}, "
          f"originals {sizes[:, 0].mean():.0f} x {sizes[:, 1].mean():.0f} px on average")
    print(f"one core (1 torch thread, no DataLoader workers), torch {torch.__version__}, {os.cpu_count()} CPUs on the machine")
    print(f"reader rows: {rows_per_second:.0f} rows/s")
    print(f"training samples (replay at {args.image_size} px + normalise + collate, batch {args.batch_size}): "
          f"{samples_per_second:.1f} samples/s per core")


if __name__ == "__main__":
    main()
