"""Listing input shards: brace patterns, globs, lists of URLs and folders (img2dataset's output
folder, local or remote), each checked so that a typo fails before any work starts.

A problem here is a config problem (a pattern that matches nothing, a filesystem that cannot
be reached): a ConfigError. Listings are fresh (no cached view of a remote folder).
"""

from __future__ import annotations

import os
import re
from typing import Any

import fsspec
from braceexpand import braceexpand
from fsspec.implementations.local import LocalFileSystem

from dr_pipeline.core.config import InputConfig
from dr_pipeline.core.errors import ConfigError, error_line
from dr_pipeline.core.storage import filesystem, fresh, retrying
from dr_pipeline.sources.formats import format_by_file_name
from dr_pipeline.sources.formats.img2dataset import without_sidecars

_GLOB_CHARACTERS = re.compile(r"[*?[]")
_DIGIT_RUNS = re.compile(r"(\d+)")


def list_shards(config: InputConfig) -> list[str]:
    """Every shard the input names, deduplicated, in natural order ("2.tar" before "10.tar").

    Brace patterns are expanded first, then glob characters (* ? [) are matched
    on the filesystem. A folder stands for its shards (the files whose name an
    input format recognises): a local one, a remote prefix (s3://bucket/prefix,
    with or without its trailing slash) or an http(s) folder listing page. Which literal URLs are checked, so that a typo fails
    here rather than as thousands of failures later:
    - local files: every one (a stat costs microseconds);
    - other filesystems: the first and the last URL of each pattern, which
      catches a wrong bucket, prefix or range end in two requests even when the
      pattern expands to 100k shards; when one of them is a folder, every URL of
      the pattern is asked whether it is one. A shard missing inside the range
      fails its unit when it is read (ShardUnavailable; never committed without it).
    Of a glob's or a folder's files, img2dataset's sidecar files are left out.
    Local paths are returned absolute, since workers may run in another directory.
    """
    shards: dict[str, None] = {}
    for pattern in config.url_list:
        matches = _expand_pattern(pattern.strip(), config.storage_options)
        if not matches:
            raise ConfigError(f"input {pattern!r} matches no shard")
        if matches != list(braceexpand(pattern.strip())):  # a glob or a folder was listed, not named
            matches = without_sidecars(matches)
        shards.update(dict.fromkeys(matches))
    return sorted(shards, key=_natural_sort_key)


def _folder_shards(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The shards of a folder (img2dataset's output folder): its files of a known input format."""
    return [found for found in _glob_files(fs, path.rstrip("/") + "/*") if format_by_file_name(found)]


def _expand_pattern(pattern: str, storage_options: dict[str, Any]) -> list[str]:
    urls = list(braceexpand(pattern))
    try:
        fs, _ = filesystem(urls[0], storage_options)
    except (ImportError, ValueError) as error:
        raise ConfigError(f"input {pattern!r}: cannot use its filesystem ({error_line(error, with_type=True)})") from None
    try:
        if isinstance(fs, LocalFileSystem):
            return _local_matches(pattern, urls, fs)
        return _remote_matches(pattern, urls, fs)
    except ConfigError:
        raise
    except Exception as error:  # credentials, network, DNS: any of them means the input is unusable now
        raise ConfigError(f"input {pattern!r}: cannot reach its filesystem ({error_line(error, with_type=True)})") from None


def _local_matches(pattern: str, urls: list[str], fs: LocalFileSystem) -> list[str]:
    matches, missing = [], []
    for url in urls:
        path = fs._strip_protocol(url)
        if _GLOB_CHARACTERS.search(path):
            matches += _glob_files(fs, path)
        elif os.path.isfile(path):
            matches.append(path)
        elif os.path.isdir(path):
            matches += _folder_shards(fs, path)
        else:
            missing.append(path)
    if missing:
        raise ConfigError(
            f"input {pattern!r}: {len(missing)} of {len(urls)} files do not exist, first {missing[0]}"
        )
    return matches


def _remote_matches(pattern: str, urls: list[str], fs: fsspec.AbstractFileSystem) -> list[str]:
    globbing = "http" not in fs.protocol  # in an http URL, "?" starts the query string
    matches, literals = [], []
    for url in urls:
        if globbing and _GLOB_CHARACTERS.search(url):
            matches += [fs.unstrip_protocol(path) for path in _glob_files(fs, url)]
        else:
            literals.append(fs.unstrip_protocol(fs._strip_protocol(url)))
    checked = {url: _remote_kind(fs, url) for url in dict.fromkeys(literals[:1] + literals[-1:])}
    for url, kind in checked.items():
        if kind is None:
            raise ConfigError(f"input {pattern!r}: {url} does not exist")
    if "directory" in checked.values():  # folders named: few URLs, each asked what it is
        kinds = {url: checked.get(url) or _remote_kind(fs, url) for url in literals}
        literals = [shard for url in literals
                    for shard in ([fs.unstrip_protocol(path) for path in _folder_shards(fs, url)]
                                  if kinds[url] == "directory" else [url])]
    return matches + literals


def _remote_kind(fs: fsspec.AbstractFileSystem, url: str) -> str | None:
    """"file" or "directory" as the store says (no cached listing), None when absent; a
    transient error is retried, never taken for "absent". On http(s), a URL that answers with
    an HTML page is a folder listing (a web server's index of a folder): fsspec lists its links."""
    def probe() -> str | None:
        try:
            info = fresh(fs, url).info(url)
        except (FileNotFoundError, NotADirectoryError):  # the latter: a parent is a file
            return None
        if "http" in fs.protocol and info.get("mimetype") == "text/html":
            return "directory"
        return info.get("type", "file")

    return retrying(probe)


def _glob_files(fs: fsspec.AbstractFileSystem, pattern: str) -> list[str]:
    """Matching files only, from a fresh listing itself (no stat per match)."""
    found = retrying(lambda: fresh(fs).glob(pattern, detail=True))
    return [path for path, info in found.items() if info.get("type") == "file"]


def _natural_sort_key(text: str) -> list[str | int]:
    # Splitting on a captured group alternates text and digits, so positions compare like with like.
    return [int(part) if index % 2 else part for index, part in enumerate(_DIGIT_RUNS.split(text))]
