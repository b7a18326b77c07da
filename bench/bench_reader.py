"""Reader throughput on one CPU core, before and after the batched reader, beside MobileCLIP's loader.

Without --dataset, generates a dataset of the DataCompDR-12M recipe's shape (jobs/datacompdr-12m.yaml:
K=30 views, two 768-d teachers, S=5 captions) from the bundled photographs repeated --copies times,
with stand-in teachers of that width (bench/shape_teachers.py) and the tiny CoCa, on local Ray,
three times: Parquet float16, Parquet int8 and Arrow IPC float16 (output.format ipc), the same
rows; exports the float16 Parquet one with `dr-gen export --format datacompdr`.
Then, in this process with one torch thread, one Arrow thread and no DataLoader workers (one core):

  rows/s     before: ReinforcedDataset.iter_samples (a dict per row, every embedding widened to
             float32, a ViewParams per view); after: iter_batches (RowBatch: Arrow columns straight
             to numpy in their stored dtype), and the same with every embedding widened to float32;
             and "after" again over a copy of the dataset whose units hold --unit-rows rows (each
             unit's rows repeated, written by its format's writer), as a DataCompDR unit of ~12k
             samples is read: per-unit costs (opening a file) spread over many rows
  samples/s  one view replayed at --image-size, normalised, batches of --batch-size collated:
             MobileCLIP's training loader path over the export (webdataset tar, PIL decode as
             "pilrgba" then RGB, npz, paug.json replayed with torchvision's PIL ops: resized crop,
             RandAugment; to_tensor, normalize; batched), our per-row path (rows with their
             images, ReinforcedTorchDataset.sample, torch's default collate), our batched path
             before (ReinforcedTorchDataset(batch_size=...) with the decode and render frozen in
             bench/loader_before.py: a tensor original converted back to PIL per view) and after
             (rendered from the decoded PIL picture into a channels-last batch; checked to give the
             same pixels); the per-row path uses the frozen decode and render too. The same view and
             caption of every sample on every path (view epoch % K, caption epoch % S). Tokenising is
             left out of every path.

Each figure loops over the whole dataset (a new epoch each pass) for at least --seconds of this
process's CPU time, and is items per CPU second: per core, whatever else the machine runs.

    python bench/bench_reader.py [--copies 10] [--keep-images] [--unit-rows 2048] [--image-size 224] [--batch-size 32] [--seconds 10]
    python bench/bench_reader.py --dataset OUT --export DEST   # an existing dataset and its export
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
import torchvision.transforms.functional as TF
import webdataset as wds
import yaml
from torch.utils.data import default_collate
from torchvision.transforms import InterpolationMode
from torchvision.transforms.autoaugment import _apply_op

from dr_pipeline.core.records import RAND_AUGMENT_OPS
from dr_pipeline.core.config import parse_job
from dr_pipeline.tools.export import export_datacompdr
from dr_pipeline.read.reader import ROWS_PER_BATCH, ReinforcedDataset, file_batches, open_dataset
from dr_pipeline.read.replay import unit_rows_with_images
from dr_pipeline.execution.runner import run_job
from dr_pipeline.tools.sample_data import write_sample_data
from loader_before import TorchDatasetBefore
from dr_pipeline.read.torch_dataset import ReinforcedTorchDataset
from dr_pipeline.dataset.formats import format_for
from dr_pipeline.dataset.formats.parquet import ROW_GROUP_ROWS, ParquetFormat, dictionary_columns

ROOT = Path(__file__).resolve().parent.parent


def per_second(one_pass: Callable[[int], int], seconds: float) -> float:
    """Items per CPU second of this process (one thread for torch and Arrow: per core, however busy
    the machine) over whole passes (pass index = epoch) lasting at least `seconds` of CPU together."""
    one_pass(0)  # warm-up: imports, first file opens
    items, epoch, started = 0, 1, time.process_time()
    while time.process_time() - started < seconds:
        items += one_pass(epoch)
        epoch += 1
    return items / (time.process_time() - started)


GENERATED = {"float16 parquet": ("parquet", "float16"), "int8 parquet": ("parquet", "int8"), "float16 ipc": ("ipc", "float16")}
"""The datasets generated without --dataset: name -> (output.format, embedding_dtype)."""


def datacompdr_shaped_job(shards: list[str], output: str, output_format: str, embedding_dtype: str, keep_images: bool) -> Any:
    """jobs/datacompdr-12m.yaml with 768-d stand-in teachers, the tiny CoCa for its 5 captions, local resources."""
    data = yaml.safe_load((ROOT / "jobs" / "datacompdr-12m.yaml").read_text())
    data["input"] = {"urls": shards}
    data["output"] = {**data["output"], "url": output, "format": output_format, "embedding_dtype": embedding_dtype,
                      "keep_images": keep_images}
    data["teachers"] = [
        {"id": teacher["id"], "spec": "python:bench.shape_teachers:ProjectionTeacher", "options": {"dim": 768}}
        for teacher in data["teachers"]
    ]
    captioner = data["captioners"][0]
    data["captioners"] = [{"id": captioner["id"], "spec": "open_clip:dr-tiny-coca", "num_captions": 5,
                           "sampler": {**captioner["sampler"], "max_length": 8, "min_length": 2}}]
    data["resources"] = {"actors": 1, "cpu_workers": 2, "batch_size": 8}
    return parse_job(data)


def generate(scratch: str, copies: int, keep_images: bool) -> tuple[dict[str, str], str]:
    """({name in GENERATED: URL}, the float16 Parquet dataset's DataCompDR export)."""
    shards = write_sample_data(f"{scratch}/input", num_shards=3, copies=copies)
    jobs = {
        name: datacompdr_shaped_job(shards, f"{scratch}/{name.replace(' ', '-')}", output_format, dtype, keep_images)
        for name, (output_format, dtype) in GENERATED.items()
    }
    # The stand-in teachers' spec names bench.shape_teachers: importable from the repository root,
    # here (the spec check) and in Ray's workers.
    sys.path.insert(0, str(ROOT))
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=os.cpu_count(),
             runtime_env={"env_vars": {"PYTHONPATH": python_path}})
    try:
        for job in jobs.values():
            run_job(job)
    finally:
        ray.shutdown()
    export = f"{scratch}/export"
    export_datacompdr(open_dataset(jobs["float16 parquet"].output.url), export)
    return {dtype: job.output.url for dtype, job in jobs.items()}, export


