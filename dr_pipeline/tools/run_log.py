"""Keep the user's screen to dr-gen's own lines: what libraries print goes to a log file.

Ray (its token-auth warning, worker output forwarded to the driver, retry tracebacks),
open_clip ("No pretrained weights loaded"), Pillow's DecompressionBombWarning and the
like write to the process's stdout / stderr file descriptors, often from C code or
child processes. While a command runs, `library_output_to_log` points descriptors 1
and 2 at the log file, and dr-gen's consoles at copies of the original descriptors.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Iterator

from rich.console import Console

from dr_pipeline.core.errors import error_line

LOG_DIR_ENV = "DR_GEN_LOG_DIR"


def log_dir() -> Path:
    """$DR_GEN_LOG_DIR, else dr-gen-logs in the system's temp folder."""
    return Path(os.environ.get(LOG_DIR_ENV) or Path(tempfile.gettempdir()) / "dr-gen-logs")


def new_log_path(command: str) -> Path:
    folder = log_dir()
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", command)  # a job name may hold spaces or brackets
    return folder / f"{safe}-{stamp}-{os.getpid()}.log"


@contextlib.contextmanager
def library_output_to_log(command: str, consoles: list[Console], announce: Console,
                          always_announce: bool = False) -> Iterator[Path]:
    """Descriptors 1 and 2 go to a fresh log file while the block runs; `consoles` keep writing
    to the original stdout / stderr. The log's path is printed once on `announce`, at the end:
    always when `always_announce` (a run), else only when something was logged; never after
    bad input (exit code 2: its one line is all the user needs). An empty log is removed.
    An unexpected exception is logged with its traceback and becomes one line naming the log,
    exit code 1."""
    import typer

    path = new_log_path(command)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    opened = {fd: _stream_for(stream, fd, saved[fd]) for fd, stream in ((1, sys.stdout), (2, sys.stderr))}
    for console in consoles:
        console.file = opened[2 if console.stderr else 1] or (sys.stderr if console.stderr else sys.stdout)
    exit_code = 0
    named_in_error = False
    with open(path, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield path
        except typer.Exit as stop:
            exit_code = stop.exit_code
            raise
        except (SystemExit, KeyboardInterrupt):
            exit_code = 1
            raise
        except Exception:  # noqa: BLE001 - anything unexpected: details to the log, one line to the user
            traceback.print_exc(file=sys.stderr)
            exit_code = 1
            named_in_error = True
            error = sys.exc_info()[1]
            announce.print(f"error: {error_line(error, part='last')} (details in {path})", markup=False, highlight=False,
                           soft_wrap=True)
            raise typer.Exit(1) from None
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd in (1, 2):
                os.dup2(saved[fd], fd)
                os.close(saved[fd])
            for console in consoles:
                console.file = None  # back to sys.stdout / sys.stderr
            for stream in opened.values():
                if stream is not None:
                    stream.close()
            keep = always_announce or path.stat().st_size > 0
            if not keep:
                path.unlink()
            elif exit_code != 2 and not named_in_error:
                announce.print(f"log: {path}", markup=False, highlight=False, soft_wrap=True)


def _stream_for(stream, fd: int, saved_fd: int):
    """A text stream on a copy of the original descriptor `fd` when `stream` writes to it; None
    when `stream` is something else (a test's capture), which then stays in use."""
    try:
        if stream.fileno() != fd:
            return None
    except (AttributeError, OSError, ValueError):
        return None
    return os.fdopen(os.dup(saved_fd), "w", buffering=1, encoding="utf-8", errors="replace")
