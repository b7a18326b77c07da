"""Reading a dr-gen dataset back: the manifest says what the columns are, never guesses.

Rows come out as plain Python values with embeddings as float32 numpy arrays
[rows, D] and augmentation parameters as `ViewParams`, whichever form
(Parquet or webdataset) the dataset was written in. Columns added later by
`--extend` live in sidecar files (sidecars.py); rows come out joined with them.
"""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dr_pipeline.errors import DatasetError
from dr_pipeline.manifest import read_manifest
from dr_pipeline.schema import DatasetLayout, from_storage
from dr_pipeline.sidecars import SidecarLayout, base_layout
from dr_pipeline.storage import Location


def fixed_size_matrix(column: pa.Array) -> np.ndarray:
    """A column of nested fixed-size lists (embeddings [rows] x [dim], scales [rows]) as one
    numpy array [len, rows(, dim)] in its stored dtype."""
    shape, values = [], column
    while pa.types.is_fixed_size_list(values.type):
        shape.append(values.type.list_size)
        values = values.flatten()
    return np.asarray(values.to_numpy(zero_copy_only=False)).reshape(len(column), *shape)


class ReinforcedDataset:
    """A dataset folder opened through its manifest (local or any fsspec URL)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.location, self.manifest = read_manifest(url, storage_options)
        self.layout = DatasetLayout.from_dict(self.manifest["layout"])
        self.sidecars = [SidecarLayout.from_dict(entry) for entry in self.manifest.get("extensions", [])]
        self._members = base_layout(self.layout, self.sidecars).webdataset_members(keep_images=True)

    @property
    def units(self) -> list[dict[str, Any]]:
        return self.manifest["units"]

    def __len__(self) -> int:
        return self.manifest["totals"]["samples"]

    def iter_samples(self, units: list[str] | None = None, view_params: bool = True) -> Iterator[dict[str, Any]]:
        """Rows of every unit (or of `units`); `view_params=False` leaves "aug" as plain records
        (dicts), which spares importing the renderer and torch (`inspect`)."""
        wanted = set(units) if units is not None else None
        for unit in self.units:
            if wanted is None or unit["id"] in wanted:
                yield from self.iter_unit(unit, view_params)

    def failures(self, unit: dict[str, Any]) -> list[dict[str, Any]]:
        """The unit's rejected input samples: {"key", "reason", "detail"} each, in input order."""
        text = self.location.read_bytes(unit["files"]["failures"]["path"]).decode()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def iter_unit(self, unit: dict[str, Any], view_params: bool = True) -> Iterator[dict[str, Any]]:
        """The unit's rows, in order, joined with the unit's sidecar rows."""
        files = [self._iter_file(unit["files"]["data"]["path"], self._members)]
        files += [self._iter_file(unit["files"][s.extension]["path"], s.webdataset_members()) for s in self.sidecars]
        for row, *extras in itertools.zip_longest(*files):
            if row is None or None in extras:
                raise DatasetError(f"unit {unit['id']}: its sidecar files and data file differ in length")
            for sidecar, extra in zip(self.sidecars, extras):
                sidecar.join(row, extra, f"unit {unit['id']}")
            yield self._decode_embeddings(row, view_params)

    def _iter_file(self, relative_path: str, members: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        array_names = set(self.layout.stored_arrays())
        return file_rows(self.location, relative_path, self.manifest["format"], members, array_names)

    def _decode_embeddings(self, row: dict[str, Any], view_params: bool = True) -> dict[str, Any]:
        dtype, scales = self.layout.embedding_dtype, self.layout.scale_columns()
        for name in self.layout.embedding_shapes():
            row[name] = from_storage(row[name], dtype, row.pop(scales[name]) if name in scales else None)
        if view_params:
            from dr_pipeline.augment import ViewParams  # imports torch

            row["aug"] = [ViewParams.from_record(r) for r in row["aug"]]
        return row


def file_rows(
    location: Location, relative_path: str, file_format: str, members: list[dict[str, Any]], array_names: set[str]
) -> Iterator[dict[str, Any]]:
    """Rows of one data or sidecar file, embeddings as stored: of a Parquet file its columns (those
    in `array_names`, embeddings and scales, as numpy arrays), of a tar the `members` of each sample."""
    path = location.join(relative_path)
    if file_format == "arrow":
        return _parquet_rows(location, path, array_names)
    return _tar_rows(location, path, members)


def _parquet_rows(location: Location, path: str, array_names: set[str]) -> Iterator[dict[str, Any]]:
    with location.fs.open(path, "rb") as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=256):
            names = [name for name in batch.schema.names if name in array_names]
            embeddings = {name: fixed_size_matrix(batch.column(name)) for name in names}
            plain = batch.drop_columns(names).to_pylist()
            for i, row in enumerate(plain):
                row.update({name: values[i] for name, values in embeddings.items()})
                yield row


def _tar_rows(location: Location, path: str, members: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    with location.fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
        current_key, raw = None, {}
        for info in tar:
            key, _, suffix = info.name.partition(".")
            if key != current_key and raw:
                yield _tar_row(current_key, raw, members)
                raw = {}
            current_key = key
            raw[suffix] = tar.extractfile(info).read()
        if raw:
            yield _tar_row(current_key, raw, members)


def _tar_row(key: str, raw: dict[str, bytes], members: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"key": key, "image": None}
    for member in members:
        if member["encoding"] == "bytes":
            continue
        data = raw[member["suffix"]]
        if member["encoding"] == "npy":
            row[member["fields"][0]] = np.load(io.BytesIO(data), allow_pickle=False)
        else:
            value = json.loads(data)
            row.update(value if len(member["fields"]) > 1 else {member["fields"][0]: value})
    image_member = row.get("image_format")
    if image_member in raw:
        row["image"] = raw[image_member]
    return row


def open_dataset(url: str, storage_options: dict[str, Any] | None = None) -> ReinforcedDataset:
    return ReinforcedDataset(url, storage_options)


