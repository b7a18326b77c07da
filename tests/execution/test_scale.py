"""Scale-out: a job across a two-node Ray cluster, and the driver's memory with a large plan."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from dr_pipeline.read.reader import open_dataset
from tests.ray_cluster import LocalCluster

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def two_node_cluster():
    """A head (2 CPUs) and a second node (2 CPUs) on this machine (tests/ray_cluster.py), both
    stopped by the finalizer. Yields the head's address and the nodes' environment."""
    cluster = LocalCluster(cpus=2)
    try:
        cluster.start_head().add_node()
        yield cluster.address, cluster.env
    finally:
        cluster.stop()


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
