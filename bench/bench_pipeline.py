"""Where a run's time goes: the pipeline on local Ray against each of its stages measured alone.

    python bench/bench_pipeline.py [--job jobs/quickstart.yaml] [--shards 3] [--copies 1]
                                   [--repeats 1] [--gpu h100 | --peak-tflops 989]

One run prints:
- the run: wall time of `run_job` and end-to-end samples/s. The wall covers everything
  `dr-gen run` does once Ray is up: planning, starting the model actors (process, imports,
  model load), every unit (read, decode, augment, captioning, teacher forward, write, commit)
  and the manifest. Ray's own start is printed apart (a cluster is up before a job).
- every stage measured alone, in this process after the pipeline, on the same data and with
  the torch threads the pipeline gives it (1 for the CPU stage, resources.model_threads for
  the models): load_models, read, decode, augment, to_device, captioning, teacher_forward,
  write (the unit files, committed); their sum and wall / sum, PASS when at most --target (1.25);
- the stage seconds the pipeline's units recorded (summed over units: stages overlap);
- bare teacher forward samples/s on the same views and the ratio end-to-end / bare;
- teacher-forward FLOPs per sample from the architectures (teachers/flops.py) and the model
  FLOPs utilisation against the device's peak (GPU table of dr_pipeline/tools/estimate.py, detected
  from the device name, or --gpu / --peak-tflops);
- peak resident memory (VmHWM) of the driver, the model actor and the CPU workers, and the
  peak GPU memory of the bare forward.
`--copies N` repeats the 20 bundled samples N times (more work per fixed start-up cost);
`--repeats R` runs the pipeline R times and keeps the fastest run, and measures the stages
alone R times and keeps each stage's fastest pass (shared machines are noisy; taking each
stage's minimum makes the sum smaller, the target harder).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import ray
import torch

from dr_pipeline.core.config import JobConfig, load_job, parse_job
from dr_pipeline.tools.estimate import GPU_PEAK_TFLOPS, gpu_name_of_device, teacher_work
from dr_pipeline.dataset.manifest import layout_for, read_manifest
from dr_pipeline.generate.model_worker import ModelWorker, model_threads
from dr_pipeline.dataset.plan import make_plan
from dr_pipeline.generate.prepare import caption_input_sizes, prepare_unit
from dr_pipeline.execution.model_actors import ModelHost
from dr_pipeline.execution.runner import run_job
from dr_pipeline.tools.sample_data import write_sample_data
from dr_pipeline.core.storage import Location
from dr_pipeline.core.timing import StageClock
from dr_pipeline.dataset.formats import open_unit_writer
from dr_pipeline.generate.columns import unit_columns

ROOT = Path(__file__).resolve().parent.parent


class PeakMemory:
    """Peak resident memory (VmHWM) of this process and of every process under it, by role,
    polled from /proc while a local Ray runs (its workers are this process's descendants)."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.peaks: dict[int, int] = {}
        self.roles: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def by_role(self) -> dict[str, int]:
        """Largest peak per role in bytes: driver, model actor, CPU worker (a process that ran a unit task)."""
        peaks: dict[str, int] = {}
        for pid, peak in self.peaks.items():
            role = self.roles.get(pid)
            if role:
                peaks[role] = max(peaks.get(role, 0), peak)
        return peaks

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        """Every process of this run: this one, its descendants, and Ray workers (titled "ray::")
        started after it, which a raylet that is not this process's child may have spawned."""
        me = os.getpid()
        stats = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                stat = _read(f"/proc/{entry}/stat")
                if stat:
                    fields = stat.rsplit(")", 1)[1].split()
                    stats[int(entry)] = (int(fields[1]), int(fields[19]))  # parent, start time
        if me not in stats:
            return
        my_start = stats[me][1]
        for pid, (_, started) in stats.items():
            ancestor = pid
            while ancestor not in (me, 0, 1) and ancestor in stats:
                ancestor = stats[ancestor][0]
            title = _read(f"/proc/{pid}/cmdline")
            if ancestor != me and not (title.startswith("ray::") and started >= my_start):
                continue
            status = _read(f"/proc/{pid}/status")
            peak = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), None)
            if peak is None:
                continue
            self.peaks[pid] = max(self.peaks.get(pid, 0), int(peak) * 1024)
            if pid == me:
                self.roles[pid] = "driver"
            elif ModelHost.__name__ in title:
                self.roles[pid] = "model actor"
            elif "process_unit" in title:
                self.roles[pid] = "CPU worker"


