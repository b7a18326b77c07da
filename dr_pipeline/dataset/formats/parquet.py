"""The Parquet output format: one zstd Parquet file per unit, the Arrow schema of the layout.

Job files name it `parquet` (or `arrow`, its name until dr-gen 0.x: dataset.json and
config hashes still record it so, see `core.config.FORMAT_RECORDED_AS`).
"""

from __future__ import annotations

from typing import Any, BinaryIO, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dr_pipeline.core.errors import error_line
from dr_pipeline.core.schema import DatasetLayout
from dr_pipeline.dataset.formats.arrow_batches import (
    batch_rows,
    checked_batches,
    record_batch,
    schema_differences,
    split_arrays,
)
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
        return batch_rows(pq.ParquetFile(handle).iter_batches(batch_size=ROWS_READ), array_names)

    def batches(
        self, handle: BinaryIO, layout: FileLayout, array_names: set[str], batch_size: int,
    ) -> Iterator[tuple[pa.Table, dict[str, np.ndarray]]]:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_size):
            yield split_arrays(batch, array_names)

    def file_schema(self, handle: BinaryIO) -> pa.Schema:
        return self._open(handle).schema_arrow

    @staticmethod
    def _open(handle: BinaryIO) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(handle)
        except (pa.ArrowException, OSError) as error:
            raise UnusableFile([f"not a Parquet file ({error_line(error)})"]) from None

    def checked_rows(
        self, handle: BinaryIO, layout: DatasetLayout, keep_images: bool, report: ReportRow,
    ) -> Iterator[CheckedRows]:
        """The file's Arrow schema against the layout's, column by column, then its batches."""
        parquet = self._open(handle)
        differences = schema_differences(parquet.schema_arrow, layout)
        if differences:
            raise UnusableFile(differences)
        yield from checked_batches(parquet.iter_batches(batch_size=CHECKED_ROWS), layout)
