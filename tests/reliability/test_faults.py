"""Faults during a run, each made real: a teacher actor SIGKILLed mid-run, a batch the models
always fail on, output storage that fills up or turns read-only, and a second run into the
same output. One local Ray session whose workers know the `faulty://` filesystem; every
run is a real run_job over the sample shards (20 samples in 3 units, 2 of them bad).

Every job carries a secret in its storage options, which must never reach an output file,
the driver's output or the Ray logs.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from typer.testing import CliRunner

from dr_pipeline.cli import app
from dr_pipeline.config import parse_job
from dr_pipeline.errors import ConfigError
from dr_pipeline.manifest import MANIFEST_FILE
from dr_pipeline.reader import open_dataset
from dr_pipeline.runner import plan_output, run_job
from dr_pipeline.validate import validate_dataset
from dr_pipeline.verify import verify_dataset
from tests.reliability.faulty import FLAKY_SPEC, TINY_TEACHER, register_faulty_filesystem

SECRET = "s3cr3t-t0ken-never-written"
POISON = "coffee"  # in one caption of the sample shards
MAX_BATCH_RETRIES = 2
BATCH_SIZE = 4  # the POISON sample's batch holds it and at least one other
REPOSITORY = str(Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    """Ray workers import the setup hook before the driver's folder is on their path: PYTHONPATH says it."""
    register_faulty_filesystem()
    pythonpath = os.pathsep.join(filter(None, [REPOSITORY, os.environ.get("PYTHONPATH")]))
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath},
                   "worker_process_setup_hook": "tests.reliability.faulty.register_faulty_filesystem"}
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2, log_to_driver=False,
             runtime_env=runtime_env)
    yield
    ray.shutdown()


def _job(sample_shards, small_job_dict, out, teacher, output_options=None, **overrides):
    """A one-teacher, no-captioner job whose input and output options carry SECRET."""
    return parse_job(small_job_dict(
        sample_shards, out, teachers=[teacher], captioners=[],
        input={"storage_options": {"secret_token": SECRET}},
        output={"storage_options": {"token": SECRET, **(output_options or {})}},
        resources={"batch_size": BATCH_SIZE, "max_batch_retries": MAX_BATCH_RETRIES}, **overrides))


@pytest.fixture(scope="module")
def flaky_run(sample_shards, small_job_dict, tmp_path_factory):
    """`dr-gen run` in its own process, joined to this module's Ray: the actor kills itself at
    its 2nd image batch (once), and every batch holding POISON fails."""
    root = tmp_path_factory.mktemp("flaky")
    options = {"die_at_call": 2, "die_marker": str(root / "died"), "fail_on_text": POISON,
               "attempts_log": str(root / "attempts.log")}
    teacher = {"id": "flaky", "spec": FLAKY_SPEC, "options": options}
    job = _job(sample_shards, small_job_dict, root / "out", teacher)
    job_file = root / "job.yaml"
    job_file.write_text(json.dumps(job.model_dump(mode="json")))
    command = [sys.executable, "-m", "dr_pipeline.cli", "run", str(job_file),
               "--address", ray.get_runtime_context().gcs_address]
    # the run's log file (what Ray and the libraries printed) lands under root, where the secret test looks
    env = {**os.environ, "DR_GEN_LOG_DIR": str(root / "logs")}
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPOSITORY, env=env)
    return run, root


def _failures(dataset):
    return [record for unit in dataset.units for record in dataset.failures(unit)]


def test_a_teacher_actor_killed_mid_run_loses_nothing(flaky_run):
    run, root = flaky_run
    assert run.returncode == 0, run.stderr
    assert (root / "died").exists(), "the actor should have killed itself"
    assert "3 units written" in run.stdout
    dataset = open_dataset(str(root / "out"))
    assert dataset.manifest["status"] == "complete"
    assert dataset.manifest["totals"]["input_samples"] == 20
    assert len({row["key"] for row in dataset.iter_samples()}) == len(dataset) == 17
    assert validate_dataset(str(root / "out")).problems == []
    _, checks, replay = verify_dataset(dataset, 64, 0, "cpu")  # recomputed from the replayed views and captions
    assert [check.teacher for check in checks] == ["flaky"] and checks[0].min > 0.999
    assert replay.views == 17 * 3 and replay.mismatched == []


def test_a_batch_that_keeps_failing_is_retried_then_costs_only_its_bad_sample(flaky_run):
    _, root = flaky_run
    attempts = (root / "attempts.log").read_text().splitlines()
    whole_batch = [a for a in attempts if " | " in a]
    assert len(whole_batch) == 1 + MAX_BATCH_RETRIES and len(set(whole_batch)) == 1
    assert 1 < len(whole_batch[0].split(" | ")) <= BATCH_SIZE
    assert len(attempts) == len(whole_batch) + 1 and POISON in attempts[-1]  # then alone, once
    dataset = open_dataset(str(root / "out"))
    model_errors = [f for f in _failures(dataset) if f["reason"] == "model_error"]
    assert len(model_errors) == 1
    assert "injected failure" in model_errors[0]["detail"] and "\n" not in model_errors[0]["detail"]
    neighbours = set(whole_batch[0].split(" | ")) - {attempts[-1]}
    assert neighbours <= {row["text"] for row in dataset.iter_samples()}
    assert dataset.manifest["totals"]["failures_by_reason"] == {
        "empty_text": 1, "model_error": 1, "undecodable_image": 1}


