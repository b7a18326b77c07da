"""The sidecar files of an extension (`--extend`): their schema or members as the extension's
layout says, the keys of the unit's data file in the same order, and their values."""

from __future__ import annotations

import tarfile

import numpy as np
import pyarrow as pa

from dr_pipeline.core.schema import from_storage, is_quantized, scale_column
from dr_pipeline.core.errors import error_line
from dr_pipeline.dataset.formats.base import UnusableFile
from dr_pipeline.dataset.sidecars import SidecarLayout
from dr_pipeline.read.reader import file_rows
from dr_pipeline.tools.validate.common import NORM_TOLERANCE, CheckedDataset, RowProblems


def sidecar_problems(dataset: CheckedDataset, where: str, path: str, sidecar: SidecarLayout, keys: list[str]) -> list[str]:
    """A sidecar file against its extension's layout and the keys of the unit's data file."""
    try:
        with dataset.out.fs.open(dataset.out.join(path), "rb") as handle:
            schema = dataset.format.file_schema(handle)
    except UnusableFile as unusable:
        return [f"{where}: {line}" for line in unusable.lines]
    if schema is not None and not schema.equals(sidecar.arrow_schema()):
        return [f"{where}: its Arrow schema differs from extension {sidecar.extension}'s layout"]
    names = set(dataset.full_layout.stored_arrays())
    row_problems, sidecar_keys = RowProblems(), []
    tolerance = NORM_TOLERANCE[sidecar.embedding_dtype]
    try:
        for row in file_rows(dataset.out, path, dataset.manifest["format"], sidecar, names):
            key = row["key"]
            sidecar_keys.append(key)
            for column in sidecar.columns:
                value = row[column.name]
                if column.role == "captions":
                    if value is None or len(value) != column.rows:
                        row_problems.add(f"{column.name} does not hold {column.rows} captions", key)
                    continue
                if np.shape(value) != (column.rows, column.dim):
                    row_problems.add(f"{column.name} is {list(np.shape(value))}, "
                                     f"the extension says {[column.rows, column.dim]}", key)
                    continue
                scale = row.get(scale_column(column.name)) if is_quantized(sidecar.embedding_dtype) else None
                values = from_storage(value, sidecar.embedding_dtype, scale)
                if not np.isfinite(values).all():
                    row_problems.add(f"{column.name} has NaN or inf", key)
                elif dataset.normalized[column.name] and np.abs(np.linalg.norm(values, axis=1) - 1).max() > tolerance:
                    row_problems.add(f"{column.name} has an L2 norm off 1 by more than {tolerance} "
                                     "(its card says normalized)", key)
    except (pa.ArrowException, OSError, tarfile.TarError, KeyError, ValueError) as error:
        return [f"{where}: cannot be read as extension {sidecar.extension}'s layout says ({error_line(error)})"]
    problems = row_problems.lines(where)
    if sidecar_keys != keys:
        first = next((i for i, (a, b) in enumerate(zip(sidecar_keys, keys)) if a != b), min(len(keys), len(sidecar_keys)))
        problems.append(f"{where}: its keys differ from the unit's data file from row {first} on "
                        f"({len(sidecar_keys)} rows, the data file has {len(keys)})")
    return problems
