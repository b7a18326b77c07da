"""Faults on demand, for the reliability tests: a teacher that dies or fails as told, and a
filesystem whose writes break. Both are named by strings (a `python:` spec, an fsspec
protocol), so they reach Ray workers the way real teachers and storage do."""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import threading
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from dr_pipeline.core.config import TeacherConfig
from tests.events import send_event
from teachers import build_teacher

TINY_TEACHER = "open_clip:dr-tiny-vit-32"
FLAKY_SPEC = "python:tests.reliability.faulty:FlakyTeacher"


class FlakyTeacher:
    """The tiny open_clip teacher, with the faults its options ask for:

    - die_at_call N, die_marker PATH: the actor process SIGKILLs itself at its Nth image batch,
      once (the marker file records that it happened, across the restart);
    - fail_on_text WORD, attempts_log PATH: every text batch holding WORD raises, and appends
      its texts to the log, one line per attempt;
    - hold_on_text WORD, held_marker PATH, held_event PIPE: a text batch holding WORD touches the
      marker, says so on the test's tests.events.EventPipe and never returns (the run is
      interrupted meanwhile), once: not when the marker exists.
    """

    def __init__(self, config: TeacherConfig, device: torch.device, precision: str):
        self.inner = build_teacher(TeacherConfig(id=config.id, spec=TINY_TEACHER), device, precision)
        self.card = dataclasses.replace(self.inner.card, spec=config.spec, kind="python")
        self.options = config.options
        self.image_calls = 0

    def encode_image(self, views: torch.Tensor) -> torch.Tensor:
        self.image_calls += 1
        marker = self.options.get("die_marker")
        if self.image_calls == self.options.get("die_at_call") and marker and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner.encode_image(views)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        held = self.options.get("hold_on_text")
        if held and any(held in text for text in texts) and not os.path.exists(self.options["held_marker"]):
            open(self.options["held_marker"], "w").close()
            send_event(self.options["held_event"], f"holding a text batch with {held!r}")
            threading.Event().wait()
        word = self.options.get("fail_on_text")
        if word and any(word in text for text in texts):
            with open(self.options["attempts_log"], "a") as log:
                log.write(" | ".join(texts) + "\n")
            raise RuntimeError(f"injected failure on a text holding {word!r}")
        return self.inner.encode_text(texts)


class FaultyFileSystem(LocalFileSystem):
    """Local files under the `faulty://` protocol, with write errors set by storage options:

    - read_only: every open for writing raises PermissionError (EROFS);
    - read_only_once: a path; writing turns read-only (as above) once that file exists,
      as when a volume is remounted read-only mid-run;
    - full_for: files whose name contains one of these strings take `capacity` bytes, then
      raise OSError (ENOSPC), leaving them half-written;
    - flaky_for, flaky_failures, attempts_log: an open for writing of a file whose name contains
      one of these strings appends the name to `attempts_log` (a local file: attempts are counted
      across worker processes) and raises OSError (EIO) for the first `flaky_failures` attempts.
    Other options (tokens, keys) are accepted and ignored, as a real backend's would be used.
    """

    protocol = "faulty"

    def __init__(self, read_only: bool = False, full_for: tuple[str, ...] = (), capacity: int = 4,
                 flaky_for: tuple[str, ...] = (), flaky_failures: int = 0, attempts_log: str = "",
                 read_only_once: str | None = None, **options: Any):
        super().__init__(**options)
        self.read_only = read_only
        self.read_only_once = read_only_once
        self.full_for = tuple(full_for)
        self.capacity = capacity
        self.flaky_for = tuple(flaky_for)
        self.flaky_failures = flaky_failures
        self.attempts_log = attempts_log

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        writing = "r" not in mode
        if writing and (self.read_only or (self.read_only_once and os.path.exists(self.read_only_once))):
            raise PermissionError(errno.EROFS, "Read-only file system", path)
        if writing and any(part in os.path.basename(path) for part in self.flaky_for):
            with open(self.attempts_log, "a+") as log:
                log.seek(0)
                earlier = len(log.read().splitlines())
                log.write(os.path.basename(path) + "\n")
            if earlier < self.flaky_failures:
                raise OSError(errno.EIO, "Input/output error (injected, transient)", path)
        file = super()._open(path, mode, **kwargs)
        if writing and any(part in os.path.basename(path) for part in self.full_for):
            return _FillingFile(file, self.capacity)
        return file


class _FillingFile:
    """A file on a disk that fills up after `capacity` bytes."""

    def __init__(self, file: Any, capacity: int):
        self._file = file
        self._room = capacity

    def write(self, data: bytes) -> int:
        if len(data) > self._room:
            self._file.write(bytes(data[: self._room]))
            self._room = 0
            raise OSError(errno.ENOSPC, "No space left on device (injected)", self._file.path)
        self._room -= len(data)
        return self._file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> "_FillingFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._file.close()


def register_faulty_filesystem() -> None:
    """Ray's worker_process_setup_hook: every worker knows the `faulty` protocol."""
    fsspec.register_implementation(FaultyFileSystem.protocol, FaultyFileSystem, clobber=True)


def faulty_runtime_env(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """Ray's RAY_RUNTIME_ENV_HOOK for a driver in its own process: its workers import this
    checkout (PYTHONPATH) and know the `faulty` protocol."""
    repository = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    pythonpath = os.pathsep.join(filter(None, [repository, os.environ.get("PYTHONPATH")]))
    return {**(runtime_env or {}), "env_vars": {"PYTHONPATH": pythonpath},
            "worker_process_setup_hook": "tests.reliability.faulty.register_faulty_filesystem"}
