"""Runs with input and output on s3:// against a real S3 API (moto's server on loopback, the `s3`
fixture): an uninterrupted run, a run SIGKILLed at three moments and resumed, then every reading
command, `--extend`, `open_dataset` and `ReinforcedTorchDataset` on the S3 output."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from dr_pipeline.cli import app
from dr_pipeline.core.config import parse_job
from dr_pipeline.dataset.manifest import committed_unit_ids
from dr_pipeline.dataset.plan import make_plan
from dr_pipeline.read.reader import open_dataset
from dr_pipeline.execution.runner import run_job
from dr_pipeline.core.storage import Location
from dr_pipeline.read.torch_dataset import ReinforcedTorchDataset
from dr_pipeline.tools.validate import validate_dataset
from tests.storage.conftest import SECRET, FaultyProxy, s3_upload

pytestmark = pytest.mark.usefixtures("local_ray")

TIMING_KEYS = {"seconds", "seconds_by_stage", "node_id"}
WAIT_SECONDS = 300


@pytest.fixture(scope="module")
def s3_input(s3, sample_shards):
    bucket = s3.bucket("drgen-run")
    return bucket, s3_upload(s3, sample_shards, "drgen-run/input")


@pytest.fixture(scope="module")
def job_data(s3_input, small_job_dict):
    """The small job over the shards in S3, output URL to be set; storage options not in it.
    No flips or erasing, which the DataCompDR export cannot express."""
    bucket, shards = s3_input
    augmentation = {"horizontal_flip": {"p": 0.0}, "random_erasing": {"p": 0.0}}
    return small_job_dict(shards, f"{bucket}/unset", augmentation=augmentation)


def _with(job_data, output_url, options):
    return {**job_data, "input": {**job_data["input"], "storage_options": options},
            "output": {**job_data["output"], "url": output_url, "storage_options": options}}


@pytest.fixture(scope="module")
def reference(s3, s3_input, job_data):
    """One uninterrupted run on S3: what every other output in this module must equal."""
    url = f"{s3_input[0]}/reference"
    summary = run_job(parse_job(_with(job_data, url, s3.options)))
    assert summary.units_done == 3 and not summary.units_failed
    return url


def _objects(s3, url):
    """Every object under `url`, relative name -> bytes, from a fresh client."""
    fs = s3.filesystem()
    root = url.removeprefix("s3://")
    return {path[len(root) + 1:]: fs.cat_file(path) for path in fs.find(root)}


def _comparable(manifest):
    """dataset.json without what differs between equal runs: timings, run records, node ids, dates, URLs."""
    units = [{k: v for k, v in unit.items() if k not in TIMING_KEYS} for unit in manifest["units"]]
    kept = {k: v for k, v in manifest.items() if k not in ("runs", "updated_at", "created_at", "units", "config")}
    config = {**manifest["config"], "output": {**manifest["config"]["output"], "url": None}}
    return {**kept, "units": units, "config": config}


def _assert_same_dataset(s3, url, reference_url):
    objects, expected = _objects(s3, url), _objects(s3, reference_url)
    assert not [name for name in objects if name.rsplit("/", 1)[-1].startswith(".")], "temporary objects left"
    assert "lease.json" not in objects, "the run's lease was not released"
    data = {name: body for name, body in objects.items() if name.startswith("data/") and ".stats." not in name}
    assert data == {name: body for name, body in expected.items() if name.startswith("data/") and ".stats." not in name}
    assert _comparable(json.loads(objects["dataset.json"])) == _comparable(json.loads(expected["dataset.json"]))
    assert validate_dataset(url, s3.options).problems == []
    assert SECRET.encode() not in b"".join(objects.values())


def test_an_uninterrupted_s3_run_is_complete_and_valid(s3, reference):
    manifest = open_dataset(reference, s3.options).manifest
    assert manifest["status"] == "complete" and manifest["totals"]["units_done"] == 3
    assert validate_dataset(reference, s3.options).problems == []
    names = _objects(s3, reference)
    assert not [n for n in names if n.rsplit("/", 1)[-1].startswith(".")] and "lease.json" not in names


def test_marker_listing_sees_markers_written_after_it_was_cached(s3, s3_input):
    """The resume bug of issue 12: s3fs kept the listing of data/ from the start of the run."""
    url = f"{s3_input[0]}/listing"
    out = Location.from_url(url, s3.options)
    units = make_plan([f"{url}/in/a.tar", f"{url}/in/b.tar"])
    out.write_bytes_atomic(b"{}", "data/a.stats.json")
    assert committed_unit_ids(out, units) == {"a"}
    out.fs.ls(out.join("data"))  # the listing s3fs caches
    s3.filesystem().pipe_file(out.join("data/b.stats.json"), b"{}")  # another writer (a unit task)
    assert committed_unit_ids(out, units) == {"a", "b"}
    assert out.exists("data/b.stats.json")


def _wait_for(condition, process, what):
    deadline = time.time() + WAIT_SECONDS
    while not condition():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"no {what} within {WAIT_SECONDS}s"
        time.sleep(0.1)


def test_a_run_killed_at_three_moments_resumes_to_the_uninterrupted_dataset(
    s3, s3_input, job_data, reference, tmp_path
):
    """SIGKILL the driver's process group while Ray and the model actors start (its lease appeared,
    dataset.json not yet), once the models are up and units run (dataset.json appears), and right
    after a unit commits (a marker appears);
    then rerun: same data files, same dataset.json, valid, no temporary object."""
    url = f"{s3_input[0]}/killed"
    job_file = tmp_path / "job.yaml"
    job_file.write_text(json.dumps(_with(job_data, url, {})))  # options come from the environment
    env = {**os.environ, "RAY_ADDRESS": "", "DR_GEN_STORAGE_OPTIONS": json.dumps(s3.options)}
    command = [sys.executable, "-m", "dr_pipeline.cli", "run", str(job_file)]
    root = url.removeprefix("s3://")
    fs = s3.filesystem()

    def exists(name):
        fs.invalidate_cache()
        return fs.exists(f"{root}/{name}")

    def markers():
        fs.invalidate_cache()
        return len(fs.glob(f"{root}/data/*.stats.json"))

    moments = [
        ("its lease (start-up)", lambda: exists("lease.json")),
        ("dataset.json (models up, units running)", lambda: exists("dataset.json")),
    ]
    for what, happened in moments + [("a new marker", None)]:
        before = markers()
        condition = happened or (lambda: markers() > before)
        process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        _wait_for(condition, process, what)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        if what.startswith("its lease"):
            assert not exists("dataset.json"), "the first kill should land before the models were up"
    assert markers() >= 1
    summary = run_job(parse_job(_with(job_data, url, s3.options)))  # takes the dead run's lease over
    assert summary.units_skipped + summary.units_done == 3 and not summary.units_failed
    _assert_same_dataset(s3, url, reference)


def _cli(*args):
    result = CliRunner().invoke(app, [*args], catch_exceptions=False)
    assert SECRET not in result.output, "the secret was printed"
    return result


def test_every_reading_command_works_on_the_s3_output(s3, reference, tmp_path):
    options = ["--storage-options", json.dumps(s3.options)]
    inspected = _cli("inspect", reference, "--json", *options)
    assert inspected.exit_code == 0 and json.loads(inspected.stdout)["status"] == "complete"
    validated = _cli("validate", reference, *options)
    assert validated.exit_code == 0 and validated.stdout.startswith("intact: 3 units")
    verified = _cli("verify", reference, "--samples", "2", "--json", *options)
    assert verified.exit_code == 0 and json.loads(verified.stdout)["passed"]
    grid = tmp_path / "grid.png"
    shown = _cli("show", reference, "--out", str(grid), "--json", *options)
    assert shown.exit_code == 0 and grid.read_bytes().startswith(b"\x89PNG")
    options_file = tmp_path / "options.json"
    options_file.write_text(json.dumps(s3.options))
    exported = _cli("export", reference, str(tmp_path / "export"), "--format", "datacompdr",
                    "--storage-options", f"@{options_file}")
    assert exported.exit_code == 0, exported.output
    assert sorted(p.name for p in (tmp_path / "export").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    dataset = open_dataset(reference, s3.options)
    assert len(list(dataset.iter_samples())) == len(dataset) == dataset.manifest["totals"]["samples"]
    torch_dataset = ReinforcedTorchDataset(reference, storage_options=s3.options, shuffle=False)
    first = next(iter(torch_dataset))
    assert first["image"].shape[0] == 3


def test_the_environment_gives_storage_options_too(s3, reference):
    result = CliRunner().invoke(app, ["inspect", reference, "--json"],
                                env={"DR_GEN_STORAGE_OPTIONS": json.dumps(s3.options)})
    assert result.exit_code == 0 and SECRET not in result.output
    bad = CliRunner().invoke(app, ["inspect", reference], env={"DR_GEN_STORAGE_OPTIONS": SECRET})
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1
    assert "not valid JSON" in bad.output and SECRET not in bad.output


def test_extend_adds_a_teacher_to_the_s3_output(s3, s3_input, job_data, reference, tmp_path):
    url = f"{s3_input[0]}/extended"
    fs = s3.filesystem()
    fs.copy(reference.removeprefix("s3://"), url.removeprefix("s3://"), recursive=True)
    extended = {**job_data, "teachers": [*job_data["teachers"], {"id": "another_vit", "spec": "open_clip:dr-tiny-vit-32"}]}
    job_file = tmp_path / "extend.yaml"
    job_file.write_text(json.dumps(extended))
    result = _cli("run", str(job_file), "--extend", url, "--storage-options", json.dumps(s3.options))
    assert result.exit_code == 0, result.output
    dataset = open_dataset(url, s3.options)
    assert [t["id"] for t in dataset.manifest["teachers"]][-1] == "another_vit"
    assert validate_dataset(url, s3.options).problems == []
    row = next(dataset.iter_samples())
    assert row["image_emb_another_vit"].shape == row["image_emb_tiny_vit_32"].shape
    objects = _objects(s3, url)
    assert "lease.json" not in objects and SECRET.encode() not in b"".join(objects.values())


def test_transient_storage_errors_are_retried_and_counted(s3, s3_input, job_data, reference):
    """Through a proxy that drops, answers 503 SlowDown to, or holds past the client's read timeout
    5% of all requests (the driver's and the unit tasks', input and output): the same dataset, and
    the run record counts the retries."""
    url = f"{s3_input[0]}/faulty"
    with FaultyProxy(s3.url, share=0.05, seed=12, delay_seconds=3.0) as proxy:
        options = {**s3.options, "endpoint_url": proxy.url,
                   "config_kwargs": {"read_timeout": 2, "connect_timeout": 2}}
        summary = run_job(parse_job(_with(job_data, url, options)))
    assert summary.units_done == 3 and not summary.units_failed
    assert all(proxy.injected.values()), proxy.injected
    _assert_same_dataset(s3, url, reference)
    runs = json.loads(_objects(s3, url)["runs.json"])["runs"]
    assert runs[-1]["storage_retries"] > 0


def test_plan_surveys_the_s3_input_with_storage_options(s3, s3_input, job_data, tmp_path):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(json.dumps(job_data))
    result = _cli("plan", str(job_file), "--json", "--storage-options", json.dumps(s3.options))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) and "\"shards\": 3" in result.stdout
