"""One command that measures a GPU on the DataCompDR-12M recipe, sized to take under 8 minutes on one H100 / H200.

    python bench/gpu_check.py [--json gpu_check.json] [--gpu h100 | --peak-tflops 989]
    python bench/gpu_check.py --device cpu --tiny          # the same code, tiny models, on a CPU

The job is jobs/datacompdr-12m.yaml (K=30 views, 5 captions of at most 30 tokens, top_p 0.9) with
random-weight models of the recipe's architectures, so nothing is downloaded: teachers
open_clip ViT-L-14 x 2, captioner open_clip coca_ViT-L-14; the input is generated 512 x 512
JPEGs. `--tiny` swaps in the tiny models of teachers/model_configs and a smaller recipe
(K=8, 2 captions of at most 10 tokens) so a CPU runs it in a minute.

Measured, each section within its time budget (--seconds; at least one pass):
- decode: images/s of the pipeline's decoder on one core;
- CPU render: samples/s (K teacher views + the captioner's centre view) on one core;
- accelerator render: samples/s of the same renderer on the model device;
- bare teacher forward: samples/s of every teacher embedding a batch's K views and 1 + S texts
  (ModelWorker.embed_with, the pipeline's own call), its TFLOP/s and MFU against the peak;
- captioning: tokens/s and samples/s of the captioner on a batch (S captions per sample);
- end to end: `run_job` on local Ray (bench_pipeline.run_pipeline), samples/s after the
  actors are up and over the whole run; its input is sized from the rates above to take
  about --e2e-seconds; the ratio end-to-end / bare teacher forward (goal >= 0.9);
- peak GPU memory: of the bare sections in this process (torch allocator) and of the whole
  device during the pipeline run (polled); on a CPU, the model actor's peak resident memory.
Prints one table and writes every figure with its items and seconds to --json. Without CUDA
(and without --device cpu) it says so in one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_pipeline import device_peak, run_pipeline, teacher_flops_per_sample  # noqa: E402

from dr_pipeline.core.config import JobConfig, load_job, parse_job  # noqa: E402
from dr_pipeline.tools.estimate import GPU_PEAK_TFLOPS  # noqa: E402
from dr_pipeline.core.accelerator import views_to_device  # noqa: E402
from dr_pipeline.views.augment import sample_views  # noqa: E402
from dr_pipeline.views.decode import decode_image  # noqa: E402
from dr_pipeline.generate.model_worker import ModelWorker, caption_seeds, model_threads  # noqa: E402
from dr_pipeline.generate.prepare import caption_input_sizes, render_model_inputs  # noqa: E402
from dr_pipeline.tools.sample_data import SampleRecord, write_tar_shards  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "jobs" / "datacompdr-12m.yaml"
IMAGE_SIZE = 512
TINY_TEACHERS = ("open_clip:dr-tiny-vit-32", "open_clip:dr-tiny-vit-16-160")
TINY_CAPTIONER = "open_clip:dr-tiny-coca"
WORDS = "a photo of the red dog running on green grass near an old wooden house under blue sky".split()


# ---------------------------------------------------------------------- the job and its input


def random_init_spec(spec: str) -> str:
    """`open_clip:MODEL/TAG` or `open_clip:MODEL@weights` -> `open_clip:MODEL` (seeded random weights)."""
    kind, _, rest = spec.partition(":")
    if kind != "open_clip":
        raise SystemExit(f"gpu_check: only open_clip specs can be swapped for random weights, got {spec!r}")
    return f"{kind}:{rest.split('@')[0].split('/')[0]}"


def recipe_job(args: argparse.Namespace, input_urls: list[str], output_url: str) -> JobConfig:
    """The recipe with random-weight models (or tiny ones), one model actor on this machine."""
    data = load_job(str(args.job), input_urls=input_urls, output_url=output_url).model_dump()
    for index, teacher in enumerate(data["teachers"]):
        teacher["spec"] = TINY_TEACHERS[index % len(TINY_TEACHERS)] if args.tiny else random_init_spec(teacher["spec"])
    for captioner in data["captioners"]:
        captioner["spec"] = TINY_CAPTIONER if args.tiny else random_init_spec(captioner["spec"])
        if args.tiny:
            captioner["num_captions"] = 2
            captioner["sampler"].update(max_length=10, min_length=2)
    if args.tiny:
        data["augmentation"]["num_views"] = 8
    resources = data["resources"]
    cpus = os.cpu_count() or 2
    actor_cpus = min(resources["cpus_per_actor"], max(1, cpus // 2))  # leave Ray CPUs for the unit tasks
    resources.update(actors=1, gpus_per_actor=1 if args.device == "cuda" else 0, cpus_per_actor=actor_cpus,
                     cpu_workers=max(1, cpus - int(actor_cpus)))
    if args.tiny:
        resources["batch_size"] = 4
    return parse_job(data)


def generated_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """512 x 512 JPEGs of smooth random colour fields with fine noise (photo-like to a JPEG codec)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
            (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (IMAGE_SIZE, IMAGE_SIZE, 3))
        buffer = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def caption_text(index: int) -> str:
    return " ".join(WORDS[(index + offset) % len(WORDS)] for offset in range(10))