def _read(path: str) -> str:
    try:
        with open(path) as file:
            return file.read()
    except OSError:  # the process ended between listing and reading
        return ""


def run_pipeline(job: JobConfig, repeats: int) -> tuple[dict, dict[str, int], float]:
    """The fastest of `repeats` fresh runs: its wall, start-up, samples and stage sums; peak memory; Ray start."""
    ray_start = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)
    ray_seconds = time.perf_counter() - ray_start
    best: dict = {}
    with PeakMemory() as memory:
        for _ in range(repeats):
            summary = run_job(job, overwrite=True)
            _, manifest = read_manifest(job.output.url)
            record = manifest["runs"][-1]
            if not best or summary.seconds < best["wall"]:
                best = {"wall": summary.seconds, "startup": summary.startup_seconds, "samples": summary.samples,
                        "stages": record["seconds_by_stage"]}
    ray.shutdown()
    return best, memory.by_role(), ray_seconds


def stages_alone(job: JobConfig, scratch: str) -> tuple[Counter, int, float]:
    """Seconds of each stage run alone in this process on the job's input, with the torch threads
    the pipeline gives it (one for the CPU stage, model_threads for the models); samples; peak GPU bytes."""
    clock = StageClock()
    use_gpu = torch.cuda.is_available()
    with clock.stage("load_models"):
        worker = ModelWorker(job, use_gpu=use_gpu)
    cards = {kind: worker.describe()[kind] for kind in ("teachers", "captioners")}
    layout = layout_for(job, cards)
    out = Location.from_url(scratch)
    samples = 0
    for unit in make_plan(job.input.url_list):
        torch.set_num_threads(1)
        batches = [p for p in prepare_unit(unit.input, job, caption_input_sizes(cards), clock) if p.samples]
        torch.set_num_threads(model_threads(job.resources))
        results = []
        for prepared in batches:
            result = worker.process(prepared.view_batch())
            clock.add(result.seconds)
            results.append(result)
        torch.set_num_threads(1)
        data_file = unit.data_file(job.output.format)
        with clock.stage("write"), open_unit_writer(out, data_file, layout, job.output) as (writer, _):
            for prepared, result in zip(batches, results):
                writer.write(unit_columns(prepared.samples, result, layout))
                samples += len(prepared.samples)
    gpu_peak = torch.cuda.max_memory_allocated() if use_gpu else 0
    return clock.seconds, samples, gpu_peak


def process_start_seconds(job: JobConfig) -> float:
    """Wall seconds of a fresh Python process that imports what a model actor imports and
    resolves the job's teacher kinds: the start-up every Ray worker process pays once."""
    specs = [t.spec for t in job.teachers] + [c.spec for c in job.captioners]
    script = ("import dr_pipeline.generate.model_worker, dr_pipeline.execution.runner; from teachers import check_spec; "
              f"[check_spec(spec, 'teacher') for spec in {specs[:len(job.teachers)]!r}]")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return time.perf_counter() - started


def teacher_flops_per_sample(job: JobConfig) -> float | None:
    """Forward FLOPs of every teacher on one sample's K views and 1 + S texts; None if a teacher is not covered."""
    flops = [teacher_work(t, 1, job.augmentation.num_views, 1 + job.num_captions).flops for t in job.teachers]
    return None if None in flops else sum(flops)


def device_peak(args: argparse.Namespace) -> tuple[str, float | None]:
    """(device description, peak TFLOP/s): --peak-tflops, else --gpu, else the detected GPU's table entry."""
    if not torch.cuda.is_available():
        return "cpu", args.peak_tflops
    name = torch.cuda.get_device_name()
    if args.peak_tflops:
        return name, args.peak_tflops
    gpu = args.gpu or gpu_name_of_device(name)
    return name, GPU_PEAK_TFLOPS.get(gpu) if gpu else None


