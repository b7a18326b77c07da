"""Events from a run's processes to the test that drives it, over a named pipe: no polling.

The test creates an `EventPipe` (a FIFO it holds open for reading) before it starts the run;
a plugin or hook inside the run (a Ray worker, an actor) calls `send_event(path, what)` at the
moment the test waits for, and the test's `wait` returns that line. `wait` also returns, failing,
when the run's process ends first; its timeout only guards against hangs.
"""

from __future__ import annotations

import os
import select
import subprocess

EVENT_TIMEOUT = 300
"""Seconds a test waits for an event on a loaded machine before it fails."""


def send_event(path: str, what: str) -> None:
    """Write one line to the test's pipe (blocks until the test holds it open, which it does from the start)."""
    with open(path, "w") as pipe:
        pipe.write(what + "\n")


class EventPipe:
    """The test's end: a named pipe at `path`, open for reading from creation on."""

    def __init__(self, path: str):
        os.mkfifo(path)
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # no writer yet: select waits for one

    def wait(self, process: subprocess.Popen, what: str, timeout: float = EVENT_TIMEOUT) -> str:
        """The next line sent; fails when `process` ends first or nothing comes within `timeout` s."""
        ended = os.pidfd_open(process.pid)
        try:
            ready, _, _ = select.select([self._fd, ended], [], [], timeout)
        finally:
            os.close(ended)
        assert self._fd in ready, (f"the run ended (code {process.poll()}) before {what}" if ready
                                   else f"no {what} within {timeout} s")
        line = b""
        while not line.endswith(b"\n"):  # a sender writes one short line, then closes the pipe
            select.select([self._fd], [], [], timeout)
            chunk = os.read(self._fd, 4096)
            assert chunk, f"the pipe closed without a whole line for {what}"
            line += chunk
        return line.decode().strip()

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> "EventPipe":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