def write_input(dest: str, pool: list[bytes], samples: int, shards: int) -> list[str]:
    records = tuple(
        SampleRecord(key=f"{index:08d}", caption=caption_text(index), url=f"https://example.com/{index}.jpg",
                     image=pool[index % len(pool)], image_format="jpg")
        for index in range(samples)
    )
    return write_tar_shards(dest, records, shards)


# ---------------------------------------------------------------------- measuring


class Figures:
    """The measured figures, in table order: name -> value, unit, items, seconds, note."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def add(self, name: str, value: float | None, unit: str, items: float | None = None,
            seconds: float | None = None, note: str = "") -> None:
        self.rows[name] = {"value": value, "unit": unit, "items": items, "seconds": seconds, "note": note}

    def rate(self, name: str, items: float, seconds: float, unit: str, note: str = "") -> float:
        self.add(name, items / seconds, unit, items, seconds, note)
        return items / seconds

    def print_table(self) -> None:
        width = max(len(name) for name in self.rows)
        print(f"{'figure':<{width}}  {'value':>12}  unit")
        for name, row in self.rows.items():
            value = "n/a" if row["value"] is None else f"{row['value']:,.4g}"
            measured = f"  ({row['items']:,.0f} in {row['seconds']:.2f} s)" if row["seconds"] else ""
            note = f"  {row['note']}" if row["note"] else ""
            print(f"{name:<{width}}  {value:>12}  {row['unit']}{measured}{note}")


def timed(work: Callable[[], float], seconds: float, sync: Callable[[], None]) -> tuple[float, float]:
    """(items, seconds) of repeated `work()` (which returns the items it did) until `seconds`
    have passed; at least one pass."""
    items = 0.0
    sync()
    started = time.perf_counter()
    while True:
        items += work()
        sync()
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return items, elapsed


class DevicePeak:
    """Peak memory used on a CUDA device by every process (total - free), polled while it runs."""

    def __init__(self, device: torch.device, interval: float = 0.25):
        self.device, self.interval, self.peak = device, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "DevicePeak":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while True:
            free, total = torch.cuda.mem_get_info(self.device)
            self.peak = max(self.peak, total - free)
            if self._stop.wait(self.interval):
                return


def measure_sections(job: JobConfig, pool: list[bytes], args: argparse.Namespace, figures: Figures) -> float:
    """Decode, render, bare teacher forward and captioning, each within args.seconds; returns the
    samples/s the end-to-end run can be expected to reach (to size its input)."""
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    started = time.perf_counter()
    worker = ModelWorker(job, use_gpu=device.type == "cuda")
    figures.add("model load, this process", time.perf_counter() - started, "s",
                note=f"{len(worker.teachers)} teachers, {len(worker.captioners)} captioner(s)")
    cards = {"captioners": [c.card.to_dict() for c in worker.captioners]}
    sizes, cfg = caption_input_sizes(cards), job.augmentation
    batch = job.resources.batch_size

    torch.set_num_threads(1)

    def decode() -> int:
        for data in pool:
            decode_image(data, job.input.max_image_pixels)
        return len(pool)

    figures.rate("decode (one core)", *timed(decode, args.seconds, lambda: None), "images/s",
                 note=f"{IMAGE_SIZE} x {IMAGE_SIZE} JPEG")
    decoded = [decode_image(data, job.input.max_image_pixels) for data in pool[:batch]]
    params = [sample_views(job.seed, f"{index:08d}", *image.shape[1:], cfg) for index, image in enumerate(decoded)]

    def render(images: list[torch.Tensor]) -> int:
        for index, image in enumerate(images):
            render_model_inputs(image, params[index % len(params)], sizes, cfg)
        return len(images)

    figures.rate("CPU render (one core)", *timed(lambda: render(decoded[:1]), args.seconds, lambda: None),
                 "samples/s", note=f"{cfg.num_views} views at {cfg.random_resized_crop.size} px + centre view")
    torch.set_num_threads(model_threads(job.resources))

    on_device = [views_to_device(image.numpy(), device, job.resources.pin_memory) for image in decoded]
    render(on_device[:1])  # warm-up
    figures.rate(f"accelerator render ({device.type})", *timed(lambda: render(on_device), args.seconds, sync),
                 "samples/s")
    rendered = [render_model_inputs(image, p, sizes, cfg) for image, p in zip(on_device, params)]
    views = torch.stack([views for views, _ in rendered])
    caption_views = {size: torch.stack([centre[size] for _, centre in rendered]) for size in sizes}
    del on_device, rendered

    texts = [[caption_text(row + j) for j in range(1 + job.num_captions)] for row in range(len(views))]

    def teacher_forward() -> int:
        for batch_size, teacher in zip(worker.batch_sizes, worker.teachers):
            worker.embed_with(batch_size, teacher, views, texts)
        return len(views)

    teacher_forward()  # warm-up
    forward_rate = figures.rate("bare teacher forward", *timed(teacher_forward, args.seconds, sync), "samples/s",
                                note=f"{len(job.teachers)} teachers x ({cfg.num_views} views + "
                                     f"{1 + job.num_captions} texts), batch {len(views)}")
    flops = teacher_flops_per_sample(job)
    _, peak_tflops = device_peak(args)
    achieved = flops * forward_rate / 1e12 if flops else None
    figures.add("teacher forward TFLOP/s", achieved, "TFLOP/s", note=f"{flops / 1e9:,.1f} GFLOP per sample"
                if flops else "FLOPs unknown for these architectures")
    figures.add("teacher MFU", achieved / peak_tflops if achieved and peak_tflops else None, "of peak",
                note=f"peak {peak_tflops:g} TFLOP/s" if peak_tflops else "no peak for this device: --gpu or --peak-tflops")

    caption_rate = math.inf
    for config, captioner in zip(job.captioners, worker.captioners):
        images = caption_views[captioner.card.input_size]
        seeds = caption_seeds(job.seed, config.id, [f"{row:08d}" for row in range(len(images))], config.num_captions)
        tokens_done = []

        def caption() -> int:
            rows = captioner.generate(images, seeds, config.sampler)
            tokens_done.append(sum(len(tokens) for row in rows for tokens in row))
            return len(images)

        captioner.generate(images[:1], seeds[:1], config.sampler)  # warm-up
        samples, seconds = timed(caption, args.seconds, sync)
        figures.rate(f"captioning tokens/s ({config.id})", sum(tokens_done), seconds, "tokens/s",
                     note=f"{config.num_captions} captions x <= {config.sampler.max_length} tokens per sample")
        caption_rate = min(caption_rate, figures.rate(f"captioning samples/s ({config.id})", samples, seconds,
                                                      "samples/s"))
    if device.type == "cuda":
        figures.add("peak GPU memory, bare sections", torch.cuda.max_memory_allocated(device) / 2**30, "GiB",
                    note="torch allocator, this process")
    models_rate = 1 / (1 / forward_rate + (1 / caption_rate if caption_rate < math.inf else 0))
    cpu_rate = figures.rows["CPU render (one core)"]["value"] * job.resources.cpu_workers
    return min(models_rate, cpu_rate)


def measure_end_to_end(job_for: Callable[[list[str], str], JobConfig], pool: list[bytes], samples: int,
                       scratch: str, args: argparse.Namespace, figures: Figures, bare_rate: float) -> None:
    probe = job_for(["unused.tar"], f"{scratch}/out")
    shards = max(1, min(2 * probe.resources.cpu_workers, samples // probe.resources.batch_size))
    job = job_for(write_input(f"{scratch}/input", pool, samples, shards), f"{scratch}/out")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.device == "cuda":
        with DevicePeak(torch.device("cuda")) as device_peak_memory:
            run, memory, ray_seconds = run_pipeline(job, repeats=1)
    else:
        run, memory, ray_seconds = run_pipeline(job, repeats=1)
    steady = run["samples"] / (run["wall"] - run["startup"])
    figures.rate("end to end, after start-up", run["samples"], run["wall"] - run["startup"], "samples/s",
                 note=f"{shards} units, {job.resources.cpu_workers} CPU workers, 1 model actor")
    figures.rate("end to end, whole run", run["samples"], run["wall"], "samples/s",
                 note=f"start-up {run['startup']:.1f} s; Ray start {ray_seconds:.1f} s not counted")
    figures.add("end to end / bare teacher forward", steady / bare_rate, "ratio", note="goal >= 0.9")
    if args.device == "cuda":
        figures.add("peak GPU memory, pipeline", device_peak_memory.peak / 2**30, "GiB",
                    note="whole device, polled during the run")
    else:
        actor = memory.get("model actor")
        figures.add("peak model actor memory, pipeline", actor / 2**30 if actor else None, "GiB",
                    note="resident (VmHWM); no GPU")


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models and a smaller recipe (CPU smoke test)")
    parser.add_argument("--job", type=Path, default=RECIPE, help="the recipe (its models become random-weight)")
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"), help="where the figures are written")
    parser.add_argument("--seconds", type=float, help="time budget of each section (default 15, --tiny 2)")
    parser.add_argument("--e2e-seconds", type=float, help="end-to-end run length to size its input for "
                                                          "(default 90, --tiny 10)")
    parser.add_argument("--max-samples", type=int, default=20_000, help="bound on the end-to-end input")
    parser.add_argument("--gpu", choices=sorted(GPU_PEAK_TFLOPS), help="peak FLOP/s from this GPU's table entry")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s (overrides --gpu)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); "
              "`--device cpu --tiny` runs the same measurements with tiny models on the CPU", file=sys.stderr)
        return 2
    args.seconds = args.seconds or (2.0 if args.tiny else 15.0)
    args.e2e_seconds = args.e2e_seconds or (10.0 if args.tiny else 90.0)
    started = time.perf_counter()
    figures = Figures()
    with tempfile.TemporaryDirectory() as scratch:
        def job_for(urls: list[str], out: str) -> JobConfig:
            return recipe_job(args, urls, out)

        job = job_for(["unused.tar"], f"{scratch}/out")
        pool = generated_jpegs(max(job.resources.batch_size, 8))
        expected = measure_sections(job, pool, args, figures)
        gc.collect()  # the sections' models and tensors, before the pipeline's actor takes the device
        if args.device == "cuda":
            torch.cuda.empty_cache()
        batch = job.resources.batch_size
        samples = int(min(args.max_samples, max(4 * batch, expected * args.e2e_seconds)))
        measure_end_to_end(job_for, pool, samples, scratch, args, figures,
                           figures.rows["bare teacher forward"]["value"])
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {
        "device": device_name, "torch": torch.__version__, "commit": git_commit(), "cpus": os.cpu_count(),
        "job": job.name, "tiny": args.tiny, "views": job.augmentation.num_views, "captions": job.num_captions,
        "teachers": [t.spec for t in job.teachers], "captioners": [c.spec for c in job.captioners],
        "section_seconds": args.seconds, "seconds": time.perf_counter() - started, "figures": figures.rows,
    }
    print(f"gpu_check on {device_name} ({os.cpu_count()} CPUs, torch {torch.__version__}): {job.name} recipe, "
          f"{'tiny' if args.tiny else 'random-weight'} models {', '.join(report['teachers'] + report['captioners'])}")
    figures.print_table()
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{report['seconds']:.0f} s; figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
