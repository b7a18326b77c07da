"""The output lease: one run writes an output at a time, on local disks and object stores alike.

A run holds `OUT/lease.json` while it writes: a unique owner id, the host and process that own
it, and a heartbeat time the driver refreshes every HEARTBEAT_SECONDS. Another run on the same
output is refused while the lease is alive. A lease is stale, and taken over, when its heartbeat
is older than its `timeout_seconds` (LEASE_TIMEOUT_SECONDS unless DR_GEN_LEASE_TIMEOUT says
otherwise), or at once when its owner process ran on this host and is gone (a SIGKILLed run
rerun on the same machine does not wait). It is deleted when the run ends.

Object stores have no atomic create-if-absent that every backend shares, so taking the lease is
write, wait, read back: of two runs that start within the same moment, the one whose write
landed last keeps it, and the other, finding another owner at read-back or at its next
heartbeat, stops.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import threading
import time
import uuid
from typing import Any

from dr_pipeline.core.errors import ConfigError, DrGenError, error_line
from dr_pipeline.core.storage import Location, redact_url

LEASE_FILE = "lease.json"
LEASE_TIMEOUT_SECONDS = 120.0
"""A lease whose heartbeat is older than this (seconds) is stale and taken over."""
HEARTBEAT_SECONDS = 15.0
SETTLE_SECONDS = 0.5
"""Between writing a lease and reading it back (a concurrent writer's object lands meanwhile)."""


def lease_timeout() -> float:
    return float(os.environ.get("DR_GEN_LEASE_TIMEOUT", LEASE_TIMEOUT_SECONDS))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def stale_reason(lease: dict[str, Any], now: float | None = None) -> str | None:
    """Why `lease` may be taken over, or None while its owner is alive."""
    age = (now or time.time()) - lease["heartbeat_unix"]
    if age > lease["timeout_seconds"]:
        return f"no heartbeat for {age:.0f}s"
    if lease["host"] == socket.gethostname() and not _pid_alive(lease["pid"]):
        return f"its process {lease['pid']} on this host is gone"
    return None


class OutputLease:
    """`with OutputLease(out):` holds the output's lease, heartbeating in a thread, released on exit.
    Raises ConfigError (one line, exit code 2) when another live run holds it."""

    def __init__(self, out: Location):
        self.out = out
        self.owner = uuid.uuid4().hex
        self.timeout = lease_timeout()
        self.lost: str | None = None  # set when another run took the lease over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "heartbeat_at": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(timespec="seconds"),
            "heartbeat_unix": now,
            "timeout_seconds": self.timeout,
        }

    def _current(self) -> dict[str, Any] | None:
        """The lease as stored; None when there is none, or it is not one (edited by hand, say)."""
        try:
            lease = self.out.read_json(LEASE_FILE)
        except (FileNotFoundError, ValueError):
            return None
        fields = ("owner", "host", "pid", "heartbeat_unix", "timeout_seconds")
        return lease if isinstance(lease, dict) and all(name in lease for name in fields) else None

    def _refuse(self, holder: dict[str, Any]) -> None:
        age = time.time() - holder["heartbeat_unix"]
        raise ConfigError(
            f"{redact_url(self.out.url())} is being written by another run (pid {holder['pid']} on "
            f"{holder['host']}, heartbeat {age:.0f}s ago); wait for it to finish, or after "
            f"{holder['timeout_seconds']:.0f}s without a heartbeat this output is taken over"
        )

    def refuse_if_held(self) -> None:
        """Raise the one-line refusal when another live run holds the output's lease."""
        holder = self._current()
        if holder is not None and holder.get("owner") != self.owner and stale_reason(holder) is None:
            self._refuse(holder)

    def acquire(self) -> None:
        self.refuse_if_held()
        try:
            self.out.write_json_atomic(self._record(), LEASE_FILE)
        except Exception as error:  # any backend error means the same thing to the user
            detail = error_line(error, part="last", with_type=True)
            raise ConfigError(f"output {redact_url(self.out.url())} is not writable ({detail})") from None
        time.sleep(SETTLE_SECONDS)
        holder = self._current()
        if holder is None or holder["owner"] != self.owner:
            if holder is not None:
                self._refuse(holder)
            raise ConfigError(f"{redact_url(self.out.url())}: another run removed this run's lease; retry")
        self._thread = threading.Thread(target=self._heartbeat, name="dr-gen-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(min(HEARTBEAT_SECONDS, self.timeout / 4)):
            try:
                holder = self._current()
                if holder is not None and holder["owner"] != self.owner:
                    self.lost = f"pid {holder['pid']} on {holder['host']}"
                    return
                self.out.write_json_atomic(self._record(), LEASE_FILE)
            except Exception:  # a heartbeat missed is retried at the next beat; the lease times out only after several
                continue

    def check(self) -> None:
        """Raise if another run took this run's lease over (it judged this run dead)."""
        if self.lost:
            raise DrGenError(f"{redact_url(self.out.url())} was taken over by another run ({self.lost}); "
                             "this run stopped")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if still ours. Storage that fails now (turned
        read-only, say) leaves it behind: a rerun on this host takes it over at once, elsewhere
        after its timeout."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(Exception):
            holder = self._current()
            if holder is not None and holder["owner"] == self.owner:
                self.out.remove(LEASE_FILE)

    def __enter__(self) -> "OutputLease":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
