"""fsspec helpers: every path dr-gen touches goes through these, local or remote alike.

Writes go to a temporary name beside the target and are renamed into place,
so a reader (or a rerun) never sees half a file under a final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.core import url_to_fs

_TEMP_TAG_LENGTH = 12


@dataclass(frozen=True)
class Location:
    """A folder on some filesystem, with the protocol kept so child URLs can be rebuilt."""

    fs: fsspec.AbstractFileSystem
    path: str

    @classmethod
    def from_url(cls, url: str, storage_options: dict[str, Any] | None = None) -> "Location":
        fs, path = url_to_fs(url, **(storage_options or {}))
        return cls(fs, path.rstrip("/") or "/")

    def join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def url(self, *parts: str) -> str:
        return self.fs.unstrip_protocol(self.join(*parts))

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.join(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.join(*parts))

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def write_bytes_atomic(self, data: bytes, *parts: str) -> FileInfo:
        with self.open_atomic(*parts) as handle:
            handle.write(data)
        return handle.info

    def write_json_atomic(self, obj: Any, *parts: str) -> FileInfo:
        return self.write_bytes_atomic(json_bytes(obj), *parts)

    def remove_stale_temps(self, *parts: str) -> None:
        """Delete temp files a killed writer of this target left behind."""
        folder, name = posixpath.split(self.join(*parts))
        for leftover in self.fs.glob(posixpath.join(folder, f".{name}.{'?' * _TEMP_TAG_LENGTH}.tmp")):
            self.fs.rm(leftover)

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
                self.fs.rm(temp)
            raise


@dataclass(frozen=True)
class FileInfo:
    path: str  # relative to the dataset root
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
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
