"""The Parquet output format: one zstd Parquet file per unit, the Arrow schema of the layout.

Job files name it `parquet` (or `arrow`, its name until dr-gen 0.x: dataset.json and
config hashes still record it so, see `core.config.FORMAT_RECORDED_AS`).
"""

from __future__ import annotations

from typing import Any, BinaryIO, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dr_pipeline.core.errors import error_line
from dr_pipeline.core.schema import DatasetLayout
from dr_pipeline.dataset.formats.base import (
    CHECKED_ROWS,
    CheckedRows,
    DatasetFormat,
    FileLayout,
    ReportRow,
    UnusableFile,
)

ROW_GROUP_ROWS = 1024
ROWS_READ = 256
"""Rows per Arrow batch behind the row reader."""


def fixed_size_matrix(column: pa.Array) -> np.ndarray:
    """A column of nested fixed-size lists (embeddings [rows] x [dim], scales [rows]) as one
    numpy array [len, rows(, dim)] in its stored dtype."""
    shape, values = [], column
    while pa.types.is_fixed_size_list(values.type):
        shape.append(values.type.list_size)
        values = values.flatten()
    return np.asarray(values.to_numpy(zero_copy_only=False)).reshape(len(column), *shape)


def _fixed_size_array(values: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """[N, rows, D] embeddings or [N, rows] scales as nested fixed-size lists, one per sample."""
    array = pa.array(np.ascontiguousarray(values).reshape(-1))
    for size in reversed(values.shape[1:]):
        array = pa.FixedSizeListArray.from_arrays(array, size)
    return array.cast(arrow_type)


def record_batch(columns: dict[str, Any], schema: pa.Schema) -> pa.RecordBatch:
    """One batch of column values as Arrow, in the types of `schema`."""
    arrays = []
    for schema_field in schema:
        values = columns[schema_field.name]
        if isinstance(values, np.ndarray):
            arrays.append(_fixed_size_array(values, schema_field.type))
        else:
            arrays.append(pa.array(values, type=schema_field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


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

    def __init__(self, sink: Any, layout: FileLayout):
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


class ParquetFormat(DatasetFormat):
    """Parquet files; reading goes from Arrow to numpy without Python rows where it can."""

    name = "parquet"
    suffix = "parquet"

    def open_writer(self, sink: BinaryIO, layout: FileLayout, keep_images: bool) -> ParquetUnitWriter:
        return ParquetUnitWriter(sink, layout)

    def rows(self, handle: BinaryIO, layout: FileLayout, array_names: set[str]) -> Iterator[dict[str, Any]]:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=ROWS_READ):
            names = [name for name in batch.schema.names if name in array_names]
            embeddings = {name: fixed_size_matrix(batch.column(name)) for name in names}
            plain = batch.drop_columns(names).to_pylist()
            for i, row in enumerate(plain):
                row.update({name: values[i] for name, values in embeddings.items()})
                yield row

    def batches(
        self, handle: BinaryIO, layout: FileLayout, array_names: set[str], batch_size: int,
    ) -> Iterator[tuple[pa.Table, dict[str, np.ndarray]]]:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_size):
            names = [name for name in batch.schema.names if name in array_names]
            arrays = {name: fixed_size_matrix(batch.column(name)) for name in names}
            yield pa.Table.from_batches([batch.drop_columns(names)]), arrays

    def file_schema(self, handle: BinaryIO) -> pa.Schema:
        try:
            return pq.ParquetFile(handle).schema_arrow
        except (pa.ArrowException, OSError) as error:
            raise UnusableFile([f"not a Parquet file ({error_line(error)})"]) from None

    def checked_rows(
        self, handle: BinaryIO, layout: DatasetLayout, keep_images: bool, report: ReportRow,
    ) -> Iterator[CheckedRows]:
        """The file's Arrow schema against the layout's, column by column, then its batches."""
        try:
            parquet = pq.ParquetFile(handle)
        except (pa.ArrowException, OSError) as error:
            raise UnusableFile([f"not a Parquet file ({error_line(error)})"]) from None
        expected = layout.arrow_schema()
        actual = parquet.schema_arrow
        differences = [
            f"column {f.name}: {actual.field(f.name).type if f.name in actual.names else 'missing'}, schema says {f.type}"
            for f in expected
            if f.name not in actual.names or not actual.field(f.name).type.equals(f.type)
        ]
        differences += [f"column {name}: not in the schema" for name in actual.names if name not in expected.names]
        if differences:
            raise UnusableFile(differences)
        try:
            for batch in parquet.iter_batches(batch_size=CHECKED_ROWS):
                aug = batch.column("aug")
                yield CheckedRows(
                    keys=batch.column("key").to_pylist(),
                    heights=batch.column("image_height").to_numpy(zero_copy_only=False),
                    widths=batch.column("image_width").to_numpy(zero_copy_only=False),
                    views_per_row=pc.list_value_length(aug).to_numpy(zero_copy_only=False),
                    crops=aug.flatten().field("crop").flatten().to_numpy(zero_copy_only=False).reshape(-1, 4),
                    captions={c.column: batch.column(c.column).to_pylist() for c in layout.captioners},
                    arrays={name: fixed_size_matrix(batch.column(name)) for name in layout.stored_arrays()},
                    images=batch.column("image").to_pylist(),
                    image_sha256=batch.column("image_sha256").to_pylist(),
                )
        except (pa.ArrowException, OSError) as error:
            raise UnusableFile([f"cannot be read to its end ({error_line(error)})"]) from None
