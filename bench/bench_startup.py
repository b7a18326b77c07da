"""Start-up of the commands a newcomer runs first, this checkout beside a baseline commit.

For each of `dr-gen run jobs/quickstart.yaml` (fresh output), `dr-gen inspect OUT` and
`dr-gen validate OUT`, the wall seconds of a fresh process, and which of torch, ray and
transformers the process imported. The baseline is another commit of this repository
(default: main), exported with `git archive` into a temporary folder and run the same way,
with the same Python and the same sample data, one command after the other (the machine is
shared and noisy: compare the two columns, which ran seconds apart).

    python bench/bench_startup.py [--baseline main] [--repeat 3] [--no-run] [--dataset OUT]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "ray", "transformers")
# Prints the heavy modules the command imported, after running it in this process.
PROBE = (
    "import sys, runpy\n"
    "sys.argv = ['dr-gen'] + sys.argv[1:]\n"
    "try:\n    runpy.run_module('dr_pipeline.cli', run_name='__main__')\n"
    "except SystemExit:\n    pass\n"
    f"print('IMPORTED', [m for m in {HEAVY!r} if m in sys.modules], file=sys.__stderr__)\n"
)


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
        print(f"load average (1 min) at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
