"""Webdataset tars (img2dataset's default output): recognised by name (.tar, .tar.gz, .tgz) or by
the tar header's "ustar" magic; streamed member by member; counted from img2dataset's stats file
beside the tar, else from the tar's member headers.

A sample is a run of consecutive members sharing a key (webdataset's naming: the member name up
to the first dot of its base name). Image: the first present of jpg, jpeg, png, webp; caption:
txt, else the json member's caption or text; key: json uid, else json key, else the tar key;
url: json url. input.image_column / text_column name member suffixes and input.key_column /
url_column name json fields when set.
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterator

from dr_pipeline.core.config import InputConfig
from dr_pipeline.core.errors import error_line
from dr_pipeline.core.storage import RetryingReader
from dr_pipeline.sources.formats import img2dataset
from dr_pipeline.sources.formats.base import InputFormat, ShardCount, open_input, shard_name
from dr_pipeline.sources.records import UID_FIELD, InputFailure, RawSample, json_key, utf8_text

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
JSON_KEY_FIELDS = ("uid", "key")
JSON_TEXT_FIELDS = ("caption", "text")
FILE_NAME = re.compile(r"\.(tar|tar\.gz|tgz)(\?.*)?$", re.IGNORECASE)


def has_tar_signature(head: bytes) -> bool:
    return head[257:262] == b"ustar"


def read_samples(file: RetryingReader, url: str, config: InputConfig) -> Iterator[RawSample | InputFailure]:
    """The tar's samples, at most one failure where it stops making sense, then the downloads
    img2dataset recorded as failed beside it."""
    yield from _iter_tar(file, shard_name(url), config)
    yield from img2dataset.download_failures(url, config)


class DamagedTarError(tarfile.ReadError):
    """The data ends, or stops being a tar, where a member header belongs."""


class _StrictTarInfo(tarfile.TarInfo):
    """Header parsing that does not mistake a cut or damaged shard for a complete one.

    Python's stream-mode tarfile ends the archive silently at a missing, short
    or invalid header after the first one, so a shard cut at a member boundary
    would read as complete. Here only zero bytes (the end-of-archive marker,
    even when the cut falls inside it) end the archive.
    """

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
        if not buf:
            raise DamagedTarError("the data ends where a tar header or the end-of-archive marker belongs")
        if not buf.strip(b"\0"):
            raise tarfile.EOFHeaderError("end of archive")
        if len(buf) < tarfile.BLOCKSIZE:
            raise DamagedTarError("the data ends inside a tar header")
        try:
            return super().frombuf(buf, encoding, errors)
        except tarfile.HeaderError as error:
            raise DamagedTarError(f"damaged tar header ({error})") from None


_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def base_plus_ext(path: str) -> tuple[str | None, str | None]:
    """(key, suffix) of a tar member, named as webdataset names them (webdataset.tariterators'
    base_plus_ext: the key runs to the first dot of the file name); (None, None) without a dot.
    Written out here: importing webdataset imports torch, which listing and planning do without."""
    match = _MEMBER_NAME.match(path)
    return (match.group(1), match.group(2)) if match else (None, None)


@dataclass
class _MemberRun:
    """Consecutive tar members sharing one key: one sample."""

    key: str
    suffixes: set[str] = field(default_factory=set)
    data: dict[str, bytes] = field(default_factory=dict)
    not_files: dict[str, str] = field(default_factory=dict)  # suffix -> what the member is instead (a link, ...)


@dataclass(frozen=True)
class _TarLayout:
    """Which members and json fields hold what, from the config or img2dataset's conventions."""

    image_suffixes: tuple[str, ...]
    text_suffix: str
    json_text_fields: tuple[str, ...]
    json_key_fields: tuple[str, ...]
    json_url_field: str

    @classmethod
    def from_config(cls, config: InputConfig) -> _TarLayout:
        return cls(
            image_suffixes=(config.image_column,) if config.image_column else IMAGE_SUFFIXES,
            text_suffix=config.text_column or "txt",
            json_text_fields=() if config.text_column else JSON_TEXT_FIELDS,
            json_key_fields=(config.key_column,) if config.key_column else JSON_KEY_FIELDS,
            json_url_field=config.url_column or "url",
        )

    @property
    def read_suffixes(self) -> frozenset[str]:
        return frozenset((*self.image_suffixes, self.text_suffix, "json"))

    def sample(self, run: _MemberRun) -> RawSample:
        meta = _json_object(run.data.get("json"))
        image_suffix = next((suffix for suffix in self.image_suffixes if suffix in run.data), None)
        text_bytes = run.data.get(self.text_suffix)
        if text_bytes is not None:
            text = utf8_text(text_bytes)
        else:
            text = next((meta[name] for name in self.json_text_fields if isinstance(meta.get(name), str)), None)
        url = meta.get(self.json_url_field)
        linked = next((suffix for suffix in self.image_suffixes if suffix in run.not_files), None)
        return RawSample(
            source_key=json_key(meta, self.json_key_fields) or run.key,
            text=text,
            image=run.data[image_suffix] if image_suffix else None,
            image_format=_normalise_format(image_suffix) if image_suffix else None,
            url=url if isinstance(url, str) else None,
            uid=json_key(meta, (UID_FIELD,)),
            image_problem=None if image_suffix or linked is None
            else ("missing_image", f"the {linked} member is {run.not_files[linked]}, not image bytes: "
                                   "links are never followed"),
        )