@pytest.fixture(scope="module")
def full_disk_run(sample_shards, small_job_dict, tmp_path_factory):
    """Writes of unit 00001's data file and of unit 00002's completion marker hit a full disk."""
    root = tmp_path_factory.mktemp("full_disk")
    teacher = {"id": "tiny", "spec": TINY_TEACHER}
    full = {"full_for": ["00001.parquet", "00002.stats.json"]}
    job = _job(sample_shards, small_job_dict, f"faulty://{root / 'out'}", teacher, full)
    return job, run_job(job), root / "out"


def test_a_unit_whose_write_fails_is_reported_and_not_counted_done(full_disk_run):
    job, summary, out = full_disk_run
    assert [unit for unit, _ in summary.units_failed] == ["00001", "00002"]
    assert all("No space left on device" in reason and "\n" not in reason for _, reason in summary.units_failed)
    data = sorted(p.name for p in (out / "data").iterdir())
    assert not [name for name in data if name.startswith(".")], "half-written temp files left behind"
    assert "00001.parquet" not in data and "00001.stats.json" not in data
    assert "00002.parquet" in data and "00002.stats.json" not in data  # written, never committed
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["status"] == "incomplete" and [u["id"] for u in manifest["units"]] == ["00000"]
    assert manifest["totals"]["units_done"] == 1
    problems = validate_dataset(str(out)).problems
    assert problems == ["dataset.json: status incomplete: 1 of 3 units committed"]


def test_a_unit_task_that_fails_transiently_twice_is_retried_and_committed(sample_shards, small_job_dict, tmp_path):
    """Opening unit 00001's completion marker fails twice (EIO), then works: its task runs three
    times in all (two retries), the unit commits and nothing is lost."""
    attempts_log = tmp_path / "attempts.log"
    flaky = {"flaky_for": ["00001.stats.json"], "flaky_failures": 2, "attempts_log": str(attempts_log)}
    job = _job(sample_shards, small_job_dict, f"faulty://{tmp_path / 'out'}", {"id": "tiny", "spec": TINY_TEACHER}, flaky)
    summary = run_job(job)
    assert summary.units_failed == [] and summary.units_done == 3
    assert len(attempts_log.read_text().splitlines()) == 3  # 2 failed attempts + the one that committed
    assert validate_dataset(str(tmp_path / "out")).problems == []
    assert open_dataset(str(tmp_path / "out")).manifest["totals"]["input_samples"] == 20


def test_read_only_output_is_refused_before_any_work(full_disk_run, sample_shards, small_job_dict, tmp_path):
    job, _, out = full_disk_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()}
    teacher = {"id": "tiny", "spec": TINY_TEACHER}
    for folder in (out, tmp_path / "fresh"):  # a run to resume, and a first run
        read_only = _job(sample_shards, small_job_dict, f"faulty://{folder}", teacher, {"read_only": True})
        with pytest.raises(ConfigError, match="is not writable .*Read-only file system"):
            run_job(read_only)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()} == before
    assert not (tmp_path / "fresh" / "plan.json").exists()


def test_rerun_on_healthy_storage_redoes_the_failed_units_then_does_nothing(full_disk_run, tmp_path):
    job, _, broken = full_disk_run
    out = tmp_path / "out"
    shutil.copytree(broken, out)
    healthy = parse_job({**job.model_dump(mode="json"), "output": {**job.output.model_dump(mode="json"),
                                                                   "url": str(out), "storage_options": {}}})
    summary = run_job(healthy)
    assert (summary.units_skipped, summary.units_done, summary.units_failed) == (1, 2, [])
    assert validate_dataset(str(out)).problems == []
    totals = open_dataset(str(out)).manifest["totals"]
    assert (totals["input_samples"], totals["samples"], totals["failures"]) == (20, 18, 2)
    data = {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()}
    again = run_job(healthy)
    assert (again.units_done, again.units_skipped) == (0, 3)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()} == data


def test_a_changed_config_is_refused_unless_overwrite(full_disk_run, tmp_path):
    job, _, broken = full_disk_run
    out = tmp_path / "out"
    shutil.copytree(broken, out)
    reseeded = {**job.model_dump(mode="json"), "seed": job.seed + 1,
                "output": {**job.output.model_dump(mode="json"), "url": str(out), "storage_options": {}}}
    job_file = tmp_path / "job.yaml"
    job_file.write_text(json.dumps(reseeded))
    refused = CliRunner().invoke(app, ["run", str(job_file)])
    assert refused.exit_code == 2 and "was written with a different config" in refused.output
    assert "--overwrite" in refused.output and len(refused.output.strip().splitlines()) == 1
    assert (out / "data" / "00000.parquet").exists()
    _, plan = plan_output(parse_job(reseeded), overwrite=True)
    assert [u.id for u in plan.units] == ["00000", "00001", "00002"]
    assert not (out / "data").exists() and not (out / MANIFEST_FILE).exists()
    assert json.loads((out / "plan.json").read_text())["config_hash"] == parse_job(reseeded).output_hash()


def test_no_secret_reaches_outputs_or_logs(flaky_run, full_disk_run):
    """SECRET was in every job's input and output storage options; the runs above met errors."""
    run, root = flaky_run
    roots = [root, full_disk_run[2]]
    assert list((root / "logs").glob("*.log")), "dr-gen run's log file should be under the run's root"
    files = [p for root in roots for p in Path(root).rglob("*") if p.is_file()]
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    files += [p for p in logs.rglob("*") if p.is_file()]
    assert len(files) > 20
    leaked = [str(p) for p in files if p.name != "job.yaml" and SECRET.encode() in p.read_bytes()]
    assert leaked == [] and SECRET not in run.stdout + run.stderr