def _gib(value: int) -> str:
    return f"{value / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default=str(ROOT / "jobs" / "quickstart.yaml"))
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--copies", type=int, default=1, help="repeat the 20 bundled samples this many times")
    parser.add_argument("--repeats", type=int, default=1,
                        help="pipeline runs and stage-alone passes; the fastest run and each stage's best count")
    parser.add_argument("--render-views-on", choices=["cpu", "accelerator"], help="override the job's resources")
    parser.add_argument("--target", type=float, default=1.25, help="largest passing wall / sum of stages")
    parser.add_argument("--gpu", choices=sorted(GPU_PEAK_TFLOPS), help="peak FLOP/s from this GPU's table entry")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s (overrides --gpu)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory() as scratch:
        shards = write_sample_data(f"{scratch}/input", num_shards=args.shards, copies=args.copies)
        job = load_job(args.job, input_urls=shards, output_url=f"{scratch}/out")
        if args.render_views_on:
            data = job.model_dump()
            data["resources"]["render_views_on"] = args.render_views_on
            job = parse_job(data)
        run, memory, ray_seconds = run_pipeline(job, args.repeats)
        measured = [stages_alone(job, f"{scratch}/alone{repeat}") for repeat in range(args.repeats)]
        alone = Counter({name: min(m[0][name] for m in measured) for name in measured[0][0]})
        samples, gpu_peak = measured[0][1], max(m[2] for m in measured)
    process_start = process_start_seconds(job)

    total_alone = sum(alone.values())
    ratio = run["wall"] / total_alone
    end_to_end = run["samples"] / run["wall"]
    bare = samples / alone["teacher_forward"]
    device, peak = device_peak(args)
    print(f"job {job.name}: {run['samples']} samples x {job.augmentation.num_views} views in {len(shards)} units, "
          f"{len(job.teachers)} teachers, {job.num_captions} captions per sample; {os.cpu_count()} CPUs, "
          f"device {device}, torch {torch.__version__}, model threads {model_threads(job.resources)}")
    print(f"ray start {ray_seconds:.1f} s (not in the run's wall)")
    print(f"run wall {run['wall']:.2f} s (best of {args.repeats}), of which start-up (actors up, models loaded) "
          f"{run['startup']:.2f} s")
    print(f"end-to-end: {end_to_end:.2f} samples/s over the whole run, "
          f"{run['samples'] / (run['wall'] - run['startup']):.2f} samples/s after start-up")
    print(f"stages alone (s, best of {args.repeats}): "
          + ", ".join(f"{name} {value:.2f}" for name, value in sorted(alone.items())) + f"; sum {total_alone:.2f}")
    print(f"wall / sum of stages alone: {ratio:.3f} -> {'PASS' if ratio <= args.target else 'FAIL'} "
          f"(target <= {args.target})")
    steady = (run["wall"] - run["startup"]) / (total_alone - alone["load_models"])
    print(f"where the rest goes: start-up {run['startup']:.2f} s against load_models alone "
          f"{alone['load_models']:.2f} s "
          f"(a fresh Python process importing the model actor's modules takes {process_start:.2f} s; the actor "
          f"and each CPU worker process pay it once); after start-up, wall / sum of the other stages {steady:.3f}")
    print("stages in the run, summed over units (s): "
          + ", ".join(f"{name} {value:.2f}" for name, value in sorted(run["stages"].items())))
    print(f"bare teacher forward on the same views: {bare:.2f} samples/s; "
          f"ratio end-to-end / bare teacher forward: {end_to_end / bare:.3f}")
    flops = teacher_flops_per_sample(job)
    if flops is not None:
        achieved = flops * samples / alone["teacher_forward"]
        mfu = f"MFU {achieved / (peak * 1e12):.3f} of {peak:.0f} TFLOP/s peak" if peak else \
            "MFU n/a (no peak for this device: --gpu or --peak-tflops)"
        print(f"teacher forward: {flops / 1e9:.2f} GFLOP per sample, {achieved / 1e12:.4f} TFLOP/s achieved, {mfu}")
    print("peak memory: " + ", ".join(f"{role} {_gib(value)}" for role, value in sorted(memory.items()))
          + (f", GPU (bare forward) {_gib(gpu_peak)}" if gpu_peak else ""))


if __name__ == "__main__":
    main()