def _iter_tar(file: RetryingReader, shard: str, config: InputConfig) -> Iterator[RawSample | InputFailure]:
    """Samples of one tar, then at most one failure where it stops making sense.

    webdataset's own tar_file_iterator / group_by_keys do not fit here: the first
    opens tarfile without a way to notice a shard cut at a member boundary, the
    second drops the sample being grouped when an error is raised, so its key
    could not be reported. Its key naming (base_plus_ext) is used as is.
    """
    layout = _TarLayout.from_config(config)
    read_suffixes = layout.read_suffixes
    try:
        tar = tarfile.open(fileobj=file, mode="r|*", tarinfo=_StrictTarInfo)
    except tarfile.TarError as error:
        yield InputFailure(f"{shard}#unreadable", "unreadable_shard", f"not a tar archive: {error_line(error, with_type=True)}")
        return
    run: _MemberRun | None = None
    try:
        with tar:
            while (member := tar.next()) is not None:
                tar.members.clear()  # stream mode keeps every header otherwise: memory grows with the shard
                key, suffix = base_plus_ext(member.name) if not member.isdir() else (None, None)
                if key is None:
                    continue
                suffix = suffix.lower()
                if run is not None and (key != run.key or suffix in run.suffixes):
                    yield layout.sample(run)
                    run = None
                run = run or _MemberRun(key)
                run.suffixes.add(suffix)
                if not member.isreg():  # never followed: its content is not in this tar
                    run.not_files[suffix] = _member_kind(member)
                elif suffix in read_suffixes:
                    run.data[suffix] = tar.extractfile(member).read()
    except tarfile.TarError as error:
        # The sample being read cannot be proven complete, even when the cut fell between its members.
        yield InputFailure(
            run.key if run else f"{shard}#truncated",
            "truncated_shard",
            f"{shard} breaks off{f' in sample {run.key}' if run else ''}: {error_line(error, with_type=True)}",
        )
        return
    if run is not None:
        yield layout.sample(run)


def _member_kind(member: tarfile.TarInfo) -> str:
    """What a tar member that is not a regular file is, for a failure's detail."""
    if member.issym():
        return f"a symbolic link to {member.linkname!r}"
    if member.islnk():
        return f"a hard link to {member.linkname!r}"
    return "not a regular file (a device, fifo or other special member)"


def _json_object(data: bytes | None) -> dict[str, Any]:
    """The json member as a dict; an unparsable one counts as absent (the tar key still applies)."""
    if data is None:
        return {}
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _normalise_format(suffix: str) -> str:
    return "jpg" if suffix == "jpeg" else suffix


def count_member_index(url: str, config: InputConfig) -> ShardCount:
    """Samples, image bytes and caption bytes of one tar from its member headers only."""
    image_suffixes = {config.image_column} if config.image_column else set(IMAGE_SUFFIXES)
    text_suffix = config.text_column or "txt"
    keys: set[str] = set()
    image_bytes = text_bytes = 0
    with open_input(url, config) as file, tarfile.open(fileobj=file, mode="r:*") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, suffix = base_plus_ext(member.name)
            if key is None:
                continue
            keys.add(key)
            suffix = suffix.lower()
            if suffix in image_suffixes:
                image_bytes += member.size
            elif suffix == text_suffix:
                text_bytes += member.size
    return ShardCount(len(keys), image_bytes, text_bytes or None)


WEBDATASET = InputFormat(
    name="webdataset",
    file_name=FILE_NAME,
    has_signature=has_tar_signature,
    read=read_samples,
    count_cheaply=img2dataset.stats_count,
    cheap_count_source="img2dataset stats files",
    count_by_reading=count_member_index,
    reading_count_source="member indexes",
)
