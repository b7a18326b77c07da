"""Every file a unit records: present, of its size, of its sha256."""

from __future__ import annotations

import hashlib
from typing import Any

from dr_pipeline.core.storage import Location

_HASH_CHUNK = 8 * 1024 * 1024


def file_problem(out: Location, info: dict[str, Any]) -> str | None:
    """Why a recorded file is not as recorded (None when it is); checksum only when the size agrees."""
    path = out.join(info["path"])
    if not out.exists(info["path"]):  # asked of the store, not of a cached listing
        return "missing"
    size = out.fs.size(path)
    if size != info["bytes"]:
        return f"{size} bytes, the manifest says {info['bytes']}"
    digest = hashlib.sha256()
    with out.fs.open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != info["sha256"]:
        return "sha256 differs from the manifest (the file changed or is corrupt)"
    return None
