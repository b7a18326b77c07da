"""Input shards: list them, tell their format, and stream their samples through fsspec.

Two formats: webdataset tars (img2dataset's default output) and parquet
(img2dataset's parquet output, Hugging Face datasets). Reading never loads a
whole shard: tars are read member by member, parquet a batch of rows (or one row
group, when larger) at a time.

What becomes of a problem:
- a config problem (a pattern that matches nothing, a filesystem that cannot be
  reached) is a ConfigError, raised before any work starts;
- a shard's own content (missing file, not a tar, cut short, parquet without an
  image column) is an InputFailure in the stream, so the caller records it;
- an error of the storage layer underneath (connection reset, timeout, disk
  error) propagates: it says nothing about the shard, and the caller should
  retry the unit rather than commit it with a permanent failure.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import IO, Any, Callable, Iterator, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from braceexpand import braceexpand
from fsspec.implementations.local import LocalFileSystem
from webdataset.tariterators import base_plus_ext

from dr_pipeline.core.config import InputConfig
from dr_pipeline.core.errors import ConfigError, DrGenError, error_line
from dr_pipeline.core.storage import (RetryingReader, filesystem, filesystem_options, fresh, path_exists, redact_url,
                                  retrying)

ShardFormat = Literal["webdataset", "parquet"]

TAR_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
PARQUET_IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img", "image_bytes")
PARQUET_TEXT_COLUMNS = ("caption", "txt", "text")
PARQUET_KEY_COLUMNS = ("key", "uid", "__key__")
PARQUET_URL_COLUMNS = ("url",)
UID_FIELD = "uid"  # the input's own uid (DataComp's 32-hex): json field or parquet column (schema.sample_uid)
JSON_KEY_FIELDS = ("uid", "key")
JSON_TEXT_FIELDS = ("caption", "text")

_PARQUET_BATCH_ROWS = 64  # rows of encoded images held at once (pyarrow still reads whole row groups)
_GLOB_CHARACTERS = re.compile(r"[*?[]")
_DIGIT_RUNS = re.compile(r"(\d+)")
_WEBDATASET_NAME = re.compile(r"\.(tar|tar\.gz|tgz)(\?.*)?$", re.IGNORECASE)
_PARQUET_NAME = re.compile(r"\.parquet(\?.*)?$", re.IGNORECASE)
# Errors that mean the file itself is absent or closed to us, not that storage hiccuped.
_UNOPENABLE = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class ShardUnavailable(DrGenError):
    """An input shard cannot be opened now: its unit fails and is retried by the next run,
    rather than committed without its samples."""


@dataclass
class RawSample:
    """One input sample as found in its shard; nothing is validated or decoded yet."""

    source_key: str
    text: str | None
    image: bytes | None
    image_format: str | None
    url: str | None
    uid: str | None = None  # the input's own uid field when it has one (schema.sample_uid)
    # (failure reason, detail) of a missing image, when the shard says more than "absent"
    image_problem: tuple[str, str] | None = None


@dataclass
class InputFailure:
    """A sample (or a whole shard) that could not be read; `reason` is a schema failure_reasons key."""

    key: str
    reason: str
    detail: str


# --------------------------------------------------------------------------- listing


def list_shards(config: InputConfig) -> list[str]:
    """Every shard the input names, deduplicated, in natural order ("2.tar" before "10.tar").

    Brace patterns are expanded first, then glob characters (* ? [) are matched
    on the filesystem. Which literal URLs are checked, so that a typo fails here
    rather than as thousands of failures later:
    - local files: every one (a stat costs microseconds);
    - other filesystems: the first and the last URL of each pattern, which
      catches a wrong bucket, prefix or range end in two requests even when the
      pattern expands to 100k shards. A shard missing inside the range fails
      its unit when it is read (ShardUnavailable; never committed without it).
    Local paths are returned absolute, since workers may run in another directory.
    """
    shards: dict[str, None] = {}
    for pattern in config.url_list:
        matches = _expand_pattern(pattern.strip(), config.storage_options)
        if not matches:
            raise ConfigError(f"input {pattern!r} matches no shard")
        if matches != list(braceexpand(pattern.strip())):  # a glob or a folder was listed, not named
            matches = _without_img2dataset_metadata(matches)
        shards.update(dict.fromkeys(matches))
    return sorted(shards, key=_natural_sort_key)


def _without_img2dataset_metadata(urls: list[str]) -> list[str]:
    """img2dataset writes beside each shard NNNNN.tar its metadata NNNNN.parquet (one row per URL,
    with status and error_message) and NNNNN_stats.json: neither is a shard. Of a folder or glob's
    files, a .parquet whose .tar is listed too, and every .json file, are dropped (the metadata is
    read with its tar); shards named one by one are all read."""
    tars = {url[: -len(".tar")] for url in urls if url.endswith(".tar")}
    return [url for url in urls
            if not url.endswith(".json") and not (url.endswith(".parquet") and url[: -len(".parquet")] in tars)]


def _folder_shards(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The shards of a folder (img2dataset's output folder): its tar and parquet files."""
    return [found for found in _glob_files(fs, path.rstrip("/") + "/*")
            if _WEBDATASET_NAME.search(found) or _PARQUET_NAME.search(found)]


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
    for url in dict.fromkeys(literals[:1] + literals[-1:]):
        if not path_exists(fs, url):
            raise ConfigError(f"input {pattern!r}: {url} does not exist")
    return matches + literals


def _glob_files(fs: fsspec.AbstractFileSystem, pattern: str) -> list[str]:
    """Matching files only, from a fresh listing itself (no stat per match)."""
    found = retrying(lambda: fresh(fs).glob(pattern, detail=True))
    return [path for path, info in found.items() if info.get("type") == "file"]


def _natural_sort_key(text: str) -> list[str | int]:
    # Splitting on a captured group alternates text and digits, so positions compare like with like.
    return [int(part) if index % 2 else part for index, part in enumerate(_DIGIT_RUNS.split(text))]


# --------------------------------------------------------------------------- format


def detect_format(url: str, config: InputConfig) -> ShardFormat:
    """config.format if set, else the file name's extension, else the file's first bytes."""
    if config.format is not None:
        return config.format
    if _WEBDATASET_NAME.search(url):
        return "webdataset"
    if _PARQUET_NAME.search(url):
        return "parquet"
    try:
        with _open_shard(url, config) as file:
            head = file.read(512)
    except (*_UNOPENABLE, ValueError) as error:  # a storage hiccup propagates, as when reading
        raise ConfigError(f"{url}: cannot read it to detect its format ({error_line(error, with_type=True)})") from None
    if head.startswith(b"PAR1"):
        return "parquet"
    if head[257:262] == b"ustar":
        return "webdataset"
    raise ConfigError(f"{url}: neither a tar nor a parquet file by name or content; set input.format")


# --------------------------------------------------------------------------- reading


def iter_shard(url: str, config: InputConfig) -> Iterator[RawSample | InputFailure]:
    """The shard's samples in shard order, with InputFailures where it cannot be read.

    Webdataset tars: a sample is a run of consecutive members sharing a key
    (webdataset's naming: the member name up to the first dot of its base name).
    Image: the first present of jpg, jpeg, png, webp; caption: txt, else the
    json member's caption or text; key: json uid, else json key, else the tar
    key; url: json url. input.image_column / text_column name member suffixes
    and input.key_column / url_column name json fields when set.
    Parquet: columns are input.*_column when set, else detected (see
    PARQUET_*_COLUMNS); without a key column the key is "<shard stem>_<row:09d>".
    Samples without an image or a caption are still yielded with None there.
    A shard that cannot be opened (absent, not permitted) raises ShardUnavailable: its unit
    is not committed, so a rerun reads it once it is back; one that opens but is not a
    tar or parquet file is one unreadable_shard failure.
    """
    shard = _shard_name(url)
    try:
        file = _open_shard(url, config)
    except _UNOPENABLE as error:
        raise ShardUnavailable(f"input shard {redact_url(url)} cannot be opened ({error_line(error, with_type=True)})") from None
    try:
        shard_format = detect_format(url, config)
    except ConfigError as error:
        file.close()
        yield InputFailure(f"{shard}#unreadable", "unreadable_shard", error_line(error, with_type=True))
        return
    read = _iter_tar if shard_format == "webdataset" else _iter_parquet
    with file:
        yield from read(_StorageErrorTrap(file), shard, config)
    if shard_format == "webdataset":
        yield from img2dataset_failures(url, config)


def img2dataset_failures(tar_url: str, config: InputConfig) -> Iterator[InputFailure]:
    """The URLs img2dataset failed to download into the tar at `tar_url`, from the metadata it wrote
    beside it (NNNNN.parquet: key, status, error_message): a download_failed failure each, with
    img2dataset's status and message ("failed_to_download: HTTP Error 404: Not Found") as detail.
    Nothing when there is no such file or it has no status column."""
    match = _WEBDATASET_NAME.search(tar_url)
    if match is None or match.group(1).lower() != "tar":
        return
    metadata_url = tar_url[: match.start()] + ".parquet" + (match.group(2) or "")
    try:
        with fsspec.open(metadata_url, "rb", **config.storage_options) as file:
            metadata = pq.ParquetFile(file)
            names = set(metadata.schema_arrow.names)
            if not {"key", "status"} <= names:
                return
            table = metadata.read(columns=[c for c in ("key", "status", "error_message") if c in names])
    except (*_UNOPENABLE, OSError, ValueError, pa.ArrowException):
        return
    messages = table.column("error_message").to_pylist() if "error_message" in table.column_names else None
    for row, (key, status) in enumerate(zip(table.column("key").to_pylist(), table.column("status").to_pylist())):
        if status is None or status == "success":
            continue
        message = messages[row] if messages else None
        yield InputFailure(str(key), "download_failed", f"{status}: {message}" if message else str(status))


def _open_shard(url: str, config: InputConfig) -> RetryingReader:
    """The shard for reading, reopened where it was when a transient storage error cuts a read."""
    filesystem(url, config.storage_options)  # the instance fsspec.open reuses, its own retries cut
    options = filesystem_options(url, config.storage_options)
    return RetryingReader(lambda: fsspec.open(url, "rb", **options).open())


def _shard_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


class _StorageErrorTrap:
    """A read-only file that remembers an error raised by the file beneath it.

    pyarrow reports corrupt data as OSError too; a parse error whose cause was a
    storage error must propagate rather than be recorded as a bad shard.
    """

    def __init__(self, file: IO[bytes]):
        self._file = file
        self.storage_error: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        return self._call(self._file.read, size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._call(self._file.seek, offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def seekable(self) -> bool:
        return self._file.seekable()

    def readable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        """The underlying file is closed by whoever opened it."""

    def _call(self, method: Callable[..., Any], *args: Any) -> Any:
        try:
            return method(*args)
        except Exception as error:
            self.storage_error = error
            raise

    def raise_storage_error(self) -> None:
        if self.storage_error is not None:
            raise self.storage_error


# --------------------------------------------------------------------------- webdataset tars


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
            image_suffixes=(config.image_column,) if config.image_column else TAR_IMAGE_SUFFIXES,
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
            text = _utf8(text_bytes)
        else:
            text = next((meta[name] for name in self.json_text_fields if isinstance(meta.get(name), str)), None)
        url = meta.get(self.json_url_field)
        linked = next((suffix for suffix in self.image_suffixes if suffix in run.not_files), None)
        return RawSample(
            source_key=_json_key(meta, self.json_key_fields) or run.key,
            text=text,
            image=run.data[image_suffix] if image_suffix else None,
            image_format=_normalise_format(image_suffix) if image_suffix else None,
            url=url if isinstance(url, str) else None,
            uid=_json_key(meta, (UID_FIELD,)),
            image_problem=None if image_suffix or linked is None
            else ("missing_image", f"the {linked} member is {run.not_files[linked]}, not image bytes: "
                                   "links are never followed"),
        )


def _iter_tar(file: _StorageErrorTrap, shard: str, config: InputConfig) -> Iterator[RawSample | InputFailure]:
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


def _json_key(meta: dict[str, Any], fields: tuple[str, ...]) -> str | None:
    for name in fields:
        value = meta.get(name)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
    return None


def _utf8(data: bytes) -> str:
    """Captions are UTF-8; a stray invalid byte becomes U+FFFD rather than costing the sample."""
    return data.decode("utf-8", errors="replace")


def _normalise_format(suffix: str) -> str:
    return "jpg" if suffix == "jpeg" else suffix


# --------------------------------------------------------------------------- parquet


class _UnusableColumns(Exception):
    """The file lacks a needed column, or has it with a type that cannot hold it."""


@dataclass(frozen=True)
class _ParquetColumns:
    image: str
    text: str
    key: str | None
    url: str | None
    uid: str | None

    @classmethod
    def resolve(cls, schema: pa.Schema, config: InputConfig) -> _ParquetColumns:
        names = schema.names
        columns = cls(
            uid=UID_FIELD if UID_FIELD in names else None,
            image=_pick_column(names, config.image_column, PARQUET_IMAGE_COLUMNS, "image", required=True),
            text=_pick_column(names, config.text_column, PARQUET_TEXT_COLUMNS, "text", required=True),
            key=_pick_column(names, config.key_column, PARQUET_KEY_COLUMNS, "key", required=False),
            url=_pick_column(names, config.url_column, PARQUET_URL_COLUMNS, "url", required=False),
        )
        image_type = schema.field(columns.image).type
        if not _is_binary(image_type) and not (
            pa.types.is_struct(image_type)
            and image_type.get_field_index("bytes") >= 0
            and _is_binary(image_type.field("bytes").type)
        ):
            raise _UnusableColumns(
                f"image column {columns.image!r} has type {image_type}, "
                "expected binary or a struct with binary 'bytes'"
            )
        text_type = schema.field(columns.text).type
        if not _is_string(text_type) and not _is_binary(text_type):
            raise _UnusableColumns(f"text column {columns.text!r} has type {text_type}, expected string")
        return columns

    @property
    def selected(self) -> list[str]:
        return list(dict.fromkeys(name for name in (self.image, self.text, self.key, self.url, self.uid) if name))


def _download_status(parquet: pq.ParquetFile) -> Callable[[int], tuple[str, str] | None]:
    """For img2dataset's parquet output (status and error_message columns beside the image): a
    row's download_failed (reason, detail) when img2dataset recorded a failure, else None.
    The two small columns are read once per shard."""
    if not {"status", "error_message"} <= set(parquet.schema_arrow.names):
        return lambda index: None
    table = parquet.read(columns=["status", "error_message"], use_threads=False)
    statuses, messages = table.column("status").to_pylist(), table.column("error_message").to_pylist()

    def problem(index: int) -> tuple[str, str] | None:
        status, message = statuses[index], messages[index]
        if status is None or status == "success":
            return None
        return "download_failed", f"{status}: {message}" if message else str(status)

    return problem


def _pick_column(
    names: list[str], configured: str | None, candidates: tuple[str, ...], role: str, required: bool
) -> str | None:
    if configured is not None:
        if configured in names:
            return configured
        raise _UnusableColumns(f"no column {configured!r} (input.{role}_column); columns: {', '.join(names)}")
    found = next((name for name in candidates if name in names), None)
    if found is None and required:
        raise _UnusableColumns(f"no {role} column (looked for {', '.join(candidates)}); columns: {', '.join(names)}")
    return found


def _is_binary(arrow_type: pa.DataType) -> bool:
    return pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type) or pa.types.is_binary_view(arrow_type)


def _is_string(arrow_type: pa.DataType) -> bool:
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_string_view(arrow_type)


def _iter_parquet(file: _StorageErrorTrap, shard: str, config: InputConfig) -> Iterator[RawSample | InputFailure]:
    """Rows in file order, one batch at a time; a file without usable columns is one failure.

    That failure stands for the whole file (its detail says how many rows were
    not read): the cause is one schema mismatch, not a problem of each row.
    pre_buffer is off so pyarrow reads the row groups of one batch, not the whole file.
    """
    try:
        parquet = pq.ParquetFile(file, pre_buffer=False)
        columns = _ParquetColumns.resolve(parquet.schema_arrow, config)
    except _UnusableColumns as error:
        yield InputFailure(
            f"{shard}#unreadable", "unreadable_shard", f"{error}; {parquet.metadata.num_rows} rows not read"
        )
        return
    except (pa.ArrowException, OSError) as error:
        file.raise_storage_error()
        yield InputFailure(f"{shard}#unreadable", "unreadable_shard", f"not a parquet file: {error_line(error, with_type=True)}")
        return
    stem = PurePosixPath(shard).stem
    row = 0
    try:
        download = _download_status(parquet)
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns.selected, use_threads=False):
            values = {name: batch.column(name).to_pylist() for name in columns.selected}
            for index in range(batch.num_rows):
                key = values[columns.key][index] if columns.key else None
                url = values[columns.url][index] if columns.url else None
                uid = values[columns.uid][index] if columns.uid else None
                image = _image_bytes(values[columns.image][index])
                text = values[columns.text][index]
                yield RawSample(
                    source_key=f"{stem}_{row + index:09d}" if key is None else str(key),
                    text=_utf8(text) if isinstance(text, bytes) else text,
                    image=image,
                    image_format=sniff_image_format(image) if image is not None else None,
                    url=url if isinstance(url, str) else None,
                    uid=_json_key({UID_FIELD: uid}, (UID_FIELD,)),
                    image_problem=download(row + index) if image is None else None,
                )
            row += batch.num_rows
    except (pa.ArrowException, OSError) as error:
        file.raise_storage_error()
        yield InputFailure(
            f"{shard}#truncated",
            "truncated_shard",
            f"{shard} breaks off at row {row} of {parquet.metadata.num_rows}: {error_line(error, with_type=True)}",
        )


def _image_bytes(value: Any) -> bytes | None:
    """Plain binary, or the {bytes, path} struct Hugging Face datasets writes for an Image feature."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return value


def sniff_image_format(data: bytes) -> str | None:
    """The encoding from magic bytes: parquet column names (img2dataset always says "jpg") do not tell it."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(b"GIF8"):
        return "gif"
    if data[:4] in (b"II*\0", b"MM\0*"):
        return "tiff"
    if data[:2] == b"BM":
        return "bmp"
    return None
