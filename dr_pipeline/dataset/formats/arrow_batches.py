"""What the two Arrow-schema formats (Parquet and Arrow IPC) share: column values to Arrow record
batches and back, and validate's checks of a file's schema and batches.

Array columns (embeddings [rows, D] and scales [rows] per sample) are nested fixed-size lists;
reading turns them into numpy arrays [n, rows(, D)] that are views of the Arrow buffers: no copy,
and no Python object per row.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dr_pipeline.core.errors import error_line
from dr_pipeline.core.schema import DatasetLayout
from dr_pipeline.dataset.formats.base import CheckedRows, UnusableFile


def fixed_size_matrix(column: pa.Array) -> np.ndarray:
    """A column of nested fixed-size lists (embeddings [rows] x [dim], scales [rows]) as one
    numpy array [len, rows(, dim)] in its stored dtype (a view of the column's buffer)."""
    shape, values = [], column
    while pa.types.is_fixed_size_list(values.type):
        size = values.type.list_size
        shape.append(size)
        # the child's values of this slice (flatten() does the same through a compute call, ~10x slower)
        values = values.values.slice(values.offset * size, len(values) * size) if not values.null_count else values.flatten()
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


def split_arrays(batch: pa.RecordBatch, array_names: set[str]) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """(the plain columns as Arrow, the columns of `array_names` as numpy views [n, ...])."""
    names = [name for name in batch.schema.names if name in array_names]
    arrays = {name: fixed_size_matrix(batch.column(name)) for name in names}
    return pa.Table.from_batches([batch.drop_columns(names)]), arrays


def batch_rows(batches: Iterator[pa.RecordBatch], array_names: set[str]) -> Iterator[dict[str, Any]]:
    """Rows of record batches as plain values, the columns of `array_names` as numpy arrays."""
    for batch in batches:
        plain, arrays = split_arrays(batch, array_names)
        for i, row in enumerate(plain.to_pylist()):
            row.update({name: values[i] for name, values in arrays.items()})
            yield row


def schema_differences(actual: pa.Schema, layout: DatasetLayout) -> list[str]:
    """One line per column of a file's schema that is not the layout's."""
    expected = layout.arrow_schema()
    differences = [
        f"column {f.name}: {actual.field(f.name).type if f.name in actual.names else 'missing'}, schema says {f.type}"
        for f in expected
        if f.name not in actual.names or not actual.field(f.name).type.equals(f.type)
    ]
    return differences + [f"column {name}: not in the schema" for name in actual.names if name not in expected.names]


def checked_batches(batches: Iterator[pa.RecordBatch], layout: DatasetLayout) -> Iterator[CheckedRows]:
    """Record batches of a file whose schema is the layout's, as validate checks them; raises
    UnusableFile when a batch cannot be read."""
    try:
        for batch in batches:
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
