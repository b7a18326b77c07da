"""The output lease, on a local folder and on S3 (moto's server, the `s3` fixture): a second run
on an output being written is refused in one line, exit code 2; a stale lease (its owner killed,
or silent beyond its timeout) is taken over; a live one is kept fresh by its heartbeat."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from dr_pipeline.cli import app
from dr_pipeline.core.errors import ConfigError
from dr_pipeline.execution.lease import LEASE_FILE, OutputLease
from dr_pipeline.core.storage import Location
from tests.storage.conftest import SECRET, s3_upload

WAIT_SECONDS = 300


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path, sample_shards):
    """(input shards, output URL, storage options) on a local disk or on S3."""
    if request.param == "local":
        return sample_shards, str(tmp_path / "out"), {}
    s3 = request.getfixturevalue("s3")
    bucket = f"drgen-lease-{tmp_path.name.lower().replace('_', '-')[-30:]}"
    s3.bucket(bucket)
    return s3_upload(s3, sample_shards, f"{bucket}/input"), f"s3://{bucket}/out", s3.options


def _lease(out):
    out.fs.invalidate_cache()
    return out.read_json(LEASE_FILE) if out.exists(LEASE_FILE) else None


def test_a_second_run_on_an_output_being_written_is_refused_then_takes_over_once_it_died(
    where, small_job_dict, tmp_path
):
    shards, url, options = where
    job_file = tmp_path / "job.yaml"
    job_file.write_text(json.dumps(small_job_dict(shards, url)))
    env = {**os.environ, "RAY_ADDRESS": "", "DR_GEN_STORAGE_OPTIONS": json.dumps(options)}
    first = subprocess.Popen([sys.executable, "-m", "dr_pipeline.cli", "run", str(job_file)], env=env,
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = Location.from_url(url, options)
    try:
        deadline = time.time() + WAIT_SECONDS
        while _lease(out) is None:
            assert first.poll() is None and time.time() < deadline, "the first run never took the lease"
            time.sleep(0.1)
        second = CliRunner().invoke(app, ["run", str(job_file), "--storage-options", json.dumps(options)])
        assert second.exit_code == 2, second.output
        assert len(second.output.strip().splitlines()) == 1 and SECRET not in second.output
        assert "is being written by another run" in second.output and f"pid {first.pid}" in second.output
        overwriting = CliRunner().invoke(app, ["run", str(job_file), "--overwrite", "--storage-options",
                                               json.dumps(options)])
        assert overwriting.exit_code == 2 and "is being written by another run" in overwriting.output
        assert out.exists("plan.json")  # --overwrite deleted nothing
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert _lease(out)["pid"] == first.pid  # left behind by the kill
    with OutputLease(out) as taken:  # its process is gone: stale at once on this host
        assert _lease(out)["owner"] == taken.owner
    assert _lease(out) is None


@pytest.mark.parametrize("seconds_ago, refused", [(5, True), (500, False)])
def test_a_lease_from_another_host_is_kept_until_its_heartbeat_times_out(where, seconds_ago, refused):
    _, url, options = where
    out = Location.from_url(url, options)
    other = {"owner": "elsewhere", "host": "another-" + socket.gethostname(), "pid": 1,
             "heartbeat_at": "", "heartbeat_unix": time.time() - seconds_ago, "timeout_seconds": 120}
    out.write_json_atomic(other, LEASE_FILE)
    lease = OutputLease(out)
    if refused:
        with pytest.raises(ConfigError, match=r"being written by another run \(pid 1 on another-.*heartbeat \d+s ago"):
            lease.acquire()
        assert _lease(out)["owner"] == "elsewhere"
    else:
        with lease:
            assert _lease(out)["owner"] == lease.owner
        assert _lease(out) is None


def test_the_heartbeat_refreshes_the_lease_and_a_takeover_is_noticed(where, monkeypatch):
    _, url, options = where
    monkeypatch.setenv("DR_GEN_LEASE_TIMEOUT", "2")  # a beat every 0.5 s
    out = Location.from_url(url, options)
    lease = OutputLease(out)
    lease.acquire()
    try:
        first_beat = _lease(out)["heartbeat_unix"]
        deadline = time.time() + 60
        while _lease(out)["heartbeat_unix"] == first_beat:
            assert time.time() < deadline, "no heartbeat"
            time.sleep(0.1)
        intruder = {**_lease(out), "owner": "intruder", "pid": 1, "host": "elsewhere"}
        out.write_json_atomic(intruder, LEASE_FILE)
        while not lease.lost:
            assert time.time() < deadline, "the takeover went unnoticed"
            time.sleep(0.1)
        with pytest.raises(Exception, match="was taken over by another run"):
            lease.check()
    finally:
        lease.release()
    assert _lease(out)["owner"] == "intruder"  # not ours any more: left alone
