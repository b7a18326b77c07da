"""Reading a dr-gen dataset back: the manifest says what the columns are, never guesses.

Rows come out as plain Python values with embeddings as float32 numpy arrays
[rows, D] and augmentation parameters as `ViewParams`, whichever form
(Parquet, Arrow IPC or webdataset) the dataset was written in. Columns added later by
`--extend` live in sidecar files (sidecars.py); rows come out joined with them.

For throughput (a trainer's loader), `iter_batches` gives the same rows column by
column: a `RowBatch` holds each array column as one numpy array in its stored dtype
[n, rows, D] straight from Arrow (from an IPC dataset, a view of the memory-mapped file), the augmentation parameters as arrays, and builds
Python values (a key, a `ViewParams`, a float32 embedding) only for what is asked.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from dr_pipeline.core.errors import DatasetError
from dr_pipeline.core.records import ViewParams
from dr_pipeline.dataset.manifest import read_manifest
from dr_pipeline.core.schema import DatasetLayout, from_storage, scale_column
from dr_pipeline.dataset.formats import format_for
from dr_pipeline.dataset.formats.base import FileLayout
from dr_pipeline.dataset.formats.arrow_batches import fixed_size_matrix
from dr_pipeline.dataset.formats.parquet import ROW_GROUP_ROWS
from dr_pipeline.dataset.sidecars import SidecarLayout, base_layout
from dr_pipeline.core.storage import Location

ROWS_PER_BATCH = ROW_GROUP_ROWS
"""Rows per `RowBatch` by default: the Parquet writer's row group."""


class ReinforcedDataset:
    """A dataset folder opened through its manifest (local or any fsspec URL)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.location, self.manifest = read_manifest(url, storage_options)
        self.storage_options = storage_options or {}  # also for its input shards, unless told others (replay.py)
        self.layout = DatasetLayout.from_dict(self.manifest["layout"])
        self.sidecars = [SidecarLayout.from_dict(entry) for entry in self.manifest.get("extensions", [])]
        self._base = base_layout(self.layout, self.sidecars)  # what the units' data files hold

    @property
    def units(self) -> list[dict[str, Any]]:
        return self.manifest["units"]

    def __len__(self) -> int:
        return self.manifest["totals"]["samples"]

    def iter_samples(self, units: list[str] | None = None, view_params: bool = True) -> Iterator[dict[str, Any]]:
        """Rows of every unit (or of `units`); `view_params=False` leaves "aug" as plain records
        (dicts), as `inspect` prints them."""
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
        files = [self._iter_file(unit["files"]["data"]["path"], self._base)]
        files += [self._iter_file(unit["files"][s.extension]["path"], s) for s in self.sidecars]
        for row, *extras in itertools.zip_longest(*files):
            if row is None or None in extras:
                raise DatasetError(f"unit {unit['id']}: its sidecar files and data file differ in length")
            for sidecar, extra in zip(self.sidecars, extras):
                sidecar.join(row, extra, f"unit {unit['id']}")
            yield self._decode_embeddings(row, view_params)

    def _iter_file(self, relative_path: str, layout: FileLayout) -> Iterator[dict[str, Any]]:
        array_names = set(self.layout.stored_arrays())
        return file_rows(self.location, relative_path, self.manifest["format"], layout, array_names)

    def iter_batches(self, units: list[str] | None = None, batch_size: int = ROWS_PER_BATCH) -> Iterator[RowBatch]:
        """The rows of the units (all by default), in order, as `RowBatch`es of at most `batch_size`."""
        wanted = set(units) if units is not None else None
        for unit in self.units:
            if wanted is None or unit["id"] in wanted:
                yield from self.iter_unit_batches(unit, batch_size)

    def iter_unit_batches(self, unit: dict[str, Any], batch_size: int = ROWS_PER_BATCH) -> Iterator[RowBatch]:
        """The unit's rows as `iter_unit` gives them, column by column, joined with its sidecars."""
        array_names = set(self.layout.stored_arrays())
        fmt = self.manifest["format"]
        batches = file_batches(self.location, unit["files"]["data"]["path"], fmt, self._base, array_names, batch_size)
        extras = [
            _Rechunked(file_batches(self.location, unit["files"][s.extension]["path"], fmt, s, array_names, batch_size))
            for s in self.sidecars
        ]
        for columns, arrays in batches:
            for sidecar, extra in zip(self.sidecars, extras):
                side_columns, side_arrays = extra.take(columns.num_rows, f"unit {unit['id']}")
                columns = _join_sidecar(sidecar, columns, arrays, side_columns, side_arrays, f"unit {unit['id']}")
            yield RowBatch(unit, columns, arrays, ViewArrays.from_arrow(columns.column("aug")), self.layout)
        if not all(extra.exhausted() for extra in extras):
            raise DatasetError(f"unit {unit['id']}: its sidecar files and data file differ in length")

    def _decode_embeddings(self, row: dict[str, Any], view_params: bool = True) -> dict[str, Any]:
        dtype, scales = self.layout.embedding_dtype, self.layout.scale_columns()
        for name in self.layout.embedding_shapes():
            row[name] = from_storage(row[name], dtype, row.pop(scales[name]) if name in scales else None)
        if view_params:
            row["aug"] = [ViewParams.from_record(r) for r in row["aug"]]
        row.setdefault("uid", row["source_key"])  # before schema 1.2, what the export wrote as uid
        return row


