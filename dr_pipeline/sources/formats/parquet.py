"""Parquet (img2dataset's parquet output, Hugging Face datasets): recognised by name (.parquet)
or by its "PAR1" magic; read a batch of rows (or one row group, when larger) at a time; counted
from the row count in its footer.

Columns are input.*_column when set, else detected (see *_COLUMNS); without a key column the
key is "<shard stem>_<row:09d>".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from dr_pipeline.core.config import InputConfig
from dr_pipeline.core.errors import error_line
from dr_pipeline.core.storage import RetryingReader
from dr_pipeline.sources.formats import img2dataset
from dr_pipeline.sources.formats.base import InputFormat, ShardCount, open_input, shard_name
from dr_pipeline.sources.records import UID_FIELD, InputFailure, RawSample, json_key, utf8_text

IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img", "image_bytes")
TEXT_COLUMNS = ("caption", "txt", "text")
KEY_COLUMNS = ("key", "uid", "__key__")
URL_COLUMNS = ("url",)
FILE_NAME = re.compile(r"\.parquet(\?.*)?$", re.IGNORECASE)

_BATCH_ROWS = 64  # rows of encoded images held at once (pyarrow still reads whole row groups)


def has_parquet_signature(head: bytes) -> bool:
    return head.startswith(b"PAR1")


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
            image=_pick_column(names, config.image_column, IMAGE_COLUMNS, "image", required=True),
            text=_pick_column(names, config.text_column, TEXT_COLUMNS, "text", required=True),
            key=_pick_column(names, config.key_column, KEY_COLUMNS, "key", required=False),
            url=_pick_column(names, config.url_column, URL_COLUMNS, "url", required=False),
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


def read_samples(file: RetryingReader, url: str, config: InputConfig) -> Iterator[RawSample | InputFailure]:
    """Rows in file order, one batch at a time; a file without usable columns is one failure.

    That failure stands for the whole file (its detail says how many rows were
    not read): the cause is one schema mismatch, not a problem of each row.
    pre_buffer is off so pyarrow reads the row groups of one batch, not the whole file.
    """
    shard = shard_name(url)
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
        download = img2dataset.download_status(parquet)
        for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=columns.selected, use_threads=False):
            values = {name: batch.column(name).to_pylist() for name in columns.selected}
            for index in range(batch.num_rows):
                key = values[columns.key][index] if columns.key else None
                url = values[columns.url][index] if columns.url else None
                uid = values[columns.uid][index] if columns.uid else None
                image = _image_bytes(values[columns.image][index])
                text = values[columns.text][index]
                yield RawSample(
                    source_key=f"{stem}_{row + index:09d}" if key is None else str(key),
                    text=utf8_text(text) if isinstance(text, bytes) else text,
                    image=image,
                    image_format=sniff_image_format(image) if image is not None else None,
                    url=url if isinstance(url, str) else None,
                    uid=json_key({UID_FIELD: uid}, (UID_FIELD,)),
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


def count_footer(url: str, config: InputConfig) -> ShardCount:
    """Rows, image bytes and caption bytes from the footer: uncompressed sizes of the column chunks."""
    with open_input(url, config) as file:
        metadata = pq.ParquetFile(file).metadata
    names = [metadata.schema.column(i).path.split(".")[0] for i in range(metadata.num_columns)]
    image_column = config.image_column or next((c for c in IMAGE_COLUMNS if c in names), None)
    text_column = config.text_column or next((c for c in TEXT_COLUMNS if c in names), None)
    sizes = {name: 0 for name in names}
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for i in range(row_group.num_columns):
            sizes[names[i]] += row_group.column(i).total_uncompressed_size
    return ShardCount(metadata.num_rows, sizes.get(image_column), sizes.get(text_column))


PARQUET = InputFormat(
    name="parquet",
    file_name=FILE_NAME,
    has_signature=has_parquet_signature,
    read=read_samples,
    count_cheaply=count_footer,
    cheap_count_source="parquet footer row counts",
)
