"""A PyTorch dataset over a reinforced dataset: per sample, one replayed view and what the teachers said.

Each sample is a dict (torch's default collate batches it):

    key            the sample key
    image          float32 [3, size, size]: view `view_index` replayed at the student's
                   size, scaled to [0, 1] and normalised with the student's mean / std
    view_index     which of the K stored views it is
    image_emb      {teacher id: float32 [D]} each teacher's embedding of that view
    text           the real caption;  text_emb {teacher id: float32 [D]}
    syn_text       one synthetic caption;  syn_text_emb {teacher id: float32 [D]}
                   (absent when the dataset has no captioners)

Which view and which synthetic caption a sample gets in an epoch is a pure
function of (seed, key, epoch): random per epoch, or sequential (epoch % K,
epoch % S) to walk through all of them. Work is split by unit (one data file):
the units, shuffled per epoch with the seed, are dealt round-robin to every
(rank, DataLoader worker) slot, so no sample is read twice and the split is the
same on every run. A shuffle buffer then mixes samples within a slot.

Fast path: rows are read column by column (`RowBatch`), only the picked view and
embedding rows become Python / torch values, and with `batch_size` the dataset yields
ready batches (use `DataLoader(dataset, batch_size=None)`), normalised in one op; the
values are those of the per-sample path collated by torch's default collate.

Resuming mid-epoch: every sample carries `position` (slot, slots, samples its slot has
yielded so far, this one included). Iterate `dataset.tracked(loader)` to record what the
trainer received; `state_dict()` then says where each slot stands, and a dataset given
it by `load_state_dict` yields exactly the samples not yet received, in the same order.

`render_on="device"` leaves the views to the trainer: batches carry the decoded
originals ("original", uint8 [3, H, W] each) and the view parameters ("view_params")
instead of "image", and `images_on(batch, device)` renders them there with the
accelerator renderer (augment.render_views_tensor), within its documented bound of the
reference PIL replay (README "Fidelity").
"""

from __future__ import annotations

import itertools
import random
import warnings
from typing import Any, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.distributed as dist
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch.utils.data import IterableDataset, get_worker_info

from dr_pipeline.core.accelerator import views_to_device
from dr_pipeline.views.augment import render_views_tensor
from dr_pipeline.read.reader import ReinforcedDataset, RowBatch, open_dataset
from dr_pipeline.read.replay import ViewRenderer, dataset_job, unit_batches_with_images
from dr_pipeline.core.seeding import derive_seed

Sampling = Literal["random", "sequential"]
RenderOn = Literal["loader", "device"]
READ_ROWS = 256
"""Rows read at once per slot: with kept images a batch holds their bytes, so not the reader's 1024."""


