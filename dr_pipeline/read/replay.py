"""Replaying stored samples: get their original images back and render their views again.

A dataset stores only view parameters, so `show`, `verify`, the PyTorch dataset and
the exporter render the views again with the generator's own `augment.render_view`
from the decoded original. The original is the output's `image` column when the job
kept images, else the sample re-read from the unit's input shard (its URL from plan.json,
credential-free since the config refuses credentials in URLs; the caller gives the storage
options) and checked against the sha256 recorded at generation, so a moved or rewritten
input is an error rather than a silently wrong view.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from dr_pipeline.views.augment import render_picture_view, render_view, render_views
from dr_pipeline.core.config import InputConfig, JobConfig
from dr_pipeline.views.decode import decode_image, decode_picture
from dr_pipeline.core.errors import DatasetError
from dr_pipeline.sources.records import InputFailure, RawSample
from dr_pipeline.sources.shards import iter_shard
from dr_pipeline.dataset.plan import read_plan
from dr_pipeline.read.reader import ROWS_PER_BATCH, ReinforcedDataset, RowBatch
from dr_pipeline.core.schema import DatasetLayout, safe_key
from dr_pipeline.core.storage import redact_url


def dataset_job(dataset: ReinforcedDataset) -> JobConfig:
    """The job that wrote the dataset, from the resolved config in its manifest."""
    return JobConfig.model_validate(dataset.manifest["config"])


def _input_config(dataset: ReinforcedDataset, storage_options: dict[str, Any] | None) -> InputConfig:
    """The recorded input settings with caller-given storage options (the manifest stores none:
    credentials), else those the dataset was opened with."""
    recorded = dataset.manifest["config"]["input"]
    if storage_options is None:
        storage_options = getattr(dataset, "storage_options", None)
    return InputConfig.model_validate({**recorded, "storage_options": storage_options or {}})


def _unit_inputs(dataset: ReinforcedDataset) -> dict[str, str]:
    """Unit id -> input shard URL as planned (the manifest's copy went through redact_url too)."""
    plan = read_plan(dataset.location)
    return {u.id: u.input for u in plan.units} if plan else {u["id"]: u["input"] for u in dataset.units}


def _checked(data: bytes, row: dict[str, Any], shard: str) -> bytes:
    if hashlib.sha256(data).hexdigest() != row["image_sha256"]:
        raise DatasetError(
            f"sample {row['source_key']!r}: the image in {redact_url(shard)} differs from the one reinforced "
            "(sha256 mismatch): the input changed since the run; put the original shard back at that URL "
            "(a dataset written with output.keep_images needs no input)"
        )
    return data


def unit_rows_with_images(
    dataset: ReinforcedDataset, unit: dict[str, Any], input_storage_options: dict[str, Any] | None = None
) -> Iterator[dict[str, Any]]:
    """The rows of one unit with `image` holding the original encoded bytes.

    A unit's rows are in its input shard's order, so the two are joined in one
    forward pass by source key.
    """
    rows = dataset.iter_unit(unit)
    if dataset.manifest["config"]["output"]["keep_images"]:
        yield from rows
        return
    original_of = _InputOriginals(dataset, unit, input_storage_options)
    for row in rows:
        row["image"] = original_of(row)
        yield row


def unit_batches_with_images(
    dataset: ReinforcedDataset,
    unit: dict[str, Any],
    input_storage_options: dict[str, Any] | None = None,
    batch_size: int = ROWS_PER_BATCH,
) -> Iterator[tuple[RowBatch, Sequence[bytes]]]:
    """`unit_rows_with_images` by `RowBatch`: each batch with its rows' original encoded bytes."""
    batches = dataset.iter_unit_batches(unit, batch_size)
    if dataset.manifest["config"]["output"]["keep_images"]:
        for batch in batches:
            yield batch, _Binaries(batch.columns.column("image"))
        return
    original_of = _InputOriginals(dataset, unit, input_storage_options)
    for batch in batches:
        rows = zip(batch.column("source_key"), batch.column("image_sha256"))
        yield batch, [original_of({"source_key": key, "image_sha256": sha256}) for key, sha256 in rows]


class _Binaries(Sequence[bytes]):
    """An Arrow binary column read one value at a time (a batch's images are not all copied at once)."""

    def __init__(self, column: Any):
        self._column = column

    def __len__(self) -> int:
        return len(self._column)

    def __getitem__(self, index: int) -> bytes:  # type: ignore[override]
        return self._column[index].as_py()


class _InputOriginals:
    """The encoded originals of a unit's rows, read again from its input shard in one forward pass:
    a unit's rows are in its input shard's order, so the two are joined by source key."""

    def __init__(self, dataset: ReinforcedDataset, unit: dict[str, Any], input_storage_options: dict[str, Any] | None):
        self.unit_id = unit["id"]
        self.shard = _unit_inputs(dataset).get(unit["id"], unit["input"])
        self.source = iter_shard(self.shard, _input_config(dataset, input_storage_options))

    def __call__(self, row: dict[str, Any]) -> bytes:
        """The original of `row` (its source_key and image_sha256), checked by sha256."""
        for item in self.source:
            if isinstance(item, InputFailure):
                raise DatasetError(
                    f"unit {self.unit_id}: cannot read its input shard {redact_url(self.shard)}: {item.detail}"
                )
            if item.source_key == row["source_key"] and item.image is not None:
                return _checked(item.image, row, self.shard)
        raise DatasetError(
            f"unit {self.unit_id}: sample {row['source_key']!r} is not in its input shard {redact_url(self.shard)} "
            "(moved or rewritten since generation?)"
        )


@dataclass
class StoredSample:
    """One row of a dataset and the unit it was read from."""

    unit: dict[str, Any]
    row: dict[str, Any]

    @property
    def key(self) -> str:
        return self.row["key"]


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
    return find_samples(dataset, key)[0]


def find_samples(dataset: ReinforcedDataset, key: str) -> list[StoredSample]:
    """Every sample with this key or source key, in unit order (keys are unique within a unit
    only: two input shards may hold the same key); an error when there is none."""
    found = [StoredSample(unit, row) for unit in dataset.units for row in dataset.iter_unit(unit)
             if key in (row["key"], row["source_key"])]
    if not found:
        raise DatasetError(f"no sample with key {key!r} in {redact_url(dataset.location.url())}")
    return found


def original_images(
    dataset: ReinforcedDataset, samples: list[StoredSample], input_storage_options: dict[str, Any] | None = None
) -> list[bytes]:
    """The encoded original of each sample: from the output when kept, else from its input shard."""
    found: dict[str, bytes] = {s.key: s.row["image"] for s in samples if s.row.get("image") is not None}
    missing = [s for s in samples if s.key not in found]
    if missing:
        inputs = _unit_inputs(dataset)
        config = _input_config(dataset, input_storage_options)
        for unit_id in dict.fromkeys(s.unit["id"] for s in missing):
            keys = {s.key for s in missing if s.unit["id"] == unit_id}
            found.update(_read_from_input(inputs[unit_id], keys, config))
    originals = []
    for sample in samples:
        shard = sample.unit["input"]
        if sample.key not in found:
            raise DatasetError(f"sample {sample.key}: not found in its input shard {redact_url(shard)}")
        originals.append(_checked(found[sample.key], sample.row, shard))
    return originals


def _read_from_input(url: str, keys: set[str], config: InputConfig) -> dict[str, bytes]:
    """Image bytes of the samples of one input shard whose output keys are in `keys`."""
    found: dict[str, bytes] = {}
    for item in iter_shard(url, config):
        if isinstance(item, RawSample) and item.image is not None:
            key = safe_key(item.source_key)
            if key in keys and key not in found:
                found[key] = item.image
                if len(found) == len(keys):
                    break
    return found


class ViewRenderer:
    """Renders a row's stored views from its original image, as the generator did."""

    def __init__(self, job: JobConfig):
        self.augmentation = job.augmentation
        self.max_image_pixels = job.input.max_image_pixels

    @property
    def view_size(self) -> int:
        """The size the generator rendered (and the teachers were given) views at."""
        return self.augmentation.random_resized_crop.size

    def decode(self, row: dict[str, Any]) -> torch.Tensor:
        return decode_image(self._image_bytes(row), self.max_image_pixels)

    def _image_bytes(self, row: dict[str, Any]) -> bytes:
        if row.get("image") is None:
            raise DatasetError(f"sample {row['key']!r} has no image bytes to replay its views from")
        return row["image"]

    def render(self, row: dict[str, Any], index: int, size: int | None = None) -> torch.Tensor:
        """View `index` of the row as uint8 [3, size, size] (default: the generator's view size)."""
        return render_view(self.decode(row), row["aug"][index], size or self.view_size, self.augmentation)

    def render_into(self, row: dict[str, Any], index: int, size: int, out: np.ndarray) -> None:
        """View `index` of the row written into `out`, uint8 [size, size, 3] (channels last: a loader's
        batch buffer); the pixels of `render`, without a tensor of the original in between."""
        picture = decode_picture(self._image_bytes(row), self.max_image_pixels)
        render_picture_view(picture, row["aug"][index], size, self.augmentation, out=out)

    def render_all(self, row: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoded original uint8 [3, H, W] and all K views uint8 [K, 3, S, S] at the generator's size."""
        pixels = self.decode(row)
        return pixels, render_views(pixels, row["aug"], self.view_size, self.augmentation)


def row_texts(row: dict[str, Any], layout: DatasetLayout) -> list[str]:
    """The texts behind each row of a text embedding: the real caption, then every synthetic caption."""
    return [row["text"] if s["source"] == "text" else row[s["source"]][s["index"]] for s in layout.text_sources()]
