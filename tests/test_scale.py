"""Scale-out: a job across a two-node Ray cluster, and the driver's memory with a large plan."""

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from dr_pipeline.reader import open_dataset

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_node(args, env, log):
    """`ray start ... --block` in its own process group; returns once the node is up."""
    process = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in process.stdout:
        log.append(line)
        if "Ray runtime started" in line:
            return process
    raise RuntimeError("ray start failed:\n" + "".join(log[-30:]))


def _stop_node(process):
    """Stop one node started by _start_node: its process group (ray start, raylet, its workers)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
            process.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def two_node_cluster():
    """A head (2 CPUs) and a second node (2 CPUs) on this machine, on ports and a temp dir of their own
    so they cannot meet another Ray on the machine; both stopped by the finalizer. Nodes import this
    checkout's code (PYTHONPATH). Yields the head's address."""
    gcs, *ports = _free_ports(11)
    temp_dir = tempfile.mkdtemp(prefix="drg", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}

    def node_ports(offset):
        names = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--metrics-export-port")
        return [f"{name}={port}" for name, port in zip(names, ports[offset:offset + 5])]

    log, nodes = [], []
    try:
        nodes.append(_start_node(["--head", f"--port={gcs}",
                                  "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--num-cpus=2",
                                  "--num-gpus=0", f"--temp-dir={temp_dir}", *node_ports(0)], env, log))
        nodes.append(_start_node([f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                                  "--num-gpus=0", *node_ports(5)], env, log))
        yield f"127.0.0.1:{gcs}", env
    finally:
        for process in reversed(nodes):
            _stop_node(process)


def test_a_job_runs_on_both_nodes_and_writes_the_single_node_dataset(
    two_node_cluster, reinforced, sample_shards, small_job_dict, tmp_path
):
    address, env = two_node_cluster
    output = tmp_path / "cluster"
    job = small_job_dict(sample_shards, output, resources={"actors": 2, "cpus_per_actor": 1, "cpu_workers": 2,
                                                           "gpus_per_actor": 0, "batch_size": 4})
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    result = subprocess.run([sys.executable, "-m", "dr_pipeline.cli", "run", str(job_file), "--address", address],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr

    cluster, single = open_dataset(str(output)), open_dataset(reinforced.arrow)
    (run,) = cluster.manifest["runs"]
    assert len(set(run["actor_nodes"])) == 2  # one model actor per node
    unit_nodes = {unit["node_id"] for unit in cluster.units}
    assert unit_nodes <= set(run["actor_nodes"]) and len(unit_nodes) == 2  # unit tasks ran on both
    assert sum(run["units_by_node"].values()) == len(cluster.units) == 3

    assert cluster.manifest["config_hash"] == single.manifest["config_hash"]
    assert cluster.manifest["totals"]["samples"] == single.manifest["totals"]["samples"] == 18
    rows = {row["key"]: row for row in cluster.iter_samples()}
    reference = {row["key"]: row for row in single.iter_samples()}
    assert rows.keys() == reference.keys()
    for key, row in reference.items():
        assert rows[key]["aug"] == row["aug"]
        assert rows[key]["captions_tiny_coca"] == row["captions_tiny_coca"]
        for name in single.layout.embedding_shapes():
            np.testing.assert_allclose(rows[key][name], row[name], atol=2e-3)


def _driver_benchmark():
    spec = importlib.util.spec_from_file_location("bench_driver_scale", ROOT / "bench" / "bench_driver_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_drivers_memory_stays_bounded_with_many_units(tmp_path):
    """Planning, resuming, scheduling and the manifest over 10k units (bench/bench_driver_scale.py
    measures 100k): what grows with the plan is the unit list and the set of committed ids, a few
    hundred bytes per unit; the scheduling loop and the manifest writer hold a constant amount."""
    units = 10_000
    phases = {phase.name: phase for phase in _driver_benchmark().measure(units, str(tmp_path))}
    assert phases["plan"].held_mb * 2**20 / units < 400  # bytes per planned unit
    assert phases["resume"].peak_mb * 2**20 / units < 800  # the listing and the committed ids
    assert phases["schedule"].peak_mb < 2  # every unit's stats would be ~30 MB here
    assert phases["manifest"].peak_mb < 16  # one batch of markers; every unit's stats would be ~30 MB
    manifest = open_dataset(str(tmp_path)).manifest
    assert manifest["totals"]["units_done"] == len(manifest["units"]) == units
    assert manifest["status"] == "complete"


def test_cluster_launcher_config_follows_rays_schema():
    """jobs/cluster.yaml against the schema `ray up` validates it with, from the installed Ray."""
    import json

    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "jobs" / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["docker"]["image"].endswith("dr-gen:latest")
    assert {"head", "gpu_worker"} == config["available_node_types"].keys()