def file_rows(
    location: Location, relative_path: str, file_format: str, layout: FileLayout, array_names: set[str]
) -> Iterator[dict[str, Any]]:
    """Rows of one data or sidecar file (its `layout`), embeddings as stored: the columns in
    `array_names` (embeddings and scales) as numpy arrays."""
    with location.fs.open(location.join(relative_path), "rb") as handle:
        yield from format_for(file_format).rows(handle, layout, array_names)


@dataclass(frozen=True)
class ViewArrays:
    """The "aug" column of n rows with K views each, as arrays: view k of row i is entry i * K + k.

    RandAugment ops of entry j are op / magnitude[offsets[j]:offsets[j + 1]], None where
    rand_augment_valid[j] is False; the erase box is None where erase_valid[j] is False.
    """

    num_views: int
    crop: np.ndarray  # int32 [n * K, 4]
    flip: np.ndarray  # bool [n * K]
    rand_augment_valid: np.ndarray  # bool [n * K]
    offsets: np.ndarray  # int64 [n * K + 1]
    op: np.ndarray  # int8 [ops]
    magnitude: np.ndarray  # float32 [ops]
    erase: np.ndarray  # int32 [n * K, 4]
    erase_valid: np.ndarray  # bool [n * K]

    @classmethod
    def from_arrow(cls, aug: pa.Array | pa.ChunkedArray) -> "ViewArrays":
        if isinstance(aug, pa.ChunkedArray):  # combine_chunks copies even a single chunk
            aug = aug.chunk(0) if aug.num_chunks == 1 else aug.combine_chunks()
        row_offsets = aug.offsets.to_numpy()
        counts = np.diff(row_offsets)
        num_views = int(counts[0]) if len(counts) else 0
        if (counts != num_views).any():
            raise DatasetError(f"rows of one batch hold different numbers of views ({sorted(set(counts.tolist()))})")
        views = aug.values.slice(row_offsets[0], row_offsets[-1] - row_offsets[0]) if len(aug) else aug.values
        fields = dict(zip((f.name for f in views.type), views.flatten()))
        erase = fields["erase"]
        rand_augment = fields["rand_augment"]
        ops_offsets = rand_augment.offsets.to_numpy().astype(np.int64)
        ops = rand_augment.values.slice(ops_offsets[0], ops_offsets[-1] - ops_offsets[0])
        op, magnitude = (dict(zip((f.name for f in ops.type), ops.flatten()))[name] for name in ("op", "magnitude"))
        return cls(
            num_views=num_views,
            crop=fixed_size_matrix(fields["crop"]),
            flip=fields["flip"].to_numpy(zero_copy_only=False),
            rand_augment_valid=rand_augment.is_valid().to_numpy(zero_copy_only=False),
            offsets=ops_offsets - ops_offsets[0],
            op=op.to_numpy(zero_copy_only=False),
            magnitude=magnitude.to_numpy(zero_copy_only=False),
            erase=erase.values.slice(erase.offset * 4, len(erase) * 4).to_numpy(zero_copy_only=False).reshape(-1, 4),
            erase_valid=erase.is_valid().to_numpy(zero_copy_only=False),
        )

    def params(self, row: int, view: int) -> ViewParams:
        """View `view` of row `row`, equal to the `ViewParams` the row reader gives."""
        j = row * self.num_views + view
        first, end = self.offsets[j], self.offsets[j + 1]
        return ViewParams(
            crop=tuple(int(v) for v in self.crop[j]),
            flip=bool(self.flip[j]),
            rand_augment=tuple(zip(self.op[first:end].tolist(), self.magnitude[first:end].tolist()))
            if self.rand_augment_valid[j] else None,
            erase=tuple(int(v) for v in self.erase[j]) if self.erase_valid[j] else None,
        )


