"""Elastic model actors (`resources.actors: {min, max}`) on a real multi-node Ray cluster
(tests/ray_cluster.py: `ray start` head and nodes on this machine, each declaring 2 CPUs and
one GPU, so that each holds one model actor, as a GPU machine does; the models run on the CPU).

- A run starts on the head alone, with its units held at their first batch; a second node
  joins then, and once the run's progress line counts 2 model actors the units go on: the
  run gave the new actor units, and units are written on both nodes.
- A run on two nodes whose worker node's raylet is SIGKILLed while that node holds units in
  flight: the run completes on the head, every unit committed once, and the dataset equals
  the uninterrupted run's.
Each run is `dr-gen run --address` in its own process, over 8 small shards (20 samples), with
the tiny open_clip teacher wrapped to wait on those events (NodeWatchingTeacher)."""

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from dr_pipeline.read.reader import open_dataset
from dr_pipeline.tools.sample_data import write_sample_data
from dr_pipeline.tools.validate import validate_dataset
from tests.ray_cluster import EVENT_TIMEOUT, NODE_WATCHING_SPEC, LocalCluster, wait_for

pytestmark = pytest.mark.timeout(900)
UNITS = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_sample_data(str(tmp_path_factory.mktemp("elastic_input")), num_shards=UNITS)


def _start_run(cluster, root: Path, shards, small_job_dict, **teacher_options) -> subprocess.Popen:
    """`dr-gen run` of a one-teacher job with actors {min: 1, max: 2}, one per (declared) GPU."""
    events = root / "events"
    events.mkdir()
    teacher = {"id": "tiny", "spec": NODE_WATCHING_SPEC, "options": {"events": str(events), **teacher_options}}
    job = small_job_dict(shards, root / "out", teachers=[teacher], captioners=[],
                         resources={"actors": {"min": 1, "max": 2}, "cpus_per_actor": 1, "gpus_per_actor": 1,
                                    "cpu_workers": 2, "batch_size": 2})
    job_file = root / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    return subprocess.Popen([sys.executable, "-m", "dr_pipeline.cli", "run", str(job_file), "--address", cluster.address],
                            env=cluster.env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(run: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = run.communicate(timeout=EVENT_TIMEOUT)
    except subprocess.TimeoutExpired:
        run.kill()
        out, err = run.communicate()
    return run.returncode, out, err


@pytest.fixture(scope="module")
def grown_run(shards, small_job_dict, tmp_path_factory):
    """Head alone; the second node joins once the first batch waits for it."""
    root = tmp_path_factory.mktemp("grown")
    cluster = LocalCluster(cpus=2, gpus=1).start_head()
    try:
        run = _start_run(cluster, root, shards, small_job_dict, hold_until_released=True)
        lines: list[str] = []
        two_actors = threading.Event()

        def read_progress() -> None:  # the progress lines (a pipe: one each time the actor count changes)
            for line in run.stdout:
                lines.append(line)
                if "2 model actors" in line:
                    two_actors.set()

        reader = threading.Thread(target=read_progress, daemon=True)
        reader.start()
        wait_for(lambda: (root / "events" / "waiting").exists() or run.poll() is not None, "the first batch")
        assert run.poll() is None, run.communicate()
        cluster.add_node()
        wait_for(lambda: two_actors.is_set() or run.poll() is not None, "a second model actor in the run")
        (root / "events" / "release").touch()
        run.wait(timeout=EVENT_TIMEOUT)
        reader.join(EVENT_TIMEOUT)
        return run.returncode, "".join(lines), run.stderr.read(), root / "out"
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def node_lost_run(shards, small_job_dict, tmp_path_factory):
    """Head and a worker node; the worker's raylet is killed while its actor holds a batch."""
    root = tmp_path_factory.mktemp("node_lost")
    cluster = LocalCluster(cpus=2, gpus=1).start_head()
    try:
        worker = cluster.add_node()
        run = _start_run(cluster, root, shards, small_job_dict, hold_on_worker_nodes=True)
        held = root / "events" / "held-on-worker"
        wait_for(lambda: held.exists() or run.poll() is not None, "a batch on the worker node")
        assert run.poll() is None, run.communicate()
        cluster.kill_raylet(worker)
        return (*_finish(run), root / "out")
    finally:
        cluster.stop()


def test_a_node_that_joins_mid_run_gets_an_actor_and_units(grown_run):
    returncode, out, err, output = grown_run
    assert returncode == 0, out + err
    assert f"{UNITS} units written" in out
    dataset = open_dataset(str(output))
    (run,) = dataset.manifest["runs"]
    assert len(run["actor_nodes"]) == len(set(run["actor_nodes"])) == 2  # the second actor on the new node
    assert set(run["units_by_node"]) == set(run["actor_nodes"])  # units written on both nodes
    assert sum(run["units_by_node"].values()) == len(dataset.units) == UNITS
    assert validate_dataset(str(output)).problems == []
    totals = dataset.manifest["totals"]
    assert (totals["input_samples"], totals["samples"], totals["failures"]) == (20, 18, 2)


def test_a_node_lost_mid_run_has_its_units_redone_elsewhere_once(node_lost_run, grown_run):
    returncode, out, err, output = node_lost_run
    assert returncode == 0, out + err
    assert f"{UNITS} units written" in out and "failed" not in err
    dataset = open_dataset(str(output))
    assert dataset.manifest["status"] == "complete"
    (run,) = dataset.manifest["runs"]
    assert len(set(run["actor_nodes"])) == 2  # an actor ran on the lost node
    (head,) = run["units_by_node"]  # the lost node committed nothing: every unit on the head, once
    assert run["units_by_node"][head] == run["units_written"] == UNITS
    assert validate_dataset(str(output)).problems == []

    reference = open_dataset(str(grown_run[3]))
    assert dataset.manifest["totals"] == reference.manifest["totals"]
    rows = {row["key"]: row for row in dataset.iter_samples()}
    expected = {row["key"]: row for row in reference.iter_samples()}
    assert len(rows) == len(dataset) == 18 and rows.keys() == expected.keys()
    for key, row in expected.items():
        assert rows[key]["aug"] == row["aug"]
        for name in reference.layout.embedding_shapes():
            np.testing.assert_array_equal(rows[key][name], row[name])
