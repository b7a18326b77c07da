"""A gate on the commits of `dr-gen run JOB --extend OUT`, so a test kills the run at a known point.

A driver started with RAY_RUNTIME_ENV_HOOK=tests.execution.sidecar_gate.gated_runtime_env and
DR_GEN_TEST_GATE=PATH (a named pipe the test has opened for reading) installs `install_gate` in
each of its Ray workers. There the first unit task to commit a sidecar unit writes its stats
marker, writes the marker's path as a line to the pipe and waits forever; every later task
waits before writing its marker. So when the test reads that line, exactly one sidecar unit is
committed, the others are not, and the run cannot finish: the kill lands mid-run by construction.
"""

from __future__ import annotations

import os
import posixpath
import re
import select
import subprocess
import threading
from typing import Any

GATE_VARIABLE = "DR_GEN_TEST_GATE"
_SIDECAR_MARKER = re.compile(r"sidecars/[^/]+/\d+\.stats\.json")


def gated_runtime_env(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """Ray's RAY_RUNTIME_ENV_HOOK for the driver: its workers import this checkout and install the gate."""
    repository = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    pythonpath = os.pathsep.join(filter(None, [repository, os.environ.get("PYTHONPATH")]))
    env_vars = {"PYTHONPATH": pythonpath, GATE_VARIABLE: os.environ[GATE_VARIABLE]}
    return {**(runtime_env or {}), "env_vars": env_vars,
            "worker_process_setup_hook": "tests.execution.sidecar_gate.install_gate"}


def install_gate() -> None:
    """Ray's worker_process_setup_hook: sidecar stats markers go through the gate."""
    from dr_pipeline.core.storage import Location

    write = Location.write_json_atomic
    pipe = os.environ[GATE_VARIABLE]

    def gated_write(self: Location, obj: Any, *parts: str):
        name = posixpath.join(*parts)
        if not _SIDECAR_MARKER.search(name):
            return write(self, obj, *parts)
        try:  # one task, across all worker processes, is the first
            os.close(os.open(pipe + ".first", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            threading.Event().wait()
        write(self, obj, *parts)
        with open(pipe, "w") as signal:
            signal.write(name + "\n")
        threading.Event().wait()

    Location.write_json_atomic = gated_write


class GateSignal:
    """The test's end of the gate: a named pipe opened for reading before the run starts."""

    def __init__(self, path: str):
        os.mkfifo(path)
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # no writer yet: select waits for one

    def wait(self, process: subprocess.Popen, timeout: float) -> str:
        """The line the gate writes once a sidecar unit is committed; fails when the run ends first
        or nothing comes within `timeout` seconds (a guard against hangs, not a sync)."""
        ended = os.pidfd_open(process.pid)
        try:
            ready, _, _ = select.select([self._fd, ended], [], [], timeout)
        finally:
            os.close(ended)
        assert self._fd in ready, (f"the run ended (code {process.poll()}) before committing a sidecar unit"
                                   if ready else f"no sidecar unit committed within {timeout} s")
        line = b""
        while not line.endswith(b"\n"):  # the gate writes one short line, then closes the pipe
            select.select([self._fd], [], [], timeout)
            chunk = os.read(self._fd, 4096)
            assert chunk, "the gate closed the pipe without a line"
            line += chunk
        return line.decode().strip()

    def close(self) -> None:
        os.close(self._fd)
