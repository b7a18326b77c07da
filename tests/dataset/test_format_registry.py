"""Adding an output format is one module and one registration: a JSON-lines format defined here
writes real generated columns, and the reader and validate read it through the registry alone."""

from __future__ import annotations

import base64
import io
import json
import shutil
from typing import Any, BinaryIO, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dr_pipeline.core.config import OutputConfig
from dr_pipeline.core.errors import ConfigError
from dr_pipeline.core.storage import Location
from dr_pipeline.dataset.formats import FORMATS, format_for, open_unit_writer, register_format
from dr_pipeline.dataset.formats.base import DatasetFormat
from dr_pipeline.dataset.formats.arrow_batches import fixed_size_matrix
from dr_pipeline.dataset.formats.parquet import ParquetFormat
from dr_pipeline.dataset.manifest import totals
from dr_pipeline.dataset.plan import Unit
from dr_pipeline.read.reader import open_dataset
from dr_pipeline.tools.validate import validate_dataset


def _encoded(value: Any) -> dict[str, Any]:
    if isinstance(value, np.ndarray):
        buffer = io.BytesIO()
        np.save(buffer, value, allow_pickle=False)
        return {"npy": base64.b64encode(buffer.getvalue()).decode()}
    if isinstance(value, bytes):
        return {"bytes": base64.b64encode(value).decode()}
    return {"json": value}


def _decoded(value: dict[str, Any]) -> Any:
    if "npy" in value:
        return np.load(io.BytesIO(base64.b64decode(value["npy"])), allow_pickle=False)
    if "bytes" in value:
        return base64.b64decode(value["bytes"])
    return value["json"]


class JsonLinesWriter:
    """One JSON object per row; plain values as Arrow stores them (so float32 fields round alike)."""

    def __init__(self, sink: BinaryIO, schema: pa.Schema):
        self._sink, self._schema = sink, schema

    def write(self, columns: dict[str, Any]) -> None:
        values = {
            f.name: list(columns[f.name]) if isinstance(columns[f.name], np.ndarray)
            else pa.array(columns[f.name], type=f.type).to_pylist()
            for f in self._schema
        }
        for i in range(len(columns["key"])):
            self._sink.write(json.dumps({name: _encoded(v[i]) for name, v in values.items()}).encode() + b"\n")

    def close(self) -> None:
        pass


class JsonLinesFormat(DatasetFormat):
    name = "jsonl-test"
    suffix = "jsonl"

    def open_writer(self, sink: BinaryIO, layout: Any, keep_images: bool) -> JsonLinesWriter:
        return JsonLinesWriter(sink, layout.arrow_schema())

    def rows(self, handle: BinaryIO, layout: Any, array_names: set[str]) -> Iterator[dict[str, Any]]:
        for line in handle:
            yield {name: _decoded(value) for name, value in json.loads(line).items()}


@pytest.fixture
def json_lines():
    output_format = JsonLinesFormat()
    register_format(output_format)
    yield output_format
    del FORMATS[output_format.name]


def _stored_columns(path: str, layout: Any) -> dict[str, Any]:
    """A unit's columns as the pipeline hands them to a writer: lists, and arrays for embeddings."""
    table = pq.read_table(path)
    arrays = layout.stored_arrays()
    return {name: fixed_size_matrix(table.column(name).combine_chunks()) if name in arrays
            else table.column(name).to_pylist() for name in table.column_names}


def _rewrite_unit(out: Location, manifest: dict[str, Any], index: int, columns: dict[str, Any], layout: Any) -> None:
    """Write one unit's columns in the manifest's format, in two batches, and record the file
    in dataset.json (the unit's entry, the totals) and the unit's stats marker alike."""
    entry = manifest["units"][index]
    unit = Unit(entry["id"], entry["input"])
    output = OutputConfig(url=out.url(), format=manifest["format"])
    half = len(columns["key"]) // 2
    with open_unit_writer(out, unit.data_file(output.format), layout, output) as (writer, committed):
        writer.write({name: values[:half] for name, values in columns.items()})
        writer.write({name: values[half:] for name, values in columns.items()})
    entry["files"]["data"] = committed[0].to_dict()
    marker = out.read_json(unit.stats_file)
    marker["files"]["data"] = committed[0].to_dict()
    out.write_json_atomic(marker, unit.stats_file)
    manifest["totals"] = totals(manifest["totals"]["units_planned"], manifest["units"])
    out.write_json_atomic(manifest, "dataset.json")


def test_a_format_registered_in_a_test_writes_reads_and_validates(json_lines, reinforced, tmp_path):
    copy = tmp_path / "jsonl"
    shutil.copytree(reinforced.arrow, copy)
    out = Location.from_url(str(copy))
    parquet = open_dataset(str(copy))
    manifest = {**parquet.manifest, "format": json_lines.name}
    for index, entry in enumerate(parquet.units):
        old = entry["files"]["data"]["path"]
        columns = _stored_columns(out.join(old), parquet.layout)
        _rewrite_unit(out, manifest, index, columns, parquet.layout)
        (copy / old).unlink()
    assert all(entry["files"]["data"]["path"].endswith(".jsonl") for entry in manifest["units"])

    written, reference = open_dataset(str(copy)), open_dataset(reinforced.arrow)
    rows, expected = list(written.iter_samples()), list(reference.iter_samples())
    assert len(rows) == len(expected) == len(reference) > 0
    for row, want in zip(rows, expected):
        assert row.keys() == want.keys()
        for name, value in want.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(row[name], value)
            else:
                assert row[name] == value, name
    batch = next(written.iter_batches(batch_size=4))
    assert batch.column("key") == [r["key"] for r in expected[:4]]
    assert validate_dataset(str(copy)).problems == []

    columns = _stored_columns(reinforced.arrow + "/" + reference.units[0]["files"]["data"]["path"], reference.layout)
    embedding = next(iter(reference.layout.embedding_shapes()))
    columns[embedding] = columns[embedding].copy()
    columns[embedding][1, 0, 0] = np.nan
    _rewrite_unit(out, manifest, 0, columns, reference.layout)
    problems = validate_dataset(str(copy)).problems
    assert problems == [f"unit {manifest['units'][0]['id']}: {manifest['units'][0]['files']['data']['path']}: "
                        f"{embedding} has NaN or inf (1 row: {columns['key'][1]})"]


def test_names_resolve_through_the_registry():
    assert isinstance(format_for("parquet"), ParquetFormat)
    assert format_for("arrow") is format_for("parquet")  # the name dataset.json records (schema v1)
    assert OutputConfig(url="o", format="arrow").format == "parquet"
    assert OutputConfig(url="o").model_dump()["format"] == "arrow"  # what config hashes cover
    with pytest.raises(ConfigError, match="unknown format 'orc'"):
        format_for("orc")
    with pytest.raises(ValueError, match="registered already"):
        register_format(ParquetFormat())
