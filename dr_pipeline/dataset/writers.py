"""Writers of one output unit, in the schema-v1 Arrow (Parquet) or webdataset form.

Both consume the same column values (`unit_columns`), stream batch by batch into
a temporary file (bounded memory whatever the unit size) and are renamed into
place by `Location.open_atomic` only when the whole unit is written.
"""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any, Iterator, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from dr_pipeline.core.config import OutputConfig
from dr_pipeline.generate.model_worker import BatchResult
from dr_pipeline.generate.prepare import PreparedSample
from dr_pipeline.core.schema import DatasetLayout, storage_columns
from dr_pipeline.core.storage import FileInfo, Location

ROW_GROUP_ROWS = 1024


def unit_columns(samples: list[PreparedSample], result: BatchResult, layout: DatasetLayout) -> dict[str, Any]:
    """Column name -> values (lists, or arrays for embeddings and their scales) of one batch."""
    columns: dict[str, Any] = {
        "key": [s.key for s in samples],
        "source_key": [s.source_key for s in samples],
        "uid": [s.uid for s in samples],
        "url": [s.url for s in samples],
        "text": [s.text for s in samples],
        "image": [s.image for s in samples],
        "image_format": [s.image_format for s in samples],
        "image_height": [s.height for s in samples],
        "image_width": [s.width for s in samples],
        "image_sha256": [s.image_sha256 for s in samples],
        "aug": [[v.to_record() for v in s.views] for s in samples],
    }
    for teacher in layout.teachers:
        if teacher.image_column:
            columns.update(storage_columns(teacher.image_column, result.image_emb[teacher.id], layout.embedding_dtype))
        if teacher.text_column:
            columns.update(storage_columns(teacher.text_column, result.text_emb[teacher.id], layout.embedding_dtype))
    for captioner in layout.captioners:
        columns[captioner.column] = result.captions[captioner.id]
    return columns


def _fixed_size_array(values: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """[N, rows, D] embeddings or [N, rows] scales as nested fixed-size lists, one per sample."""
    array = pa.array(np.ascontiguousarray(values).reshape(-1))
    for size in reversed(values.shape[1:]):
        array = pa.FixedSizeListArray.from_arrays(array, size)
    return array.cast(arrow_type)


def record_batch(columns: dict[str, Any], schema: pa.Schema) -> pa.RecordBatch:
    arrays = []
    for schema_field in schema:
        values = columns[schema_field.name]
        if isinstance(values, np.ndarray):
            arrays.append(_fixed_size_array(values, schema_field.type))
        else:
            arrays.append(pa.array(values, type=schema_field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


class UnitWriter(Protocol):
    def write(self, columns: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns worth Parquet's dictionary encoding: all but float16 embeddings, whose dictionary
    (up to 65,536 values) saves no bytes and makes reading them back about 3x slower
    (bench/bench_reader.py); int8 and bfloat16-bit columns and int8 scales read faster with theirs."""
    return [f.name for f in schema if not _is_float16_array(f.type)]


def _is_float16_array(arrow_type: pa.DataType) -> bool:
    """A fixed-size list (of fixed-size lists ...) of float16: a float16 embedding column."""
    if not pa.types.is_fixed_size_list(arrow_type):
        return False
    while pa.types.is_fixed_size_list(arrow_type):
        arrow_type = arrow_type.value_type
    return arrow_type == pa.float16()


class ParquetUnitWriter:
    """Buffers batches into row groups of ROW_GROUP_ROWS so small batches don't fragment the file."""

    def __init__(self, sink: Any, layout: DatasetLayout):
        self.schema = layout.arrow_schema()
        self._writer = pq.ParquetWriter(sink, self.schema, compression="zstd", use_dictionary=dictionary_columns(self.schema))
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0

    def write(self, columns: dict[str, Any]) -> None:
        batch = record_batch(columns, self.schema)
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.Table.from_batches(self._pending), row_group_size=ROW_GROUP_ROWS)
        self._pending, self._pending_rows = [], 0

    def close(self) -> None:
        self._flush()
        self._writer.close()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class WebDatasetUnitWriter:
    """One tar per unit, members named per schemas/v1 (`webdataset.members`); mtime 0 for reproducible bytes."""

    def __init__(self, sink: Any, layout: DatasetLayout, keep_images: bool):
        self._tar = wds.TarWriter(sink, encoder=False, mtime=0)
        self._members = layout.webdataset_members(keep_images)

    def write(self, columns: dict[str, Any]) -> None:
        for i, key in enumerate(columns["key"]):
            sample: dict[str, Any] = {"__key__": key}
            # a sidecar has no image_format column (and no member named after it)
            variables = {"image_format": columns["image_format"][i]} if "image_format" in columns else {}
            for member in self._members:
                values = [columns[name][i] for name in member["fields"]]
                if member["encoding"] == "json":
                    value = dict(zip(member["fields"], values)) if len(values) > 1 else values[0]
                    data = json.dumps(value, ensure_ascii=False).encode()
                elif member["encoding"] == "npy":
                    data = _npy_bytes(values[0])
                else:
                    data = values[0]
                suffix = member["suffix"].format(**variables)
                sample[suffix] = data
            self._tar.write(sample)

    def close(self) -> None:
        self._tar.close()


@contextlib.contextmanager
def open_unit_writer(
    out: Location, relative_path: str, layout: DatasetLayout, output: OutputConfig
) -> Iterator[tuple[UnitWriter, list[FileInfo]]]:
    """A writer of one unit's data file; after the block, the list holds the committed file's info."""
    committed: list[FileInfo] = []
    with out.open_atomic(relative_path) as sink:
        writer: UnitWriter
        if output.format == "arrow":
            writer = ParquetUnitWriter(sink, layout)
        else:
            writer = WebDatasetUnitWriter(sink, layout, output.keep_images)
        try:
            yield writer, committed
        except BaseException:  # the unit failed or was cancelled: the temp file is removed next
            with contextlib.suppress(Exception):
                writer.close()  # now, or the writer's finaliser writes to the removed file later
            raise
        writer.close()
    committed.append(sink.info)


def failures_bytes(failures: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(f, ensure_ascii=False).encode() + b"\n" for f in failures)


