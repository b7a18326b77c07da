"""What an output format is to dr-gen: the one interface every format module implements.

A format turns one unit's column values into one file and reads that file back:
row by row (`ReinforcedDataset.iter_unit`), batch by batch (`iter_unit_batches`),
and with every check `dr-gen validate` makes of the values (`checked_rows`). The
column values are plain: lists of Python values, and numpy arrays [n, rows(, D)]
for the embeddings and their scales, as `DatasetLayout.stored_arrays` says.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterator, Protocol

import numpy as np
import pyarrow as pa

import schemas
from dr_pipeline.core.config import JobConfig
from dr_pipeline.core.errors import error_line
from dr_pipeline.core.schema import DatasetLayout

CHECKED_ROWS = 1024
"""Rows per `CheckedRows` batch that validate checks at once."""

ASSUMED_CAPTION_BYTES = 60
"""Bytes of a caption when the input does not tell (DataComp captions average about ten words)."""
ASSUMED_METADATA_BYTES = 200
"""Key, source key, url, image format, size and sha256 of one sample."""

ReportRow = Callable[[str, str], None]
"""report(message, key): one problem of one row, as validate groups them."""


class UnitWriter(Protocol):
    """Writes one unit's file batch by batch; `close` finishes it."""

    def write(self, columns: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class FileLayout(Protocol):
    """What a file holds: a dataset's data file (`DatasetLayout`) or an extension's sidecar file
    (`SidecarLayout`)."""

    def arrow_schema(self) -> pa.Schema: ...

    def webdataset_members(self, keep_images: bool) -> list[dict[str, Any]]: ...


@dataclass
class CheckedRows:
    """Values of a batch of rows, as every check of validate needs them, whichever the file format."""

    keys: list[str]
    heights: np.ndarray
    widths: np.ndarray
    views_per_row: np.ndarray
    crops: np.ndarray  # [sum(views_per_row), 4]: top, left, height, width
    captions: dict[str, list[Any]]
    arrays: dict[str, np.ndarray]  # embeddings [n, rows, D] in the storage dtype, and their scales [n, rows]
    images: list[bytes | None]
    image_sha256: list[str]
    unchecked_keys: list[str] = field(default_factory=list)  # rows too malformed for the value checks

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]], layout: DatasetLayout, unchecked_keys: list[str]) -> "CheckedRows":
        """From rows as a format's row reader gives them (embeddings as stored)."""
        crops = [view["crop"] for row in rows for view in row["aug"]]
        return cls(
            keys=[row["key"] for row in rows],
            heights=np.array([row["image_height"] for row in rows], dtype=np.int64),
            widths=np.array([row["image_width"] for row in rows], dtype=np.int64),
            views_per_row=np.array([len(row["aug"]) for row in rows], dtype=np.int64),
            crops=np.array(crops, dtype=np.int64).reshape(-1, 4),
            captions={c.column: [row[c.column] for row in rows] for c in layout.captioners},
            arrays={
                name: np.stack([row[name] for row in rows]) if rows else np.empty((0, *shape), dtype)
                for name, (dtype, shape) in layout.stored_arrays().items()
            },
            images=[row["image"] for row in rows],
            image_sha256=[row["image_sha256"] for row in rows],
            unchecked_keys=unchecked_keys,
        )


class UnusableFile(Exception):
    """A data file that cannot be read as the layout says; `lines` say why."""

    def __init__(self, lines: list[str]):
        super().__init__("; ".join(lines))
        self.lines = lines