class ReinforcedTorchDataset(IterableDataset):
    """Training samples of a reinforced dataset (see the module docstring for their fields).

    image_size: the student's input size (default: the generator's view size, where
    the replay is exact). mean / std: the student's normalisation (default CLIP's).
    rank / world_size: default to torch.distributed's when it is initialised.
    input_storage_options: for reading originals from the input shards when the
    dataset does not keep images. Call `set_epoch` before each epoch's iteration.
    batch_size: yield collated batches of this many samples (None: single samples).
    render_on: "loader" (views rendered here) or "device" (see `images_on`; needs batch_size).
    """

    def __init__(
        self,
        dataset: str | ReinforcedDataset,
        *,
        image_size: int | None = None,
        mean: Sequence[float] = OPENAI_DATASET_MEAN,
        std: Sequence[float] = OPENAI_DATASET_STD,
        sampling: Sampling = "random",
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 256,
        rank: int | None = None,
        world_size: int | None = None,
        storage_options: dict[str, Any] | None = None,
        input_storage_options: dict[str, Any] | None = None,
        batch_size: int | None = None,
        render_on: RenderOn = "loader",
    ):
        super().__init__()
        if sampling not in ("random", "sequential"):
            raise ValueError(f"sampling must be 'random' or 'sequential', got {sampling!r}")
        if rank is not None and world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if render_on not in ("loader", "device"):
            raise ValueError(f"render_on must be 'loader' or 'device', got {render_on!r}")
        if render_on == "device" and not batch_size:
            raise ValueError("render_on='device' needs batch_size (originals differ in size: torch's collate cannot stack them)")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.dataset = open_dataset(dataset, storage_options) if isinstance(dataset, str) else dataset
        self.renderer = ViewRenderer(dataset_job(self.dataset))
        self.image_size = image_size or self.renderer.view_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.sampling = sampling
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self.rank = rank
        self.world_size = world_size
        self.input_storage_options = input_storage_options
        self.batch_size = batch_size
        self.render_on = render_on
        self.epoch = 0
        self._seen: dict[int, int] = {}  # slot -> samples the trainer received from it this epoch
        self._last_slot: int | None = None
        self._slots: int | None = None
        self._resume: dict[str, Any] | None = None
        layout = self.dataset.layout
        self._image_columns = {t.id: t.image_column for t in layout.teachers if t.image_column}
        self._text_columns = {t.id: t.text_column for t in layout.teachers if t.text_column}
        self._synthetic_rows = self.dataset.manifest["text_rows"][1:]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch or (self._resume and self._resume["epoch"] != epoch):
            self._seen, self._last_slot, self._slots, self._resume = {}, None, None, None
        self.epoch = epoch

    def units_for(self, slot: int, slots: int) -> list[dict[str, Any]]:
        """The units slot `slot` of `slots` reads this epoch: every unit goes to exactly one slot."""
        units = list(self.dataset.units)
        if self.shuffle:
            random.Random(derive_seed(self.seed, "", "unit-order", self.epoch)).shuffle(units)
        return units[slot::slots]

    def _rank(self) -> tuple[int, int]:
        rank, world_size = self.rank, self.world_size
        if rank is None or world_size is None:
            initialised = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if initialised else 0
            world_size = dist.get_world_size() if initialised else 1
        return rank, world_size

    def _slot(self) -> tuple[int, int]:
        """(this reader's slot, number of slots) over distributed ranks x DataLoader workers.

        After a resume the workers take the rank's slots rotated so that worker 0 reads the slot
        the DataLoader would have asked next: its round-robin then continues where it stopped."""
        rank, world_size = self._rank()
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        slots = world_size * num_workers
        rotation = 0
        if self._resume is not None:
            if self._resume["slots"] not in (None, slots):
                raise ValueError(
                    f"the resumed state was saved with {self._resume['slots']} reader slots (ranks x DataLoader "
                    f"workers), this loader has {slots}: resume with the same world size and num_workers"
                )
            if self._resume["last_slot"] is not None:
                rotation = self._resume["last_slot"] - rank * num_workers + 1
        return rank * num_workers + (worker_id + rotation) % num_workers, slots

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, slots = self._slot()
        units = self.units_for(slot, slots)
        if not units:
            warnings.warn(
                f"reader slot {slot} of {slots} (ranks x DataLoader workers) gets no samples: the dataset has "
                f"only {len(self.dataset.units)} units (one per input shard); use fewer DataLoader workers",
                stacklevel=2,
            )
        rows: Iterator[tuple[RowBatch, Sequence[bytes], int]] = (
            (batch, images, index)
            for unit in units
            for batch, images in unit_batches_with_images(self.dataset, unit, self.input_storage_options, READ_ROWS)
            for index in range(len(batch))
        )
        if self.shuffle_buffer > 1:
            rng = random.Random(derive_seed(self.seed, f"slot-{slot}-of-{slots}", "shuffle-buffer", self.epoch))
            rows = shuffled(rows, self.shuffle_buffer, rng)
        skipped = self._resume["seen"].get(slot, 0) if self._resume is not None else 0
        position = itertools.count(skipped + 1)
        chunks = _chunks(itertools.islice(rows, skipped, None), self.batch_size or 1)
        for chunk in chunks:
            batch = self._collated(chunk, [(slot, slots, next(position)) for _ in chunk])
            yield batch if self.batch_size else _first(batch)

    def _choice(self, key: str, purpose: str, count: int) -> int:
        if self.sampling == "sequential":
            return self.epoch % count
        return derive_seed(self.seed, key, purpose, self.epoch) % count

    def _collated(
        self, chunk: list[tuple[RowBatch, Sequence[bytes], int]], positions: list[tuple[int, int, int]]
    ) -> dict[str, Any]:
        """The samples of `chunk` as torch's default collate would batch them."""
        keys = [batch.column("key")[index] for batch, _, index in chunk]
        views = [self._choice(key, "train-view", self.dataset.layout.num_views) for key in keys]
        collated: dict[str, Any] = {"key": keys}
        rows = [{"key": key, "image": images[index], "aug": {view: batch.views.params(index, view)}}
                for key, view, (batch, images, index) in zip(keys, views, chunk)]
        if self.render_on == "device":
            collated["original"] = [self.renderer.decode(row) for row in rows]
            collated["view_params"] = [row["aug"][view] for row, view in zip(rows, views)]
        else:
            collated["image"] = self._images(rows, views)
        collated["view_index"] = torch.tensor(views)
        collated["image_emb"] = _gathered(chunk, self._image_columns, views)
        collated["text"] = [batch.column("text")[index] for batch, _, index in chunk]
        collated["text_emb"] = _gathered(chunk, self._text_columns, [0] * len(chunk))
        if self._synthetic_rows:
            synthetic = [self._choice(key, "train-caption", len(self._synthetic_rows)) for key in keys]
            sources = [self._synthetic_rows[s] for s in synthetic]
            collated["syn_text"] = [batch.column(source["source"])[index][source["index"]]
                                    for source, (batch, _, index) in zip(sources, chunk)]
            collated["syn_text_emb"] = _gathered(chunk, self._text_columns, [1 + s for s in synthetic])
        collated["position"] = torch.tensor(positions)
        return collated

    def _images(self, rows: list[dict[str, Any]], views: list[int]) -> torch.Tensor:
        """View views[i] of each row replayed at the student's size and normalised: float32 [N, 3, size, size].
        Each view is rendered straight into one channels-last uint8 batch (PIL's layout), which changes
        layout once, in the widening copy of the normalisation."""
        pixels = np.empty((len(rows), self.image_size, self.image_size, 3), dtype=np.uint8)
        for target, row, view in zip(pixels, rows, views):
            self.renderer.render_into(row, view, self.image_size, target)
        return self._normalised(torch.from_numpy(pixels).permute(0, 3, 1, 2))

    def _normalised(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, S, S] in any memory layout -> contiguous float32 scaled to [0, 1] then normalised
        with the student's mean / std (a channels-last batch changes layout in the one widening copy)."""
        mean, std = self.mean.to(pixels.device), self.std.to(pixels.device)
        widened = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device).copy_(pixels)
        return widened.div_(255).sub_(mean).div_(std)

    def images_on(self, batch: dict[str, Any], device: torch.device | str, pin_memory: bool = True) -> torch.Tensor:
        """A render_on="device" batch's views rendered on `device` from its originals and view parameters
        (the accelerator renderer, as a model actor with `render_views_on: accelerator` runs it, within
        README "Fidelity"'s bound of the reference PIL path), normalised: float32 [N, 3, size, size]."""
        device = torch.device(device)
        cfg = self.renderer.augmentation
        views = [
            render_views_tensor(views_to_device(original.numpy(), device, pin_memory), [params], self.image_size,
                                cfg)[0]
            for original, params in zip(batch["original"], batch["view_params"])
        ]
        return self._normalised(torch.stack(views))

    def sample(self, row: dict[str, Any]) -> dict[str, Any]:
        """One training sample from one reader row (with its image bytes): the per-row reference
        the batched path (`__iter__`) equals, value for value."""
        view = self._choice(row["key"], "train-view", self.dataset.layout.num_views)
        pixels = self.renderer.render(row, view, self.image_size).float().div_(255)
        sample = {
            "key": row["key"],
            "image": (pixels - self.mean) / self.std,
            "view_index": view,
            "image_emb": _embeddings(row, self._image_columns, view),
            "text": row["text"],
            "text_emb": _embeddings(row, self._text_columns, 0),
        }
        if self._synthetic_rows:
            synthetic = self._choice(row["key"], "train-caption", len(self._synthetic_rows))
            source = self._synthetic_rows[synthetic]
            sample["syn_text"] = row[source["source"]][source["index"]]
            sample["syn_text_emb"] = _embeddings(row, self._text_columns, 1 + synthetic)
        return sample

    def tracked(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """`batches` (a DataLoader over this dataset) passed through, recording each one as received
        by the trainer: `state_dict()` taken after a batch counts that batch as seen."""
        for batch in batches:
            for slot, slots, count in torch.as_tensor(batch["position"]).view(-1, 3).tolist():
                self._seen[slot] = max(self._seen.get(slot, 0), count)
                self._last_slot, self._slots = slot, slots
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Where this rank's reading of the epoch stands (from `tracked`): plain ints, JSON-safe."""
        return {"epoch": self.epoch, "seed": self.seed, "slots": self._slots, "last_slot": self._last_slot,
                "seen": {str(slot): count for slot, count in sorted(self._seen.items())}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration of state["epoch"] yields only the samples not yet seen, in order."""
        if state["seed"] != self.seed:
            raise ValueError(f"the state was saved with seed {state['seed']}, this dataset has seed {self.seed}")
        self.epoch = state["epoch"]
        self._seen = {int(slot): int(count) for slot, count in state["seen"].items()}
        self._last_slot, self._slots = state["last_slot"], state["slots"]
        self._resume = {"epoch": self.epoch, "slots": state["slots"], "seen": dict(self._seen),
                        "last_slot": self._last_slot}


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _first(batch: dict[str, Any]) -> dict[str, Any]:
    """The one sample of a batch of one, as the per-sample path gives it."""
    sample = {}
    for name, value in batch.items():
        if isinstance(value, dict):
            sample[name] = {teacher: values[0] for teacher, values in value.items()}
        elif name == "view_index":
            sample[name] = int(value[0])
        else:
            sample[name] = value[0]
    return sample


def _gathered(
    chunk: list[tuple[RowBatch, Sequence[bytes], int]], columns: dict[str, str], rows: list[int]
) -> dict[str, torch.Tensor]:
    """{teacher: float32 [len(chunk), D]}: embedding row rows[i] of sample i, one gather per source batch."""
    by_batch: dict[int, list[int]] = {}
    for position, (batch, _, _) in enumerate(chunk):
        by_batch.setdefault(id(batch), []).append(position)
    gathered = {}
    for teacher, column in columns.items():
        out = np.empty((len(chunk), chunk[0][0].arrays[column].shape[-1]), dtype=np.float32)
        for positions in by_batch.values():
            batch = chunk[positions[0]][0]
            indices = [chunk[p][2] for p in positions]
            out[positions] = batch.embeddings(column, indices, [rows[p] for p in positions])
        gathered[teacher] = torch.from_numpy(out)
    return gathered


def _embeddings(row: dict[str, Any], columns: dict[str, str], index: int) -> dict[str, torch.Tensor]:
    return {teacher: torch.from_numpy(np.array(row[column][index], dtype=np.float32)) for teacher, column in columns.items()}


def shuffled(items: Iterable[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Items in a random order drawn from a buffer of `buffer_size` (memory bounded by the buffer)."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer
