"""Killing a `dr-gen run` the way a machine dies: the driver and every process it started, at once.

Ray's workers start process groups of their own, so killing the run's process group alone
lets some of them end later, on their own; tests that rerun at once need all of them gone.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
from pathlib import Path

EXIT_TIMEOUT = 120
"""Seconds the killed processes get to be reaped: a guard against hangs, not a sync."""


def process_tree(root_pid: int) -> set[int]:
    """Every process descending from `root_pid`, itself included (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    tree, grew = {root_pid}, True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    return tree


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL `process` and all its descendants at once; return when every one has ended."""
    ending = []
    for pid in process_tree(process.pid):
        with contextlib.suppress(ProcessLookupError):
            ending.append(os.pidfd_open(pid))  # readable once the process has ended
            os.kill(pid, signal.SIGKILL)
    process.wait()
    try:
        while ending:
            ready, _, _ = select.select(ending, [], [], EXIT_TIMEOUT)
            assert ready, f"{len(ending)} processes of the killed run still alive after {EXIT_TIMEOUT} s"
            ending = [fd for fd in ending if fd not in ready]
            for fd in ready:
                os.close(fd)
    finally:
        for fd in ending:
            os.close(fd)
