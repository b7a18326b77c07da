"""Where a training sample's time goes, ours beside the MobileCLIP loader path: per-stage CPU ms per sample.

Wraps the stages of both paths of bench_reader.py's training-samples comparison with CPU timers (about
a microsecond each, no profiler: cProfile inflates the Python-heavy stages several-fold) and runs 8 epochs
of each over an existing dataset and its DataCompDR export (one torch thread, one Arrow thread):

    python bench/profile_training_samples.py --dataset OUT/float16 --export OUT/export
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any, Callable

import pyarrow as pa
import torch
import webdataset.autodecode as autodecode

import bench_reader as bench
import dr_pipeline.read.replay as replay
import dr_pipeline.read.torch_dataset as torch_dataset
from dr_pipeline.read.reader import open_dataset

spent: dict[str, float] = {}


def timed(owner: Any, name: str, label: str) -> None:
    function = getattr(owner, name)

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.process_time()
        try:
            return function(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0.0) + time.process_time() - started

    setattr(owner, name, wrapper)


def timed_generator(owner: Any, name: str, label: str) -> None:
    function = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        items = function(*args, **kwargs)
        while True:
            started = time.process_time()
            try:
                item = next(items)
            except StopIteration:
                return
            finally:
                spent[label] = spent.get(label, 0.0) + time.process_time() - started
            yield item

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--export", required=True)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    timed_generator(torch_dataset, "unit_batches_with_images", "ours: rows and their originals (Parquet + input join)")
    timed(replay._InputOriginals, "__call__", "ours:   of which the input-shard join")
    timed(replay, "decode_picture", "ours: decode")
    timed(replay, "render_picture_view", "ours: render (crop, resize, ops, copy out)")
    timed(torch_dataset.ReinforcedTorchDataset, "_normalised", "ours: normalise the batch")
    timed(autodecode.ImageHandler, "__call__", "theirs: PIL decode (pilrgba, then RGB)")
    timed(bench.TF, "resized_crop", "both: resized crop")
    timed(bench, "_apply_op", "theirs: RandAugment ops")
    timed(bench.TF, "to_tensor", "theirs: to_tensor")
    timed(bench.TF, "normalize", "theirs: normalize")
    options = dict(image_size=args.image_size, sampling="sequential", shuffle=False, batch_size=args.batch_size)
    ours = torch_dataset.ReinforcedTorchDataset(open_dataset(args.dataset), **options)
    theirs = bench.MobileClipLoaderPath(args.export, args.image_size, args.batch_size)
    paths: dict[str, Callable[[int], int]] = {"MobileCLIP loader path": bench.samples_mobileclip(theirs),
                                              "ours": bench.samples_after(ours)}
    for name, one_pass in paths.items():
        one_pass(0)
        spent.clear()
        started, samples = time.process_time(), 0
        for epoch in range(1, 9):
            samples += one_pass(epoch)
        print(f"{name}: {(time.process_time() - started) / samples * 1000:.2f} CPU ms per sample")
        for label, seconds in sorted(spent.items()):
            print(f"   {label:55s} {seconds / samples * 1000:6.2f} ms")


if __name__ == "__main__":
    main()