def rows_before(dataset: ReinforcedDataset) -> Callable[[int], int]:
    return lambda epoch: sum(1 for _ in dataset.iter_samples())


def rows_after(dataset: ReinforcedDataset, widen: bool) -> Callable[[int], int]:
    names = list(dataset.layout.embedding_shapes())

    def one_pass(epoch: int) -> int:
        rows = 0
        for batch in dataset.iter_batches():
            if widen:
                for name in names:
                    batch.decoded(name)
            rows += len(batch)
        return rows

    return one_pass


def with_unit_rows(dataset: ReinforcedDataset, dest: str, unit_rows: int) -> ReinforcedDataset:
    """A copy of the (local) `dataset` whose units hold their rows repeated to `unit_rows` rows or
    more, written by its format's writer; the manifest's counts are left as they were (the batched
    reader reads what the files hold)."""
    shutil.copytree(dataset.location.join(""), dest)
    output_format = format_for(dataset.manifest["format"])
    array_names = set(dataset.layout.stored_arrays())
    keep_images = dataset.manifest["config"]["output"]["keep_images"]
    for unit in dataset.units:
        path = Path(dest, unit["files"]["data"]["path"])
        with path.open("rb") as handle:
            (table, arrays), = output_format.batches(handle, dataset.layout, array_names, batch_size=unit["samples"])
        columns = {**table.to_pydict(), **arrays}
        written = 0
        with path.open("wb") as sink:
            writer = output_format.open_writer(sink, dataset.layout, keep_images)
            while written < unit_rows:
                writer.write(columns)
                written += len(columns["key"])
            writer.close()
    return open_dataset(dest)


