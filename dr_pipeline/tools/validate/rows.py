"""A unit's data file, row by row: readable as its format and layout say (the format's own checks),
as many rows as recorded, and every value as schema v1 and the teacher cards say."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from dr_pipeline.core.schema import KEY_PATTERN, from_storage
from dr_pipeline.dataset.formats.base import CheckedRows, UnusableFile
from dr_pipeline.tools.validate.common import NORM_TOLERANCE, CheckedDataset, RowProblems, UnitResult
from dr_pipeline.tools.validate.keys import key_hash


def check_data(dataset: CheckedDataset, unit: dict[str, Any], result: UnitResult) -> None:
    """The data file's rows; sets the result's keys (in order) and their hashes."""
    path = unit["files"]["data"]["path"]
    where = f"unit {unit['id']}: {path}"
    row_problems = RowProblems()
    keys: list[str] = []
    try:
        with dataset.out.fs.open(dataset.out.join(path), "rb") as handle:
            for rows in dataset.format.checked_rows(handle, dataset.layout, dataset.keep_images, row_problems.add):
                keys += rows.keys + rows.unchecked_keys
                check_rows(dataset, rows, row_problems)
    except UnusableFile as unusable:
        result.problems += [f"{where}: {line}" for line in unusable.lines]
    else:
        result.keys = keys
        if len(keys) != unit["samples"]:
            result.problems.append(f"{where}: {len(keys)} rows, the manifest says {unit['samples']} samples")
    result.rows = len(keys)
    result.key_hashes = np.array([key_hash(k) for k in keys], dtype=np.uint64)
    result.problems += row_problems.lines(where)


def check_rows(dataset: CheckedDataset, rows: CheckedRows, problems: RowProblems) -> None:
    """Keys, views and crops, captions, embeddings (finite; norm 1 where the card says normalized),
    kept images."""
    layout = dataset.layout
    for key in rows.keys:
        if not KEY_PATTERN.match(key):
            problems.add("key does not match the schema's key pattern", key)
    for key, views in zip(rows.keys, rows.views_per_row):
        if views != layout.num_views:
            problems.add(f"aug holds {views} views, the layout says {layout.num_views}", key)
    view_row = np.repeat(np.arange(len(rows.keys)), rows.views_per_row)
    top, left, height, width = rows.crops.T
    outside = (top < 0) | (left < 0) | (height < 1) | (width < 1)
    outside |= (top + height > rows.heights[view_row]) | (left + width > rows.widths[view_row])
    for index in np.unique(view_row[outside]):
        problems.add("a crop box lies outside the image", rows.keys[index])
    for captioner in layout.captioners:
        for key, captions in zip(rows.keys, rows.captions[captioner.column]):
            if captions is None or len(captions) != captioner.num_captions:
                problems.add(f"{captioner.column} does not hold {captioner.num_captions} captions", key)
    tolerance = NORM_TOLERANCE[layout.embedding_dtype]
    scales = layout.scale_columns()
    for column in layout.embedding_shapes():
        scale = rows.arrays[scales[column]] if column in scales else None
        values = from_storage(rows.arrays[column], layout.embedding_dtype, scale)
        finite = np.isfinite(values).all(axis=(1, 2))
        for index in np.flatnonzero(~finite):
            problems.add(f"{column} has NaN or inf", rows.keys[index])
        if dataset.normalized[column]:
            with np.errstate(invalid="ignore", over="ignore"):
                off = np.abs(np.linalg.norm(values, axis=2) - 1).max(axis=1) > tolerance
            for index in np.flatnonzero(off & finite):
                problems.add(f"{column} has an L2 norm off 1 by more than {tolerance} (its card says normalized)",
                             rows.keys[index])
    for key, image, digest in zip(rows.keys, rows.images, rows.image_sha256):
        if image is None and dataset.keep_images:
            problems.add("no image, though the job keeps images", key)
        elif image is not None and hashlib.sha256(image).hexdigest() != digest:
            problems.add("the image bytes do not match image_sha256", key)
