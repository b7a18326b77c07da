"""`dr-gen plan JOB --calibrate N`: N samples through the real pipeline, the measured rate scaled to
the input, priced, beside the FLOP estimate."""

import json

import pytest
from typer.testing import CliRunner

from dr_pipeline.cli import app

pytestmark = pytest.mark.usefixtures("local_ray")
PRICE = 2.5


def _plan(tmp_path, small_job_dict, sample_shards, *args):
    job = tmp_path / "job.json"
    job.write_text(json.dumps(small_job_dict(sample_shards, tmp_path / "never-written")))
    result = CliRunner().invoke(app, ["plan", str(job), *args])
    return result.exit_code, result.stdout, result.stderr


def test_calibration_figures_are_measured_and_consistent(tmp_path, small_job_dict, sample_shards):
    code, out, err = _plan(tmp_path, small_job_dict, sample_shards, "--calibrate", "8",
                           "--price-per-hour", str(PRICE), "--json")

    assert code == 0, err
    report = json.loads(out)
    calibration = report["calibration"]
    assert calibration["samples"] + calibration["failures"] == 8  # the input's first 8 samples ran
    assert calibration["samples"] > 0 and calibration["seconds"] > 0 and calibration["device"] == "cpu"
    rate = calibration["samples_per_second_per_actor"]
    assert rate == pytest.approx(calibration["samples"] / calibration["seconds"])
    assert calibration["input_samples"] == report["input"]["samples"] > 8
    assert calibration["hours"] == pytest.approx(calibration["input_samples"] / rate / 3600)
    assert calibration["hours_unit"] == "actor-hours"
    assert calibration["cost"] == pytest.approx(calibration["hours"] * PRICE)
    assert calibration["estimated_gpu_hours"] == pytest.approx(report["gpu_hours"])
    assert calibration["measured_over_estimated"] == pytest.approx(calibration["hours"] / report["gpu_hours"])
    assert not (tmp_path / "never-written").exists()  # the calibration wrote into a temporary output


def test_calibration_is_printed_beside_the_estimate(tmp_path, small_job_dict, sample_shards):
    code, out, err = _plan(tmp_path, small_job_dict, sample_shards, "--calibrate", "4", "--price-per-hour", "3")

    assert code == 0, err
    assert "samples/s per actor" in out and "actor-hours for" in out and "cost" in out
    assert "measured / estimate" in out


def test_a_price_without_calibration_is_refused(tmp_path, small_job_dict, sample_shards):
    code, _, err = _plan(tmp_path, small_job_dict, sample_shards, "--price-per-hour", "3")

    assert code == 2 and "--calibrate" in err