@dataclass
class RowBatch:
    """Consecutive rows of one unit, column by column.

    arrays: every embedding (and scale) column as one numpy array in its stored dtype
    [n, rows, D] (no per-row objects); columns: the other columns as Arrow, turned into
    Python values only when asked (`column`); views: the "aug" column as arrays.
    """

    unit: dict[str, Any]
    columns: pa.Table
    arrays: dict[str, np.ndarray]
    views: ViewArrays
    layout: DatasetLayout
    _lists: dict[str, list[Any]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return self.columns.num_rows

    def column(self, name: str) -> list[Any]:
        """A plain column's values as Python objects (built once per batch)."""
        if name not in self._lists:
            self._lists[name] = self.columns.column(name).to_pylist()
        return self._lists[name]

    def embeddings(self, name: str, rows: Sequence[int] | np.ndarray, index: Sequence[int] | np.ndarray | int) -> np.ndarray:
        """float32 [len(rows), D]: row `index` (or index[i] for rows[i]) of embedding column `name`
        of the given rows, widened as `iter_unit` widens it."""
        stored = self.arrays[name][rows, index]
        scale = self.arrays[scale_column(name)][rows, index] if self.layout.quantized else None
        return from_storage(stored, self.layout.embedding_dtype, scale)

    def decoded(self, name: str) -> np.ndarray:
        """float32 [n, rows, D]: the whole embedding column widened."""
        scale = self.arrays[scale_column(name)] if self.layout.quantized else None
        return from_storage(self.arrays[name], self.layout.embedding_dtype, scale)


def file_batches(
    location: Location,
    relative_path: str,
    file_format: str,
    layout: FileLayout,
    array_names: set[str],
    batch_size: int,
) -> Iterator[tuple[pa.Table, dict[str, np.ndarray]]]:
    """Batches of one data or sidecar file (its `layout`): (the plain columns as Arrow, the array
    columns of `array_names` as numpy in their stored dtype)."""
    with location.fs.open(location.join(relative_path), "rb") as handle:
        yield from format_for(file_format).batches(handle, layout, array_names, batch_size)


class _Rechunked:
    """A stream of (columns, arrays) batches taken again in batches of other sizes (sidecar files
    are read in step with the data file, whatever their own batch boundaries)."""

    def __init__(self, batches: Iterable[tuple[pa.Table, dict[str, np.ndarray]]]):
        self._batches = iter(batches)
        self._pending: list[tuple[pa.Table, dict[str, np.ndarray]]] = []
        self._rows = 0

    def take(self, count: int, where: str) -> tuple[pa.Table, dict[str, np.ndarray]]:
        while self._rows < count:
            batch = next(self._batches, None)
            if batch is None:
                raise DatasetError(f"{where}: its sidecar files and data file differ in length")
            self._pending.append(batch)
            self._rows += batch[0].num_rows
        columns = pa.concat_tables([c for c, _ in self._pending])
        names = self._pending[0][1]
        arrays = {n: np.concatenate([a[n] for _, a in self._pending]) if len(self._pending) > 1 else self._pending[0][1][n]
                  for n in names}
        rest = columns.num_rows - count
        self._pending = [(columns.slice(count), {n: a[count:] for n, a in arrays.items()})] if rest else []
        self._rows = rest
        return columns.slice(0, count), {n: a[:count] for n, a in arrays.items()}


    def exhausted(self) -> bool:
        return self._rows == 0 and all(batch[0].num_rows == 0 for batch in self._batches)


def _join_sidecar(
    sidecar: SidecarLayout,
    columns: pa.Table,
    arrays: dict[str, np.ndarray],
    side_columns: pa.Table,
    side_arrays: dict[str, np.ndarray],
    where: str,
) -> pa.Table:
    """Add one sidecar's columns to a batch (arrays in place; returns the new plain columns)."""
    keys, side_keys = columns.column("key"), side_columns.column("key")
    if len(keys) != len(side_keys):
        raise DatasetError(f"{where}: its sidecar files and data file differ in length")
    if not keys.equals(side_keys):
        mismatch = next(i for i, (a, b) in enumerate(zip(keys.to_pylist(), side_keys.to_pylist())) if a != b)
        raise DatasetError(f"{where}: sidecar row {side_keys[mismatch].as_py()!r} does not align with row "
                           f"{keys[mismatch].as_py()!r}")
    for column in sidecar.columns:
        for name in column.stored_names(sidecar.embedding_dtype):
            if name in side_arrays:
                value = side_arrays[name]
                arrays[name] = np.concatenate([arrays[name], value], axis=1) if column.join == "append_rows" else value
            else:
                columns = columns.append_column(side_columns.schema.field(name), side_columns.column(name))
    return columns


def open_dataset(url: str, storage_options: dict[str, Any] | None = None) -> ReinforcedDataset:
    return ReinforcedDataset(url, storage_options)


