"""Replaying the views the teachers saw: the original image, then `render_view` with the stored parameters.

The original comes from the dataset itself when the job kept images
(`output.keep_images`), otherwise from the input shard the unit was made of
(the manifest names it): a unit is one input shard, and its rows are in that
shard's order, so the two are joined in one forward pass by source key, and
each image is checked against the sha256 recorded at generation.

Rendering goes through the same `augment.render_view` the generator used, with
the job's augmentation config from the manifest, so at the generator's view size
a replayed view is pixel-identical to the one the teachers embedded.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator

import torch

from dr_pipeline.augment import render_view
from dr_pipeline.config import InputConfig, JobConfig
from dr_pipeline.decode import decode_image
from dr_pipeline.errors import DatasetError
from dr_pipeline.inputs import InputFailure, iter_shard
from dr_pipeline.reader import ReinforcedDataset
from dr_pipeline.storage import redact_url


def dataset_job(dataset: ReinforcedDataset) -> JobConfig:
    """The job config a dataset was generated with, as recorded in its manifest."""
    return JobConfig.model_validate(dataset.manifest["config"])


def unit_rows_with_images(
    dataset: ReinforcedDataset, unit: dict[str, Any], input_storage_options: dict[str, Any] | None = None
) -> Iterator[dict[str, Any]]:
    """The rows of one unit with `image` holding the original encoded bytes.

    When the dataset does not keep images they are read from the unit's input
    shard, with `input_storage_options` (the manifest stores none: they may hold
    credentials). A sample missing from the shard, or whose bytes changed since
    generation, is a DatasetError rather than a silently wrong view.
    """
    rows = dataset.iter_unit(unit)
    if dataset.manifest["config"]["output"]["keep_images"]:
        yield from rows
        return
    recorded = dataset.manifest["config"]["input"]
    input_config = InputConfig.model_validate({**recorded, "storage_options": input_storage_options or {}})
    shard = unit["input"]
    source = iter_shard(shard, input_config)
    for row in rows:
        for item in source:
            if isinstance(item, InputFailure):
                raise DatasetError(f"unit {unit['id']}: cannot read its input shard {redact_url(shard)}: {item.detail}")
            if item.source_key == row["source_key"] and item.image is not None:
                break
        else:
            raise DatasetError(
                f"unit {unit['id']}: sample {row['source_key']!r} is not in its input shard {redact_url(shard)} "
                "(moved or rewritten since generation?)"
            )
        if hashlib.sha256(item.image).hexdigest() != row["image_sha256"]:
            raise DatasetError(
                f"unit {unit['id']}: the image of sample {row['source_key']!r} in {redact_url(shard)} "
                "differs from the one reinforced (sha256 mismatch)"
            )
        row["image"] = item.image
        yield row


class ViewRenderer:
    """Renders a row's stored views from its original image, as the generator did."""

    def __init__(self, job: JobConfig):
        self.augmentation = job.augmentation
        self.max_image_pixels = job.input.max_image_pixels

    @property
    def view_size(self) -> int:
        """The size the generator rendered (and the teachers were given) views at."""
        return self.augmentation.random_resized_crop.size

    def render(self, row: dict[str, Any], index: int, size: int | None = None) -> torch.Tensor:
        """View `index` of the row as uint8 [3, size, size] (default: the generator's view size)."""
        if row.get("image") is None:
            raise DatasetError(f"sample {row['key']!r} has no image bytes to replay its views from")
        pixels = decode_image(row["image"], self.max_image_pixels)
        return render_view(pixels, row["aug"][index], size or self.view_size, self.augmentation)
