"""Faults during a run, each made real: a teacher actor SIGKILLed mid-run, a batch the models
always fail on, output storage that fills up or turns read-only, and a second run into the
same output. One local Ray session whose workers know the `faulty://` filesystem; every
run is a real run_job over the sample shards (20 samples in 3 units, 2 of them bad).

Every job carries a secret in its storage options, which must never reach an output file,
the driver's output or the Ray logs.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from typer.testing import CliRunner

from dr_pipeline.cli import app
from dr_pipeline.core.config import parse_job
from dr_pipeline.core.errors import ConfigError
from dr_pipeline.dataset.manifest import MANIFEST_FILE
from dr_pipeline.read.reader import open_dataset
from dr_pipeline.execution.run_unit import process_unit
from dr_pipeline.execution.runner import plan_output, run_job
from dr_pipeline.tools.validate import validate_dataset
from dr_pipeline.tools.verify import verify_dataset
from tests.events import EventPipe
from tests.reliability.faulty import FLAKY_SPEC, TINY_TEACHER, register_faulty_filesystem

SECRET = "s3cr3t-t0ken-never-written"
POISON = "coffee"  # in one caption of the sample shards
MAX_BATCH_RETRIES = 2
BATCH_SIZE = 4  # the POISON sample's batch holds it and at least one other
REPOSITORY = str(Path(__file__).resolve().parents[2])
RAY_WORKER_LINE = re.compile(r"^(\x1b\[\d+m)?\(\w+ pid=\d+")


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


def _own_lines(output):
    """dr-gen's lines of a run's output: without the lines Ray forwards from its workers
    ("(ModelHost pid=...) ...", library warnings at model load) and the closing line naming
    the run's log file."""
    return [line for line in output.strip().splitlines()
            if not RAY_WORKER_LINE.match(line) and not line.startswith("log: ")]


def _cli_run(job, root, **popen):
    """`dr-gen run` of `job` in its own process (and session), joined to this module's Ray; the
    process and its Ray workers know the `faulty://` filesystem."""
    job_file = root / "job.yaml"
    job_file.write_text(json.dumps(job.model_dump(mode="json")))
    cli = "from tests.reliability.faulty import register_faulty_filesystem as r; r(); from dr_pipeline.cli import app; app()"
    command = [sys.executable, "-c", cli, "run", str(job_file), "--address", ray.get_runtime_context().gcs_address]
    env = {**os.environ, "RAY_RUNTIME_ENV_HOOK": "tests.reliability.faulty.faulty_runtime_env"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPOSITORY,
                            start_new_session=True, env=env, **popen)


def test_output_turning_read_only_mid_run_fails_the_units_in_one_line_each(sample_shards, small_job_dict, tmp_path):
    """Writes fail from the moment unit 00000 commits (a volume remounted read-only): units
    00001 and 00002 fail after their retries, and so does the driver's dataset.json."""
    out = tmp_path / "out"
    teacher = {"id": "tiny", "spec": TINY_TEACHER}
    job = _job(sample_shards, small_job_dict, f"faulty://{out}", teacher,
               {"read_only_once": str(out / "data" / "00000.stats.json")})
    run = _cli_run(job, tmp_path)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 1, stdout + stderr
    lines = _own_lines(stderr)
    assert lines[0].startswith("dataset.json not updated: PermissionError") and "Read-only file system" in lines[0], stderr
    assert [line.split(":")[0] for line in lines[1:3]] == ["unit 00001 failed", "unit 00002 failed"]
    assert all("Read-only file system" in line for line in lines[1:3])
    assert lines[3:] == ["rerun the same command to retry the failed units"]
    assert "Traceback" not in stdout + stderr  # neither the driver's nor Ray's retries'
    assert sorted(p.name for p in (out / "data").iterdir()) == ["00000.failures.jsonl", "00000.parquet",
                                                                "00000.stats.json"]


def test_ctrl_c_cancels_the_units_in_flight_and_writes_what_committed(sample_shards, small_job_dict, tmp_path):
    """SIGINT to the driver's process group while unit 00002 (holding "motorcycle") is in flight,
    units 00000 and 00001 committed; then a rerun completes the dataset."""
    out = tmp_path / "out"
    with EventPipe(str(tmp_path / "events")) as events:
        options = {"hold_on_text": "motorcycle", "held_marker": str(tmp_path / "held"), "held_event": events.path}
        job = _job(sample_shards, small_job_dict, out, {"id": "held", "spec": FLAKY_SPEC, "options": options})
        run = _cli_run(job, tmp_path)
        events.wait(run, "a held text batch")
    os.killpg(run.pid, signal.SIGINT)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stdout + stderr
    assert _own_lines(stderr) == ["interrupted: 2 of 3 units committed; rerun the same command to resume"]
    assert "Traceback" not in stdout + stderr
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["status"] == "incomplete" and [u["id"] for u in manifest["units"]] == ["00000", "00001"]
    assert manifest["totals"]["units_done"] == 2 and manifest["totals"]["samples"] == 11
    assert sorted(p.name for p in (out / "data").iterdir() if "00002" in p.name) == []  # no temp file either

    summary = run_job(job)  # the same job: the teacher holds only once
    assert (summary.units_skipped, summary.units_done, summary.units_failed) == (2, 1, [])
    assert validate_dataset(str(out)).problems == []
    assert open_dataset(str(out)).manifest["totals"]["samples"] == 18


def test_a_shard_missing_at_resume_fails_its_unit_until_it_is_back(sample_shards, small_job_dict, tmp_path):
    """A shard deleted after the plan was made (between a kill and the resume): its unit fails
    and is not committed; once the file is back, a rerun commits it with all its samples, and
    a task of that unit run again (its node died after the marker) rewrites nothing."""
    shards = []
    for url in sample_shards:
        shards.append(str(tmp_path / Path(url).name))
        shutil.copy(url, shards[-1])
    job = _job(shards, small_job_dict, tmp_path / "out", {"id": "tiny", "spec": TINY_TEACHER})
    plan_output(job, overwrite=False)
    hidden = tmp_path / "hidden.tar"
    Path(shards[1]).rename(hidden)
    summary = run_job(job)
    (failed,) = summary.units_failed
    assert failed[0] == "00001" and "00001.tar cannot be opened (FileNotFoundError" in failed[1]
    assert "\n" not in failed[1] and summary.units_done == 2
    assert not (tmp_path / "out" / "data" / "00001.stats.json").exists()
    assert [u["id"] for u in open_dataset(str(tmp_path / "out")).units] == ["00000", "00002"]

    hidden.rename(shards[1])
    again = run_job(job)
    assert (again.units_skipped, again.units_done, again.units_failed) == (2, 1, [])
    dataset = open_dataset(str(tmp_path / "out"))
    (unit,) = [u for u in dataset.units if u["id"] == "00001"]
    assert (unit["input_samples"], unit["samples"], unit["failures"]) == (7, 5, 2)
    assert unit["failures_by_reason"] == {"empty_text": 1, "undecodable_image": 1}  # its own bad samples only
    assert validate_dataset(str(tmp_path / "out")).problems == []

    # Ray runs a unit's task again when its node dies: after the marker, that changes nothing.
    data = tmp_path / "out" / "data"
    files = {p.name: p.stat().st_mtime_ns for p in data.iterdir()}
    (planned,) = [u for u in plan_output(job, overwrite=False)[1].units if u.id == "00001"]
    returned = process_unit(planned, job, [None], None)
    assert returned.pop("storage_retries") == 0  # the task's own count, beside the marker's stats
    assert returned == json.loads((data / "00001.stats.json").read_text())
    assert {p.name: p.stat().st_mtime_ns for p in data.iterdir()} == files


@pytest.mark.parametrize("render_views_on", ["cpu", "accelerator"])
def test_one_bad_sample_fails_only_itself_in_both_render_modes(
    render_views_on, sample_shards, small_job_dict, tmp_path
):
    """The row-by-row retry of a failing batch sends each row's views, or its original and view
    parameters when the actor renders them."""
    attempts = tmp_path / "attempts.log"
    teacher = {"id": "flaky", "spec": FLAKY_SPEC, "options": {"fail_on_text": POISON, "attempts_log": str(attempts)}}
    job = _job(sample_shards, small_job_dict, tmp_path / "out", teacher)
    job = parse_job({**job.model_dump(mode="json"),
                     "resources": {**job.resources.model_dump(mode="json"), "render_views_on": render_views_on}})
    summary = run_job(job)
    assert summary.units_failed == [] and summary.units_done == 3
    dataset = open_dataset(str(tmp_path / "out"))
    model_errors = [f for f in _failures(dataset) if f["reason"] == "model_error"]
    assert len(model_errors) == 1 and "injected failure" in model_errors[0]["detail"]
    assert len(dataset) == 17  # 20 less the empty caption, the undecodable image and the bad sample
    batch_lines = [line for line in attempts.read_text().splitlines() if " | " in line]
    assert len(batch_lines) == 1 + MAX_BATCH_RETRIES
    neighbours = set(batch_lines[0].split(" | ")) - {line for line in attempts.read_text().splitlines() if POISON in line and " | " not in line}
    assert neighbours and neighbours <= {row["text"] for row in dataset.iter_samples()}
