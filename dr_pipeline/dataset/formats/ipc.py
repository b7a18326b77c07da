"""The Arrow IPC output format: one uncompressed Arrow IPC file (the "Feather v2" file format) per
unit, the Arrow schema of the layout, record batches of ROW_GROUP_ROWS rows.

Parquet decodes a fixed-size list of float16 value by value (about 3,500 DataCompDR-shaped rows/s
per core, bench/RESULTS.md); an IPC file holds Arrow's own buffers, so a reader memory-maps a local
file and its embedding columns become numpy views of the mapped pages, without decoding or copying.
A remote file is read whole into memory once, then viewed alike. Buffers are left uncompressed:
float16 embeddings hardly compress, and compressed buffers would have to be decoded and copied.
"""

from __future__ import annotations

import contextlib
from typing import Any, BinaryIO, Iterator

import numpy as np
import pyarrow as pa
from fsspec.implementations.local import LocalFileOpener

from dr_pipeline.core.errors import error_line
from dr_pipeline.core.schema import DatasetLayout
from dr_pipeline.dataset.formats.arrow_batches import (
    batch_rows,
    checked_batches,
    record_batch,
    schema_differences,
    split_arrays,
)
from dr_pipeline.dataset.formats.base import CHECKED_ROWS, CheckedRows, DatasetFormat, FileLayout, ReportRow, UnusableFile
from dr_pipeline.dataset.formats.parquet import ROW_GROUP_ROWS, ROWS_READ


class IpcUnitWriter:
    """Writes record batches of exactly ROW_GROUP_ROWS rows (the last one shorter), however the
    columns arrive, so the file's bytes do not depend on the pipeline's batch sizes."""

    def __init__(self, sink: Any, layout: FileLayout):
        self.schema = layout.arrow_schema()
        self._writer = pa.ipc.new_file(sink, self.schema)
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0

    def write(self, columns: dict[str, Any]) -> None:
        batch = record_batch(columns, self.schema)
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        if self._pending_rows >= ROW_GROUP_ROWS:
            pending = pa.concat_batches(self._pending)
            whole = pending.num_rows - pending.num_rows % ROW_GROUP_ROWS
            for start in range(0, whole, ROW_GROUP_ROWS):
                self._writer.write_batch(pending.slice(start, ROW_GROUP_ROWS))
            self._pending = [pending.slice(whole)] if whole < pending.num_rows else []
            self._pending_rows = pending.num_rows - whole

    def close(self) -> None:
        if self._pending:
            self._writer.write_batch(pa.concat_batches(self._pending))
        self._pending, self._pending_rows = [], 0
        self._writer.close()


@contextlib.contextmanager
def _open_ipc(handle: BinaryIO) -> Iterator[pa.ipc.RecordBatchFileReader]:
    """The file behind `handle`, memory-mapped when local, else read whole; UnusableFile when it is
    no IPC file (truncated, or another format)."""
    try:
        if isinstance(handle, LocalFileOpener):
            source = pa.memory_map(handle.path)
        else:
            source = pa.BufferReader(pa.py_buffer(handle.read()))
        reader = pa.ipc.open_file(source)
    except (pa.ArrowException, OSError) as error:
        raise UnusableFile([f"not an Arrow IPC file ({error_line(error)})"]) from None
    with source:  # buffers handed out keep the mapping alive past the close
        yield reader


def _record_batches(reader: pa.ipc.RecordBatchFileReader) -> Iterator[pa.RecordBatch]:
    """The file's record batches, each validated in full (every offset and length against its
    buffers) before use: reading decodes nothing, so a damaged file would otherwise hand
    out-of-range offsets to the conversions (about 0.5 us per DataCompDR-shaped row)."""
    for i in range(reader.num_record_batches):
        batch = reader.get_batch(i)
        batch.validate(full=True)
        yield batch


def _resized(batches: Iterator[pa.RecordBatch], size: int) -> Iterator[pa.RecordBatch]:
    """Batches of `size` rows (the last one shorter) from batches of any sizes: slices of them
    (no copy), but for a batch spanning two of them, which is concatenated."""
    pending: list[pa.RecordBatch] = []
    rows = 0
    for batch in batches:
        start = 0
        while start < batch.num_rows:
            taken = min(size - rows, batch.num_rows - start)
            pending.append(batch.slice(start, taken))
            rows, start = rows + taken, start + taken
            if rows == size:
                yield pending[0] if len(pending) == 1 else pa.concat_batches(pending)
                pending, rows = [], 0
    if pending:
        yield pending[0] if len(pending) == 1 else pa.concat_batches(pending)


class IpcFormat(DatasetFormat):
    """Arrow IPC files: the batched reader hands out views of the file's buffers."""

    name = "ipc"
    suffix = "arrow"

    def open_writer(self, sink: BinaryIO, layout: FileLayout, keep_images: bool) -> IpcUnitWriter:
        return IpcUnitWriter(sink, layout)

    def rows(self, handle: BinaryIO, layout: FileLayout, array_names: set[str]) -> Iterator[dict[str, Any]]:
        with _open_ipc(handle) as reader:
            yield from batch_rows(_resized(_record_batches(reader), ROWS_READ), array_names)

    def batches(
        self, handle: BinaryIO, layout: FileLayout, array_names: set[str], batch_size: int,
    ) -> Iterator[tuple[pa.Table, dict[str, np.ndarray]]]:
        with _open_ipc(handle) as reader:
            for batch in _resized(_record_batches(reader), batch_size):
                yield split_arrays(batch, array_names)

    def file_schema(self, handle: BinaryIO) -> pa.Schema:
        with _open_ipc(handle) as reader:
            return reader.schema

    def checked_rows(
        self, handle: BinaryIO, layout: DatasetLayout, keep_images: bool, report: ReportRow,
    ) -> Iterator[CheckedRows]:
        """The file's Arrow schema against the layout's, then its batches."""
        with _open_ipc(handle) as reader:
            differences = schema_differences(reader.schema, layout)
            if differences:
                raise UnusableFile(differences)
            yield from checked_batches(_resized(_record_batches(reader), CHECKED_ROWS), layout)
