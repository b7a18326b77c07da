"""Every benchmark under bench/ starts as RESULTS.md runs it: `python bench/NAME.py` from the
repository root with nothing on PYTHONPATH (imports between bench scripts resolve from bench/,
the project from its install), shown here by `--help` exiting 0 with argparse's usage."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(path.name for path in (ROOT / "bench").glob("*.py") if "argparse" in path.read_text())


def test_every_runnable_bench_script_is_covered():
    assert {"bench_reader.py", "profile_training_samples.py", "gpu_check.py", "bench_startup.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_starts_without_pythonpath(script):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, f"bench/{script}", "--help"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)

    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:")