class DatasetFormat(ABC):
    """One output format: `name` in job files, `suffix` of its unit files.

    A format module defines a subclass and registers one instance (`formats.register_format`).
    Besides the writer and the row reader, the batch reader, validate's row checks and the
    plan's byte estimate have defaults built on the row reader and the columns' sizes;
    a format overrides them where it knows better (Parquet reads batches as Arrow).
    """

    name: str
    suffix: str

    @abstractmethod
    def open_writer(self, sink: BinaryIO, layout: FileLayout, keep_images: bool) -> UnitWriter:
        """A writer of one unit's file into `sink`; `keep_images`: with the original images."""

    @abstractmethod
    def rows(self, handle: BinaryIO, layout: FileLayout, array_names: set[str]) -> Iterator[dict[str, Any]]:
        """Rows of one file, as plain values; the columns of `array_names` (embeddings and scales)
        as numpy arrays in their stored dtype; "image" None where no image was kept."""

    def batches(
        self, handle: BinaryIO, layout: FileLayout, array_names: set[str], batch_size: int,
    ) -> Iterator[tuple[pa.Table, dict[str, np.ndarray]]]:
        """Batches of one file: (the plain columns as Arrow, the array columns as numpy [n, ...])."""
        rows = self.rows(handle, layout, array_names)
        schema = layout.arrow_schema()
        while chunk := list(itertools.islice(rows, batch_size)):
            names = [name for name in chunk[0] if name in array_names]
            arrays = {name: np.stack([row.pop(name) for row in chunk]) for name in names}
            plain = [f for f in schema if f.name in chunk[0]]
            yield pa.Table.from_pylist(chunk, schema=pa.schema(plain)), arrays

    def file_schema(self, handle: BinaryIO) -> pa.Schema | None:
        """The Arrow schema the file declares, for formats whose files carry one (else None);
        raises UnusableFile when the file cannot be opened."""
        return None

    def checked_rows(
        self, handle: BinaryIO, layout: DatasetLayout, keep_images: bool, report: ReportRow,
    ) -> Iterator[CheckedRows]:
        """A data file's rows as validate checks them; raises UnusableFile when the file cannot
        be read as the layout says, `report`s what is wrong with single rows."""
        rows = self.rows(handle, layout, set(layout.stored_arrays()))
        try:
            while chunk := list(itertools.islice(rows, CHECKED_ROWS)):
                yield CheckedRows.from_rows(chunk, layout, [])
        except (OSError, KeyError, ValueError) as error:
            raise UnusableFile([f"cannot be read as the layout says ({error_line(error)})"]) from None

    def bytes_per_sample(
        self, job: JobConfig, caption_bytes: float | None, image_bytes: float | None, dims: list[int | None],
    ) -> tuple[dict[str, float], dict[str, str]]:
        """Bytes of one output sample by part, and how each was obtained: the stored values before
        any compression (float16 embeddings hardly compress; a tar stores them as they are)."""
        aug = job.augmentation
        dtype = schemas.load_spec()["embedding_dtypes"][job.output.embedding_dtype]
        itemsize = np.dtype(dtype["numpy"]).itemsize
        scale_bytes = np.dtype(dtype["scale"]).itemsize if "scale" in dtype else 0  # per row, quantised dtypes
        rows = aug.num_views + 1 + job.num_captions
        per_view = 16 + 1  # crop box, flip
        if aug.rand_augment.p > 0:
            per_view += aug.rand_augment.num_ops * 5  # int8 op + float32 magnitude
        if aug.random_erasing.p > 0:
            per_view += 16
        caption = caption_bytes or ASSUMED_CAPTION_BYTES
        caption_basis = "mean of the counted input captions" if caption_bytes else "assumed"
        sizes = {
            "embeddings": float(sum(rows * (d * itemsize + scale_bytes) for d in dims if d is not None)),
            "augmentation_params": float(aug.num_views * per_view),
            "real_caption": caption,
            "synthetic_captions": job.num_captions * caption,
            "metadata": float(ASSUMED_METADATA_BYTES),
        }
        basis = {
            "embeddings": "exact: (K + 1 + S) x (D x dtype bytes + scale bytes) per teacher"
            if all(d is not None for d in dims) else "exact for teachers of known dimension, others left out",
            "augmentation_params": "exact (RandAugment ops counted as if never skipped)",
            "real_caption": caption_basis,
            "synthetic_captions": "S x the real caption's bytes",
            "metadata": "assumed",
        }
        if job.output.keep_images:
            sizes["images"] = image_bytes or 0.0
            basis["images"] = "mean of the input's images" if image_bytes else "unknown (not in the counted metadata)"
        return sizes, basis
