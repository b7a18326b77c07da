"""The stored columns of one batch: the CPU stage's samples joined with the model stage's result.

What the output formats write (dataset/formats) is plain column values; this is where the
pipeline's own types become them.
"""

from __future__ import annotations

from typing import Any

from dr_pipeline.core.schema import DatasetLayout, storage_columns
from dr_pipeline.generate.model_worker import BatchResult
from dr_pipeline.generate.prepare import PreparedSample


def unit_columns(samples: list[PreparedSample], result: BatchResult, layout: DatasetLayout) -> dict[str, Any]:
    """Column name -> values (lists, or arrays for embeddings and their scales) of one batch."""
    columns: dict[str, Any] = {
        "key": [s.key for s in samples],
        "source_key": [s.source_key for s in samples],
        "uid": [s.uid for s in samples],
        "url": [s.url for s in samples],
        "text": [s.text for s in samples],
        "image": [s.image for s in samples],
        "image_format": [s.image_format for s in samples],
        "image_height": [s.height for s in samples],
        "image_width": [s.width for s in samples],
        "image_sha256": [s.image_sha256 for s in samples],
        "aug": [[v.to_record() for v in s.views] for s in samples],
    }
    for teacher in layout.teachers:
        if teacher.image_column:
            columns.update(storage_columns(teacher.image_column, result.image_emb[teacher.id], layout.embedding_dtype))
        if teacher.text_column:
            columns.update(storage_columns(teacher.text_column, result.text_emb[teacher.id], layout.embedding_dtype))
    for captioner in layout.captioners:
        columns[captioner.column] = result.captions[captioner.id]
    return columns
