"""The Arrow IPC format on its own: a real run's columns written however they arrive give the same
bytes and record batches of ROW_GROUP_ROWS rows, read back in batches of any size, from a local
(memory-mapped) or a remote file; a damaged file refused by validate and by the reader."""

from __future__ import annotations

import io

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dr_pipeline.dataset.formats import format_for
from dr_pipeline.dataset.formats.arrow_batches import fixed_size_matrix
from dr_pipeline.dataset.formats.base import UnusableFile
from dr_pipeline.dataset.formats.parquet import ROW_GROUP_ROWS
from dr_pipeline.read.reader import open_dataset

IPC = format_for("ipc")
ROWS = 2500  # two whole record batches and a part


@pytest.fixture(scope="module")
def columns(reinforced):
    """ROWS rows of a real Parquet run (float16, flips, erasing), its units' rows repeated, as the
    pipeline hands columns to a writer: lists, and numpy arrays for the embeddings."""
    dataset = open_dataset(reinforced.arrow)
    table = pa.concat_tables(pq.read_table(dataset.location.join(u["files"]["data"]["path"])) for u in dataset.units)
    table = pa.concat_tables([table] * -(-ROWS // table.num_rows)).slice(0, ROWS)
    arrays = dataset.layout.stored_arrays()
    values = {name: fixed_size_matrix(table.column(name).combine_chunks()) if name in arrays
              else table.column(name).to_pylist() for name in table.column_names}
    return dataset.layout, values


def _written(layout, values, chunk):
    sink = io.BytesIO()
    writer = IPC.open_writer(sink, layout, keep_images=False)
    for start in range(0, ROWS, chunk):
        writer.write({name: column[start:start + chunk] for name, column in values.items()})
    writer.close()
    return sink.getvalue()


def _assert_batches_hold(batches, layout, values, sizes):
    assert [columns.num_rows for columns, _ in batches] == sizes
    start = 0
    for plain, arrays in batches:
        end = start + plain.num_rows
        assert set(arrays) == set(layout.stored_arrays())
        for name, array in arrays.items():
            np.testing.assert_array_equal(array, values[name][start:end])
        for name in plain.column_names:
            assert plain.column(name).to_pylist() == values[name][start:end], name
        start = end


def test_bytes_and_record_batches_do_not_depend_on_how_columns_arrive(columns, tmp_path):
    layout, values = columns
    data = _written(layout, values, 7)
    assert _written(layout, values, 1000) == _written(layout, values, ROWS) == data
    reader = pa.ipc.open_file(pa.py_buffer(data))
    assert [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)] == [1024, 1024, ROWS - 2048]
    assert reader.schema.equals(layout.arrow_schema())

    path = tmp_path / "unit.arrow"
    path.write_bytes(data)
    array_names = set(layout.stored_arrays())
    local = fsspec.filesystem("file")
    with local.open(str(path), "rb") as handle:  # memory-mapped; batches across record batch ends
        _assert_batches_hold(list(IPC.batches(handle, layout, array_names, 1000)), layout, values, [1000, 1000, 500])
    with local.open(str(path), "rb") as handle:
        rows = list(IPC.rows(handle, layout, array_names))
    assert [row["key"] for row in rows] == values["key"]
    memory = fsspec.filesystem("memory")
    memory.pipe("/ipc-test/unit.arrow", data)
    try:
        with memory.open("/ipc-test/unit.arrow", "rb") as handle:  # read whole: not a local file
            _assert_batches_hold(list(IPC.batches(handle, layout, array_names, ROW_GROUP_ROWS)), layout, values,
                                 [1024, 1024, ROWS - 2048])
    finally:
        memory.rm("/ipc-test", recursive=True)


def _checked(data, layout):
    return sum(len(rows.keys) for rows in IPC.checked_rows(io.BytesIO(data), layout, False, lambda *_: None))


def test_damaged_files_are_refused_by_validate_and_the_reader(columns):
    layout, values = columns
    data = _written(layout, values, ROWS)
    assert _checked(data, layout) == ROWS

    with pytest.raises(UnusableFile, match=r"^not an Arrow IPC file \("):
        _checked(data[: len(data) // 2], layout)

    batch = pa.ipc.open_file(pa.py_buffer(data)).get_batch(0)
    keys = batch.column("key")
    offsets = np.frombuffer(keys.buffers()[1], dtype=np.int32, count=len(keys) + 1).copy()
    offsets[1] = offsets[-1] + 1000  # past the key bytes: only a full validation sees it
    damaged_keys = pa.Array.from_buffers(pa.string(), len(keys), [None, pa.py_buffer(offsets), keys.buffers()[2]])
    damaged = batch.set_column(batch.schema.get_field_index("key"), batch.schema.field("key"), damaged_keys)
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(damaged)
    with pytest.raises(UnusableFile, match=r"^cannot be read to its end \(.*offset"):
        _checked(sink.getvalue(), layout)
    with pytest.raises(pa.ArrowInvalid, match="offset"):  # the reader too: an error, never a read past the buffer
        list(IPC.batches(io.BytesIO(sink.getvalue()), layout, set(layout.stored_arrays()), ROW_GROUP_ROWS))

    sink = io.BytesIO()
    with pa.ipc.new_file(sink, batch.schema.remove(0)) as writer:
        writer.write_batch(batch.drop_columns([batch.schema.names[0]]))
    with pytest.raises(UnusableFile) as refused:
        _checked(sink.getvalue(), layout)
    assert refused.value.lines == [f"column {batch.schema.names[0]}: missing, schema says {batch.schema.types[0]}"]