class MobileClipLoaderPath:
    """The MobileCLIP training loader's path over DataCompDR tars (apple/ml-mobileclip's open_clip patch,
    `preprocess_dr`, and training/dr/transforms.py reapplying the stored parameters), written with
    webdataset and torchvision's functional PIL ops as that loader calls them; the view and synthetic
    caption are chosen as our sequential sampling chooses them, so both paths render the same views."""

    def __init__(self, export: str, image_size: int, batch_size: int):
        self.urls = sorted(glob.glob(f"{export}/*.tar"))
        config = json.loads(Path(export, "config.json").read_text())["reinforce"]["image_augmentation"]
        self.crop_interpolation = InterpolationMode(config["random_resized_crop"]["interpolation"])
        self.mean, self.std = config["normalize"]["mean"], config["normalize"]["std"]
        self.image_size = image_size
        self.batch_size = batch_size

    def _sample(self, sample: dict[str, Any], epoch: int) -> tuple:
        views = sample["paug.json"]["param_aug"]
        view = epoch % len(views)
        (top, left, height, width), ops = views[view]
        image = sample["image"].convert("RGB")
        image = TF.resized_crop(image, top, left, height, width, [self.image_size, self.image_size],
                                interpolation=self.crop_interpolation, antialias=True)
        for op, magnitude in ops or ():
            image = _apply_op(image, RAND_AUGMENT_OPS[op], magnitude, interpolation=InterpolationMode.NEAREST, fill=None)
        image = TF.normalize(TF.to_tensor(image), self.mean, self.std)
        synthetic = sample["syn.json"]["syn_text"]
        caption = epoch % len(synthetic)
        embeddings = sample["npz"]
        image_emb = torch.tensor(embeddings["image_emb"][view]).float()
        text_emb = torch.tensor(embeddings["text_emb"][0]).float()
        syn_text_emb = torch.tensor(embeddings["text_emb"][1 + caption]).float()
        return image, sample["text"], image_emb, text_emb, synthetic[caption], syn_text_emb

    def batches(self, epoch: int) -> Iterator[tuple]:
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.urls),
            wds.tarfile_to_samples(),
            wds.decode("pilrgba"),
            wds.rename(image="jpg;png;jpeg;webp", text="txt"),
            wds.map(lambda sample: self._sample(sample, epoch)),
            wds.batched(self.batch_size, partial=True),
        )
        return iter(pipeline)


def samples_before(dataset: ReinforcedTorchDataset, batch_size: int) -> Callable[[int], int]:
    """The per-row path as it was: rows with their images, one sample each, torch's default collate."""

    def one_pass(epoch: int) -> int:
        dataset.set_epoch(epoch)
        count, chunk = 0, []
        rows = (row for unit in dataset.units_for(0, 1) for row in unit_rows_with_images(dataset.dataset, unit))
        for row in rows:
            chunk.append(dataset.sample(row))
            if len(chunk) == batch_size:
                count += len(default_collate(chunk)["key"])
                chunk = []
        return count + (len(default_collate(chunk)["key"]) if chunk else 0)

    return one_pass


def samples_after(dataset: ReinforcedTorchDataset) -> Callable[[int], int]:
    def one_pass(epoch: int) -> int:
        dataset.set_epoch(epoch)
        return sum(len(batch["key"]) for batch in dataset)

    return one_pass


def samples_mobileclip(path: MobileClipLoaderPath) -> Callable[[int], int]:
    return lambda epoch: sum(len(batch[0]) for batch in path.batches(epoch))


def parquet_encodings(dataset: ReinforcedDataset, scratch: str, seconds: float) -> tuple[float, float]:
    """Rows/s of the batched reader over one unit's data file rewritten with a dictionary on every
    column (the writer before) and as the writer writes it now (none on float embeddings)."""
    source = dataset.location.join(dataset.units[0]["files"]["data"]["path"])
    table = pq.read_table(source)
    rates = []
    for use_dictionary in (True, dictionary_columns(table.schema)):
        path = f"{scratch}/encoding.parquet"
        pq.write_table(table, path, compression="zstd", use_dictionary=use_dictionary, row_group_size=ROW_GROUP_ROWS)
        array_names = set(dataset.layout.stored_arrays())

        def one_pass(epoch: int) -> int:
            batches = file_batches(dataset.location, path, "parquet", dataset.layout, array_names, ROWS_PER_BATCH)
            return sum(columns.num_rows for columns, _ in batches)

        rates.append(per_second(one_pass, seconds))
    return rates[0], rates[1]


def check_same_pixels(before: ReinforcedTorchDataset, after: ReinforcedTorchDataset) -> None:
    """The loader before and after its decode and render changed give the same batch, pixel for pixel."""
    before.set_epoch(0)
    after.set_epoch(0)
    assert torch.equal(next(iter(before))["image"], next(iter(after))["image"])


