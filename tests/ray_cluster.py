"""Real multi-node Ray clusters on this machine for tests: `ray start` processes with ports and a
temp dir of their own, so no other Ray on the machine (another test run, another user) joins
them. Nodes import this checkout's code (PYTHONPATH).

Also `NodeWatchingTeacher`, a teacher whose batches wait on cluster events, so tests can act
(add a node, kill one) at a known point of a run instead of after a sleep."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))
NODE_WATCHING_SPEC = "python:tests.ray_cluster:NodeWatchingTeacher"
TINY_TEACHER = "open_clip:dr-tiny-vit-32"
EVENT_TIMEOUT = 300.0  # seconds any wait on an event may take before the test fails


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_node(args: list[str], env: dict[str, str], log: list[str]) -> subprocess.Popen:
    """`ray start ... --block` in its own process group; returns once the node is up."""
    process = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in process.stdout:
        log.append(line)
        if "Ray runtime started" in line:
            return process
    raise RuntimeError("ray start failed:\n" + "".join(log[-30:]))


def stop_node(process: subprocess.Popen) -> None:
    """Stop one node started by start_node: its process group (ray start, raylet, its workers)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
            process.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


class LocalCluster:
    """A head and worker nodes of `cpus` CPUs and `gpus` GPUs each; `stop()` ends them all.
    GPUs are declared, not detected: a node of `gpus=1` stands for a GPU machine to Ray's
    scheduler (one model actor of `gpus_per_actor: 1` per node) while torch runs on the CPU.
    Nodes are declared dead about 2 s after their raylet (fast health checks); token
    authentication is off, as the token file in the home folder is shared by every Ray here."""

    NODE_PORT_OPTIONS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                         "--dashboard-agent-grpc-port", "--metrics-export-port")

    def __init__(self, cpus: int = 2, gpus: int = 0):
        self.cpus = cpus
        self.gpus = gpus
        self.gcs_port = free_ports(1)[0]
        self.temp_dir = tempfile.mkdtemp(prefix="drg", dir="/tmp")  # short: socket paths have a length limit
        self.env = {**os.environ,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
                    "RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "4"}
        self.log: list[str] = []
        self.nodes: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def _node_ports(self) -> list[str]:
        return [f"{name}={port}" for name, port in zip(self.NODE_PORT_OPTIONS, free_ports(5))]

    def start_head(self) -> "LocalCluster":
        self.nodes.append(start_node(["--head", f"--port={self.gcs_port}", "--node-ip-address=127.0.0.1",
                                      "--include-dashboard=false", f"--num-cpus={self.cpus}", f"--num-gpus={self.gpus}",
                                      f"--temp-dir={self.temp_dir}", *self._node_ports()], self.env, self.log))
        return self

    def add_node(self) -> subprocess.Popen:
        node = start_node([f"--address={self.address}", "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}",
                           f"--num-gpus={self.gpus}", *self._node_ports()], self.env, self.log)
        self.nodes.append(node)
        return node

    def kill_raylet(self, node: subprocess.Popen) -> None:
        """SIGKILL the node's raylet, as when its machine is preempted; its workers follow it."""
        (raylet,) = [pid for pid in _session_processes(node.pid) if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet"]
        os.kill(raylet, signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{raylet}").exists() or "Z" in _state(raylet), "the raylet to die", 30)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            stop_node(node)


def _session_processes(session: int) -> list[int]:
    """Pids of the processes in this session (a node started by start_node: ray start, raylet, workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session:
                    pids.append(int(entry.name))
            except ProcessLookupError:
                continue
    return pids


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def _on_head_node() -> bool:
    import ray

    here = ray.get_runtime_context().get_node_id()
    (node,) = [n for n in ray.nodes() if n["NodeID"] == here]
    return "node:__internal_head__" in node["Resources"]


def wait_for(predicate: Any, what: str, timeout: float = EVENT_TIMEOUT) -> None:
    """Poll `predicate` until true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.2)


class NodeWatchingTeacher:
    """The tiny open_clip teacher; with option `events` (a folder) it records where it runs
    and its image batches wait on cluster events:

    - every actor touches `events/actor-<node id>` when its model is loaded;
    - `hold_until_released: true`: each image batch touches `events/waiting` and waits until
      the test touches `events/release` (so a run's units are still to do when a node joins);
    - `hold_on_worker_nodes: true`: an image batch on a node other than the head touches
      `events/held-on-worker` and never returns (its node is killed meanwhile).
    """

    def __init__(self, config: Any, device: torch.device, precision: str):
        from dr_pipeline.core.config import TeacherConfig
        from teachers import build_teacher

        self.inner = build_teacher(TeacherConfig(id=config.id, spec=TINY_TEACHER), device, precision)
        self.card = dataclasses.replace(self.inner.card, spec=config.spec, kind="python")
        self.events = Path(config.options["events"])
        self.options = config.options
        import ray

        (self.events / f"actor-{ray.get_runtime_context().get_node_id()}").touch()

    def encode_image(self, views: torch.Tensor) -> torch.Tensor:
        if self.options.get("hold_until_released"):
            (self.events / "waiting").touch()
            wait_for((self.events / "release").exists, "the test's release")
        if self.options.get("hold_on_worker_nodes") and not _on_head_node():
            (self.events / "held-on-worker").touch()
            wait_for(lambda: False, "this node to be killed")
        return self.inner.encode_image(views)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.inner.encode_text(texts)
