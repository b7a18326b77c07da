"""fsspec helpers: every path dr-gen touches goes through these, local or remote alike.

Writes go to a temporary name beside the target and are renamed into place,
so a reader (or a rerun) never sees half a file under a final name.

Listings and existence checks drop the filesystem's cached listings first (s3fs, gcsfs keep
them for the life of the process), so a decision is never made on a stale view of the output.
Transient storage errors (connection reset, 503 SlowDown, timeouts) are retried here with
backoff, and counted: `storage_retries()` is what a run records. On s3 the lower layers'
own silent retries are turned off unless the storage options set them, so every retry is
this module's and counted.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import posixpath
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator, TypeVar
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.core import url_to_fs

from dr_pipeline.core.records import FileRecord

_TEMP_TAG_LENGTH = 12
T = TypeVar("T")

STORAGE_ATTEMPTS = 8
"""Tries of one storage call (or one unit) before a transient error is given up on."""
BACKOFF_SECONDS = 0.2
"""First wait after a transient error; doubled each retry (with jitter), at most BACKOFF_CAP_SECONDS."""
BACKOFF_CAP_SECONDS = 10.0

_TRANSIENT_ERRNOS = {errno.EBUSY, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE,
                     errno.ETIMEDOUT, errno.EAGAIN}
# Exception classes, by name, that the HTTP stacks under fsspec raise for a dropped connection,
# a timeout or a garbled response (botocore, aiohttp, http.client, fsspec); named rather than
# imported so that none of those libraries is needed to classify an error.
_TRANSIENT_CLASS_NAMES = {
    "HTTPClientError", "ConnectionClosedError", "EndpointConnectionError", "ReadTimeoutError",
    "ConnectTimeoutError", "ResponseParserError", "IncompleteRead", "ClientPayloadError",
    "ClientConnectionError", "ServerDisconnectedError", "ServerTimeoutError", "FSTimeoutError",
    "RemoteDisconnected",
}
_TRANSIENT_MESSAGES = ("SlowDown", "reduce your request rate", "ServiceUnavailable", "503")
_retries = 0


def storage_retries() -> int:
    """Transient storage errors retried in this process so far."""
    return _retries


def is_transient(error: BaseException) -> bool:
    """Whether a storage error is worth retrying: a dropped connection, a timeout, a 503 SlowDown.
    A missing file, a refused permission or a full disk is not."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, (ConnectionError, TimeoutError)):
            return True
        if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
            return True
        if {cls.__name__ for cls in type(error).__mro__} & _TRANSIENT_CLASS_NAMES:
            return True
        if type(error).__name__ == "ClientError" and any(m in str(error) for m in _TRANSIENT_MESSAGES):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def backoff(attempt: int) -> None:
    """Sleep before retry number `attempt` (1, 2, ...): exponential with full jitter, capped."""
    time.sleep(random.uniform(0.5, 1.0) * min(BACKOFF_CAP_SECONDS, BACKOFF_SECONDS * 2 ** (attempt - 1)))


def count_retry() -> None:
    global _retries
    _retries += 1


def retrying(call: Callable[[], T], attempts: int = STORAGE_ATTEMPTS) -> T:
    """`call()`, retried with backoff while it fails with a transient storage error (each retry
    counted), at most `attempts` tries; other errors propagate at once."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as error:
            if attempt == attempts or not is_transient(error):
                raise
        count_retry()
        backoff(attempt)
    raise AssertionError("unreachable")


def filesystem_options(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The storage options dr-gen opens `url` with: the caller's (none for a local path: one set
    of options serves every URL of a command), plus (on s3, unless set) no retries inside s3fs and
    botocore, since dr-gen retries and counts them itself."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("file", "local"):
        return {}
    options = dict(storage_options or {})
    if protocol in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
        options["config_kwargs"] = config
    return options


def filesystem(url: str, storage_options: dict[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) of `url` opened with filesystem_options; s3fs's own retry loop (a class
    setting, not an option) is cut to one try, since dr-gen retries and counts them itself."""
    fs, path = url_to_fs(url, **filesystem_options(url, storage_options))
    if fs.protocol and "s3" in fs.protocol and hasattr(fs, "retries"):
        fs.retries = 1
    return fs, path


