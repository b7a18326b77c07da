"""Where model weights come from: weight files named by reference, as in
`open_clip:MODEL@REFERENCE`, and model folders or hub repositories (`hf:`, `st:` specs).

  /path/to/weights.pt          a local file
  hf-hub:ORG/NAME[/FILE]       a file of a Hugging Face hub repository; without FILE, open_clip's
                               checkpoint names (open_clip_model.safetensors, open_clip_pytorch_model.bin)
  s3://bucket/weights.pt       any fsspec URL, copied once into the local cache (DR_GEN_CACHE,
                               default ~/.cache/dr-gen), so every actor on a node reads it locally

`weights_problem` checks a reference offline (spec checks must not touch the network);
`local_weights` fetches it when a model is built. Files behind a URL are taken as immutable.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import fsspec
from fsspec.core import url_to_fs

from dr_pipeline.core.errors import ConfigError, error_line
from dr_pipeline.core.storage import redact_url

QUOTED_ERROR_CHARS = 300
"""At most this much of a library's error is quoted in a ConfigError (model loaders' errors run long)."""
HF_HUB = "hf-hub:"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _hub_parts(reference: str) -> tuple[str, str | None]:
    """(repository id, file or None) of an `hf-hub:ORG/NAME[/FILE]` reference."""
    parts = reference[len(HF_HUB) :].split("/", 2)
    return "/".join(parts[:2]), parts[2] if len(parts) == 3 else None


def is_url(reference: str) -> bool:
    return "://" in reference


def weights_problem(reference: str) -> str | None:
    """What is wrong with a weights reference, checked offline; None when it looks usable."""
    if reference.startswith(HF_HUB):
        repo, filename = _hub_parts(reference)
        if not HUB_ID.fullmatch(repo) or filename == "":
            return f"hf-hub weights must be hf-hub:ORG/NAME or hf-hub:ORG/NAME/FILE, got {reference!r}"
        return None
    if is_url(reference):
        protocol = reference.split("://", 1)[0]
        if protocol not in fsspec.available_protocols():
            return f"unknown protocol {protocol!r} in weights URL {redact_url(reference)!r}"
        return None
    if not os.path.isfile(reference):
        return f"weights file not found: {reference!r}"
    return None


def model_location_problem(location: str) -> str | None:
    """What is wrong with a model folder or hub repository id (ORG/NAME or NAME), checked
    offline; None when it looks usable. A location that exists on disk is a folder."""
    if not location:
        return "missing model id or folder, e.g. ORG/NAME or /path/to/model"
    if os.path.exists(location):
        return None if os.path.isdir(location) else f"{location!r} is a file; expected a model folder"
    if location.startswith((".", "/", "~")) or not re.fullmatch(r"([\w.-]+/)?[\w.-]+", location):
        return f"model folder not found: {location!r} (and it is not a hub id ORG/NAME)"
    return None


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dr-gen"
    return Path(os.environ.get("DR_GEN_CACHE", default))


def _copy_into_cache(url: str) -> str:
    """The URL's file in the local cache; copied under a temp name and renamed, so actors
    fetching the same file at once never read a partial copy."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    target = cache_dir() / "weights" / digest / (posixpath.basename(urlsplit(url).path) or "weights")
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            fs, path = url_to_fs(url)
            fs.get_file(path, str(temp))
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)
    return str(target)


def local_weights(reference: str) -> str:
    """A local path holding the referenced weights, fetched if needed; ConfigError if that fails."""
    try:
        if reference.startswith(HF_HUB):
            from open_clip.pretrained import download_pretrained_from_hf

            repo, filename = _hub_parts(reference)
            return download_pretrained_from_hf(repo, filename=filename)
        if is_url(reference):
            return _copy_into_cache(reference)
    except Exception as error:  # hub and fsspec backends raise many types for one meaning
        raise ConfigError(f"cannot fetch weights {redact_url(reference)!r} ({error_line(error, limit=QUOTED_ERROR_CHARS)})") from error
    return reference


def describe_weights(reference: str) -> str:
    """The reference as a card records it (URL credentials removed)."""
    return redact_url(reference) if is_url(reference) else reference