def check_same_views(ours: ReinforcedTorchDataset, theirs: MobileClipLoaderPath) -> None:
    """Both paths pick the same view and caption of the same samples (pixels differ: tensor vs PIL ops)."""
    ours.set_epoch(0)
    batch = next(iter(ours))
    reference = next(theirs.batches(0))
    assert batch["syn_text"] == list(reference[4]) and batch["text"] == list(reference[1])
    np.testing.assert_array_equal(batch["image_emb"][next(iter(batch["image_emb"]))].numpy()[:, :8],
                                  reference[2].numpy()[:, :8])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="an existing dataset (default: generate the DataCompDR-shaped ones)")
    parser.add_argument("--export", help="its `dr-gen export --format datacompdr` output (with --dataset)")
    parser.add_argument("--copies", type=int, default=10, help="repeat the 20 bundled photographs this many times")
    parser.add_argument("--keep-images", action="store_true",
                        help="generate with output.keep_images (default: the recipe's, originals re-read from the input)")
    parser.add_argument("--unit-rows", type=int, default=2048,
                        help="rows per unit of the copies read for the 'units of N rows' figures")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory() as scratch:
        if args.dataset:
            urls, export = {"given": args.dataset}, args.export
        else:
            urls, export = generate(scratch, args.copies, args.keep_images)
        torch.set_num_threads(1)
        pa.set_cpu_count(1)
        pa.set_io_thread_count(1)
        datasets = {name: open_dataset(url) for name, url in urls.items()}
        print(f"one core (1 torch thread, 1 Arrow thread, no DataLoader workers), torch {torch.__version__}, "
              f"pyarrow {pa.__version__}, {os.cpu_count()} CPUs on the machine")
        for name, dataset in datasets.items():
            teachers = ", ".join(f"{t.id} {t.dim}-d" for t in dataset.layout.teachers)
            print(f"dataset {name}: {len(dataset)} samples, {dataset.manifest['format']}, "
                  f"{dataset.layout.embedding_dtype}, K={dataset.layout.num_views}, S={len(dataset.manifest['text_rows']) - 1}, {teachers}")
            before = per_second(rows_before(dataset), args.seconds)
            after = per_second(rows_after(dataset, widen=False), args.seconds)
            widened = per_second(rows_after(dataset, widen=True), args.seconds)
            print(f"  raw rows/s per core: before {before:9.0f}   after {after:9.0f} ({after / before:.1f}x)   "
                  f"after, every embedding widened to float32 {widened:9.0f} ({widened / before:.1f}x)")
            if not args.dataset:  # generated here: local, small units
                large = with_unit_rows(dataset, f"{scratch}/{name.replace(' ', '-')}-{args.unit_rows}", args.unit_rows)
                after = per_second(rows_after(large, widen=False), args.seconds)
                widened = per_second(rows_after(large, widen=True), args.seconds)
                print(f"  units of {args.unit_rows} rows, raw rows/s per core: after {after:9.0f}   "
                      f"after, every embedding widened to float32 {widened:9.0f}")
            if isinstance(format_for(dataset.manifest["format"]), ParquetFormat):
                dictionary, plain = parquet_encodings(dataset, scratch, args.seconds)
                print(f"  one unit's file, batched reader: dictionary on every column (writer before) {dictionary:9.0f} "
                      f"rows/s   none on float embeddings (writer now) {plain:9.0f} rows/s ({plain / dictionary:.1f}x)")
        if export:
            dataset = datasets.get("float16 parquet") or datasets["given"]
            options = dict(image_size=args.image_size, sampling="sequential", shuffle=False)
            per_row_before = TorchDatasetBefore(dataset, **options)
            ours_before = TorchDatasetBefore(dataset, batch_size=args.batch_size, **options)
            ours_after = ReinforcedTorchDataset(dataset, batch_size=args.batch_size, **options)
            theirs = MobileClipLoaderPath(export, args.image_size, args.batch_size)
            check_same_views(ours_after, theirs)
            check_same_pixels(ours_before, ours_after)
            images = "kept in the dataset" if dataset.manifest["config"]["output"]["keep_images"] else "read from the input shards"
            print(f"training samples/s per core (replay at {args.image_size} px + normalise + collate, batch "
                  f"{args.batch_size}; originals {images}; the export holds them in its tars):")
            mobileclip = per_second(samples_mobileclip(theirs), args.seconds)
            per_row = per_second(samples_before(per_row_before, args.batch_size), args.seconds)
            before = per_second(samples_after(ours_before), args.seconds)
            after = per_second(samples_after(ours_after), args.seconds)
            print(f"  MobileCLIP loader path {mobileclip:7.1f}   ours per-row, before {per_row:7.1f} ({per_row / mobileclip:.2f}x)   "
                  f"ours before {before:7.1f} ({before / mobileclip:.2f}x)   ours after {after:7.1f} "
                  f"({after / mobileclip:.2f}x MobileCLIP, {after / before:.2f}x before)")
            if "float16 ipc" in datasets:  # the same rows stored as Arrow IPC: the trainer's format
                ours_ipc = ReinforcedTorchDataset(datasets["float16 ipc"], batch_size=args.batch_size, **options)
                check_same_views(ours_ipc, theirs)
                ipc = per_second(samples_after(ours_ipc), args.seconds)
                print(f"  ours after, rows from the ipc dataset {ipc:7.1f} ({ipc / mobileclip:.2f}x MobileCLIP)")


if __name__ == "__main__":
    main()