def path_exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether `path` exists, asked of the store (no cached listing); a transient error is
    retried, never taken for "missing" (fsspec's `exists` and `isfile` say False on any error)."""
    def probe() -> bool:
        try:
            fresh(fs, path).info(path)
        except (FileNotFoundError, NotADirectoryError):  # the latter: a parent is a file
            return False
        return True

    return retrying(probe)


def fresh(fs: fsspec.AbstractFileSystem, path: str | None = None) -> fsspec.AbstractFileSystem:
    """`fs` with its cached listings of `path` (and its parents; all when None) dropped."""
    fs.invalidate_cache(path)
    return fs


@dataclass(frozen=True)
class Location:
    """A folder on some filesystem, with the protocol kept so child URLs can be rebuilt."""

    fs: fsspec.AbstractFileSystem
    path: str

    @classmethod
    def from_url(cls, url: str, storage_options: dict[str, Any] | None = None) -> "Location":
        fs, path = filesystem(url, storage_options)
        return cls(fs, path.rstrip("/") or "/")

    def join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def url(self, *parts: str) -> str:
        return self.fs.unstrip_protocol(self.join(*parts))

    def exists(self, *parts: str) -> bool:
        """Asked of the store itself, never of a cached listing."""
        return path_exists(self.fs, self.join(*parts))

    def glob(self, pattern: str) -> list[str]:
        """Paths matching `pattern` (relative to this folder), from a fresh listing."""
        full = self.join(pattern)
        return retrying(lambda: fresh(self.fs, posixpath.dirname(full)).glob(full))

    def cat(self, paths: list[str]) -> dict[str, bytes]:
        """Several files at once (concurrently on object stores), retried as one call."""
        return retrying(lambda: self.fs.cat(paths))

    def remove(self, *parts: str) -> None:
        path = self.join(*parts)
        retrying(lambda: self.fs.rm(path))

    def read_bytes(self, *parts: str) -> bytes:
        path = self.join(*parts)
        return retrying(lambda: self.fs.cat_file(path))

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def write_bytes_atomic(self, data: bytes, *parts: str) -> FileInfo:
        def write() -> FileInfo:
            with self.open_atomic(*parts) as handle:
                handle.write(data)
            return handle.info

        return retrying(write)

    def write_json_atomic(self, obj: Any, *parts: str) -> FileInfo:
        return self.write_bytes_atomic(json_bytes(obj), *parts)

    def remove_stale_temps(self, *parts: str) -> None:
        """Delete temp files a killed writer of this target left behind."""
        folder, name = posixpath.split(posixpath.join(*parts))
        self._remove_temps(folder, name)

    def remove_temps_in(self, folder: str = "") -> None:
        """Delete every temp file a killed writer left in `folder` (only safe for the holder of
        the output's lease: a live writer's temp files look the same)."""
        self._remove_temps(folder, "*")

    def _remove_temps(self, folder: str, name_pattern: str) -> None:
        for leftover in self.glob(posixpath.join(folder, f".{name_pattern}.{'?' * _TEMP_TAG_LENGTH}.tmp")):
            retrying(lambda: self.fs.rm(leftover))

    @contextlib.contextmanager
    def open_atomic(self, *parts: str) -> Iterator["HashingWriter"]:
        """Write to a temp name beside the target; rename into place only if the block succeeds."""
        final = self.join(*parts)
        folder, name = posixpath.split(final)
        temp = posixpath.join(folder, f".{name}.{uuid.uuid4().hex[:_TEMP_TAG_LENGTH]}.tmp")
        self.fs.makedirs(folder, exist_ok=True)
        try:
            with self.fs.open(temp, "wb") as raw:
                writer = HashingWriter(raw, posixpath.relpath(final, self.path))
                yield writer
            self.fs.mv(temp, final)
        except BaseException:
            with contextlib.suppress(Exception):
                retrying(lambda: self.fs.rm(temp))
            raise


@dataclass(frozen=True)
class FileInfo:
    path: str  # relative to the dataset root
    bytes: int
    sha256: str

    def to_dict(self) -> FileRecord:
        return {"path": self.path, "bytes": self.bytes, "sha256": self.sha256}


class HashingWriter:
    """A write-only file object that counts and hashes what passes through it."""

    def __init__(self, raw: BinaryIO, relative_path: str):
        self._raw = raw
        self._path = relative_path
        self._hash = hashlib.sha256()
        self._bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._hash.update(data)
        self._bytes += len(data)
        return self._raw.write(data)

    def flush(self) -> None:
        self._raw.flush()

    def tell(self) -> int:
        return self._bytes

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._raw.closed

    @property
    def info(self) -> FileInfo:
        return FileInfo(self._path, self._bytes, self._hash.hexdigest())


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False, ensure_ascii=False) + "\n").encode()


def url_credentials_problem(url: str) -> str | None:
    """What in the URL could be a credential, or None. dr-gen records input and output URLs
    (plan.json, dataset.json, stats markers, logs), so they must carry none: a password in the
    user info, or the query string of an http(s) URL (signed URLs, tokens; other filesystems
    read "?" as a glob character). The message never repeats the secret."""
    parts = urlsplit(url)
    if not parts.scheme or len(parts.scheme) == 1:
        return None
    where = redact_url(url)
    if parts.password is not None:
        return f"{where} carries a password in the URL"
    if parts.scheme.lower() in ("http", "https") and parts.query:
        return f"{where} carries a query string (signatures and tokens hide there)"
    return None


def redact_url(url: str) -> str:
    """The URL without user info or query string, which is where credentials hide."""
    parts = urlsplit(url)
    if not parts.scheme or len(parts.scheme) == 1:  # a local path (or a Windows drive letter)
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class RetryingReader:
    """A read-only file that survives transient storage errors: it reopens the file and seeks
    back to where it was (each time counted as a retry), so a connection dropped in the middle
    of a large shard costs one request, not the shard.

    It also remembers the storage error that got through (`storage_error`): parsers such as
    pyarrow report corrupt data as OSError too, so a parse error whose cause was storage must
    be told apart from a bad file (`raise_storage_error`) and propagate rather than be
    recorded as one."""

    def __init__(self, opener: Callable[[], BinaryIO]):
        self._opener = opener
        self._file = retrying(opener)
        self._position = 0
        self.storage_error: BaseException | None = None

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return self._retried(method, *args)
        except Exception as error:
            self.storage_error = error
            raise

    def _retried(self, method: str, *args: Any) -> Any:
        for attempt in range(1, STORAGE_ATTEMPTS + 1):
            try:
                return getattr(self._file, method)(*args)
            except Exception as error:
                if attempt == STORAGE_ATTEMPTS or not is_transient(error):
                    raise
            count_retry()
            backoff(attempt)
            self._file = retrying(self._opener)  # the broken one holds no more than a buffer: left to the GC
            self._file.seek(self._position)
        raise AssertionError("unreachable")

    def raise_storage_error(self) -> None:
        """Raise the storage error a read or seek let through, if one did."""
        if self.storage_error is not None:
            raise self.storage_error

    def read(self, size: int = -1) -> bytes:
        data = self._call("read", size)
        self._position += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self._position = self._call("seek", offset, whence)
        return self._position

    def tell(self) -> int:
        return self._position

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RetryingReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
