"""bench/gpu_check.py: `--device cpu --tiny` runs every section of the GPU check with tiny models
and reports each figure as measured in this run; without CUDA the plain command refuses in one line."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"
PEAK_TFLOPS = 0.5
RATES = [
    "decode (one core)", "CPU render (one core)", "accelerator render (cpu)", "bare teacher forward",
    "captioning tokens/s (coca_l14_mscoco)", "captioning samples/s (coca_l14_mscoco)",
    "end to end, after start-up", "end to end, whole run",
]


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_cpu_tiny_run_measures_every_figure(tmp_path):
    report_file = tmp_path / "gpu_check.json"
    result = _run("--device", "cpu", "--tiny", "--json", str(report_file), "--seconds", "1", "--e2e-seconds", "1",
                  "--max-samples", "16", "--peak-tflops", str(PEAK_TFLOPS))

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_file.read_text())
    figures = report["figures"]
    for name, figure in figures.items():
        assert figure["value"] is not None and math.isfinite(figure["value"]) and figure["value"] > 0, name
        assert name in result.stdout  # one table row per figure
    for name in RATES:  # rates are counted items over measured seconds
        figure = figures[name]
        assert figure["items"] > 0 and figure["seconds"] > 0
        assert figure["value"] == pytest.approx(figure["items"] / figure["seconds"])
    assert figures["end to end, after start-up"]["items"] >= 16
    assert figures["end to end / bare teacher forward"]["value"] == pytest.approx(
        figures["end to end, after start-up"]["value"] / figures["bare teacher forward"]["value"])
    assert figures["teacher MFU"]["value"] == pytest.approx(figures["teacher forward TFLOP/s"]["value"] / PEAK_TFLOPS)
    assert figures["peak model actor memory, pipeline"]["value"] > 0.1  # GiB: torch alone takes more
    assert report["tiny"] and report["views"] == 8 and report["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_2():
    result = _run(timeout=300)

    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--device cpu --tiny" in lines[0]
