"""A gate on the commits of `dr-gen run JOB --extend OUT`, so a test kills the run at a known point.

A driver started with RAY_RUNTIME_ENV_HOOK=tests.execution.sidecar_gate.gated_runtime_env and
DR_GEN_TEST_GATE=PATH (a tests.events.EventPipe) installs `install_gate` in each of its Ray
workers. There the first unit task to commit a sidecar unit writes its stats marker, sends the
marker's path on the pipe and waits forever; every later task waits before writing its marker.
So when the test receives that line, exactly one sidecar unit is committed, the others are not,
and the run cannot finish: the kill lands mid-run by construction.
"""

from __future__ import annotations

import os
import posixpath
import re
import threading
from typing import Any

from tests.events import send_event

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
        send_event(pipe, name)
        threading.Event().wait()

    Location.write_json_atomic = gated_write
