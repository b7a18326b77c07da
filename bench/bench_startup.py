"""Start-up of the commands a newcomer runs first, this checkout beside a baseline commit.

For each of `dr-gen run jobs/quickstart.yaml` (fresh output), `dr-gen inspect OUT` and
`dr-gen validate OUT`, the wall seconds of a fresh process, and which of torch, ray and
transformers the process imported. The baseline is another commit of this repository
(default: main), exported with `git archive` into a temporary folder and run the same way,
with the same Python and the same sample data, one command after the other (the machine is
shared and noisy: compare the two columns, which ran seconds apart).

With --phases, the quickstart is also run once more on each side through `run_job` in one
process, with the seconds since that process started at which the driver reached each phase
(job loaded, runner imported, specs checked, output planned, Ray up, model actors created,
models up, units done) and which of torch, ray, open_clip the driver had imported by then.

    python bench/bench_startup.py [--baseline main] [--repeat 3] [--no-run] [--dataset OUT] [--phases]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "ray", "transformers")
DRIVER_MODULES = ("torch", "ray", "open_clip")
# Prints the heavy modules the command imported, after running it in this process.
PROBE = (
    "import sys, runpy\n"
    "sys.argv = ['dr-gen'] + sys.argv[1:]\n"
    "try:\n    runpy.run_module('dr_pipeline.cli', run_name='__main__')\n"
    "except SystemExit:\n    pass\n"
    f"print('IMPORTED', [m for m in {HEAVY!r} if m in sys.modules], file=sys.__stderr__)\n"
)


# Runs one quickstart through run_job, printing when the driver reached each phase; the functions
# wrapped exist under these names on both sides (the baseline runs them in another order).
PHASES_PROBE = (
    "import functools, json, sys, time\n"
    "t0 = time.perf_counter()\n"
    "marks = {}\n"
    "def mark(label):\n"
    f"    marks.setdefault(label, [round(time.perf_counter() - t0, 2), [m for m in {DRIVER_MODULES!r} if m in sys.modules]])\n"
    "from dr_pipeline.core.config import load_job\n"
    "job = load_job(sys.argv[1], input_urls=sys.argv[2], output_url=sys.argv[3])\n"
    "mark('job loaded')\n"
    "import ray\n"
    "from dr_pipeline.execution import runner\n"
    "from dr_pipeline.execution.model_actors import ModelActors\n"
    "mark('runner imported')\n"
    "def after(owner, name, label):\n"
    "    original = getattr(owner, name)\n"
    "    @functools.wraps(original)\n"
    "    def wrapper(*args, **kwargs):\n"
    "        result = original(*args, **kwargs)\n"
    "        mark(label)\n"
    "        return result\n"
    "    setattr(owner, name, wrapper)\n"
    "after(runner, 'check_job', 'specs checked')\n"
    "after(runner, 'plan_output', 'output planned')\n"
    "after(ray, 'init', 'Ray up')\n"
    "after(ModelActors, 'start', 'model actors created')\n"
    "after(ModelActors, 'wait_started', 'models up')\n"
    "after(runner, 'run_unit_tasks', 'units done')\n"
    "runner.run_job(job)\n"
    "mark('run done')\n"
    "print('PHASES', json.dumps(marks), file=sys.__stderr__)\n"
)


def phases(source: Path, args: list[str], cwd: Path) -> dict[str, list]:
    env = {**os.environ, "PYTHONPATH": str(source), "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-c", PHASES_PROBE, *args], cwd=cwd, env=env, capture_output=True, text=True)
    found = [line.split(" ", 1)[1] for line in done.stderr.splitlines() if line.startswith("PHASES ")]
    return json.loads(found[0]) if found else {"failed": [done.returncode, done.stderr[-300:]]}


def timed(source: Path, args: list[str], cwd: Path) -> tuple[float, list[str], int]:
    env = {**os.environ, "PYTHONPATH": str(source), "RAY_USAGE_STATS_ENABLED": "0"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    imported = next((line.split(" ", 1)[1] for line in done.stderr.splitlines() if line.startswith("IMPORTED")), "?")
    return seconds, imported, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="main", help="git revision to compare with")
    parser.add_argument("--repeat", type=int, default=3, help="runs of inspect / validate (median)")
    parser.add_argument("--no-run", action="store_true", help="skip the quickstart runs (the slow part)")
    parser.add_argument("--dataset", help="an existing quickstart output for inspect / validate (with --no-run)")
    parser.add_argument("--phases", action="store_true", help="also time the run driver's phases (one more run each)")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = Path(tmp)
        baseline = work / "baseline"
        baseline.mkdir()
        archive = subprocess.run(["git", "archive", options.baseline], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive.stdout, check=True)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
        base_commit = subprocess.run(["git", "rev-parse", "--short", options.baseline], cwd=REPO,
                                     capture_output=True, text=True).stdout.strip()
        sources = {f"baseline {options.baseline} ({base_commit})": baseline, f"this checkout ({commit})": REPO}
        timed(REPO, ["sample-data", str(work / "sample_data")], work)
        job = str(REPO / "jobs" / "quickstart.yaml")
        load = os.getloadavg()[0]
        print(f"load average (1 min) at start: {load:.1f} on {os.cpu_count()} cores")
        rows: list[tuple[str, list[str]]] = []
        outputs = {}
        for name, source in sources.items():
            out = work / f"out-{len(outputs)}"
            outputs[name] = out
            if options.no_run:
                continue
            seconds, imported, code = timed(
                source, ["run", job, "--input", str(work / "sample_data" / "{00000..00002}.tar"), "--output", str(out)],
                work)
            rows.append((f"run quickstart [{name}]", [f"{seconds:.1f} s", imported, f"exit {code}"]))
        timelines = {}
        if options.phases:
            for index, (name, source) in enumerate(sources.items()):
                inputs = str(work / "sample_data" / "{00000..00002}.tar")
                timelines[name] = phases(source, [job, inputs, str(work / f"out-phases-{index}")], work)
        if options.no_run:  # inspect / validate need an output: the one given, else one run of this checkout
            reference = Path(options.dataset).resolve() if options.dataset else work / "out-ref"
            if not options.dataset:
                timed(REPO, ["run", job, "--input", str(work / "sample_data" / "{00000..00002}.tar"),
                             "--output", str(reference)], work)
            outputs = {name: reference for name in sources}
        for command in ("inspect", "validate"):
            for name, source in sources.items():
                runs = [timed(source, [command, str(outputs[name])], work) for _ in range(options.repeat)]
                median = statistics.median(seconds for seconds, _, _ in runs)
                rows.append((f"{command} [{name}]", [f"{median:.2f} s (median of {len(runs)})", runs[0][1],
                                                      f"exit {runs[0][2]}"]))
        width = max(len(label) for label, _ in rows)
        print(f"{'command'.ljust(width)}  wall | heavy modules imported | exit")
        for label, cells in rows:
            print(f"{label.ljust(width)}  " + " | ".join(cells))
        if timelines:
            print("\nrun driver: seconds since its process started when it reached each phase "
                  f"| of {', '.join(DRIVER_MODULES)}, those it had imported")
            labels = list(dict.fromkeys(label for timeline in timelines.values() for label in timeline))
            names = list(timelines)
            print(f"{'phase'.ljust(22)}" + "".join(f"{name[:34].ljust(36)}" for name in names))
            for label in labels:
                cells = [timelines[name].get(label) for name in names]
                print(label.ljust(22) + "".join(
                    (f"{cell[0]:6.2f} s {cell[1]}" if cell and label != "failed" else str(cell or "-"))[:34].ljust(36)
                    for cell in cells))
        print(f"load average (1 min) at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
