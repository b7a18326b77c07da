"""Replaying stored samples: pick rows, get their original images back, render their views.

`show` and `verify` both need the K views exactly as the teachers saw them. A
dataset stores only the view parameters, so the views are rendered again with
`augment.render_views` from the decoded original: the output's `image` column
when the job kept images, else the sample re-read from its input shard (the
unredacted URL from plan.json) and checked against the stored sha256.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dr_pipeline.augment import render_views
from dr_pipeline.config import JobConfig
from dr_pipeline.decode import decode_image
from dr_pipeline.errors import DatasetError
from dr_pipeline.inputs import RawSample, iter_shard
from dr_pipeline.plan import read_plan
from dr_pipeline.reader import ReinforcedDataset
from dr_pipeline.schema import DatasetLayout, safe_key
from dr_pipeline.storage import redact_url


@dataclass
class StoredSample:
    """One row of a dataset and the unit it was read from."""

    unit: dict[str, Any]
    row: dict[str, Any]

    @property
    def key(self) -> str:
        return self.row["key"]


def dataset_job(dataset: ReinforcedDataset) -> JobConfig:
    """The job that wrote the dataset, from the resolved config in its manifest."""
    return JobConfig.model_validate(dataset.manifest["config"])


def pick_samples(dataset: ReinforcedDataset, count: int, seed: int | None) -> list[StoredSample]:
    """`count` distinct samples drawn uniformly from the whole dataset (seed None: fresh entropy);
    only the units holding them are read."""
    total = len(dataset)
    if total == 0:
        raise DatasetError(f"{redact_url(dataset.location.url())} holds no samples")
    wanted = np.sort(np.random.default_rng(seed).choice(total, size=min(count, total), replace=False))
    picked: list[StoredSample] = []
    first_row = 0
    for unit in dataset.units:
        positions = set((wanted[(wanted >= first_row) & (wanted < first_row + unit["samples"])] - first_row).tolist())
        first_row += unit["samples"]
        if positions:
            picked += [StoredSample(unit, row) for i, row in enumerate(dataset.iter_unit(unit)) if i in positions]
    return picked


def find_sample(dataset: ReinforcedDataset, key: str) -> StoredSample:
    """The sample with this key (or this source key); scans units in order."""
    for unit in dataset.units:
        for row in dataset.iter_unit(unit):
            if key in (row["key"], row["source_key"]):
                return StoredSample(unit, row)
    raise DatasetError(f"no sample with key {key!r} in {redact_url(dataset.location.url())}")


def original_images(dataset: ReinforcedDataset, job: JobConfig, samples: list[StoredSample]) -> list[bytes]:
    """The encoded original of each sample: from the output when kept, else from its input shard."""
    found: dict[str, bytes] = {s.key: s.row["image"] for s in samples if s.row.get("image") is not None}
    missing = [s for s in samples if s.key not in found]
    if missing:
        plan = read_plan(dataset.location)
        inputs = {u.id: u.input for u in plan[1]} if plan else {}
        for unit_id in dict.fromkeys(s.unit["id"] for s in missing):
            url = inputs.get(unit_id) or next(s.unit["input"] for s in missing if s.unit["id"] == unit_id)
            keys = {s.key for s in missing if s.unit["id"] == unit_id}
            found.update(_read_from_input(url, keys, job))
    originals = []
    for sample in samples:
        if sample.key not in found:
            raise DatasetError(f"sample {sample.key}: not found in its input shard {redact_url(sample.unit['input'])}")
        data = found[sample.key]
        if hashlib.sha256(data).hexdigest() != sample.row["image_sha256"]:
            raise DatasetError(
                f"sample {sample.key}: the image in {redact_url(sample.unit['input'])} is not the one reinforced "
                "(sha256 differs); the input changed since the run"
            )
        originals.append(data)
    return originals


def _read_from_input(url: str, keys: set[str], job: JobConfig) -> dict[str, bytes]:
    """Image bytes of the samples of one input shard whose output keys are in `keys`."""
    found: dict[str, bytes] = {}
    for item in iter_shard(url, job.input):
        if isinstance(item, RawSample) and item.image is not None:
            key = safe_key(item.source_key)
            if key in keys and key not in found:
                found[key] = item.image
                if len(found) == len(keys):
                    break
    return found


def replay_views(job: JobConfig, image: bytes, row: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoded original uint8 [3, H, W] and the row's K views uint8 [K, 3, S, S], rendered
    exactly as at generation."""
    cfg = job.augmentation
    pixels = decode_image(image, job.input.max_image_pixels)
    return pixels, render_views(pixels, row["aug"], cfg.random_resized_crop.size, cfg)


def row_texts(row: dict[str, Any], layout: DatasetLayout) -> list[str]:
    """The texts behind each row of a text embedding: the real caption, then every synthetic caption."""
    return [row["text"] if s["source"] == "text" else row[s["source"]][s["index"]] for s in layout.text_sources()]
