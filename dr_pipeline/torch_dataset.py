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
"""

from __future__ import annotations

import random
import warnings
from typing import Any, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.distributed as dist
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch.utils.data import IterableDataset, get_worker_info

from dr_pipeline.reader import ReinforcedDataset, open_dataset
from dr_pipeline.replay import ViewRenderer, dataset_job, unit_rows_with_images
from dr_pipeline.seeding import derive_seed

Sampling = Literal["random", "sequential"]


class ReinforcedTorchDataset(IterableDataset):
    """Training samples of a reinforced dataset (see the module docstring for their fields).

    image_size: the student's input size (default: the generator's view size, where
    the replay is exact). mean / std: the student's normalisation (default CLIP's).
    rank / world_size: default to torch.distributed's when it is initialised.
    input_storage_options: for reading originals from the input shards when the
    dataset does not keep images. Call `set_epoch` before each epoch's iteration.
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
    ):
        super().__init__()
        if sampling not in ("random", "sequential"):
            raise ValueError(f"sampling must be 'random' or 'sequential', got {sampling!r}")
        if rank is not None and world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
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
        self.epoch = 0
        layout = self.dataset.layout
        self._image_columns = {t.id: t.image_column for t in layout.teachers if t.image_column}
        self._text_columns = {t.id: t.text_column for t in layout.teachers if t.text_column}
        self._synthetic_rows = self.dataset.manifest["text_rows"][1:]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def units_for(self, slot: int, slots: int) -> list[dict[str, Any]]:
        """The units slot `slot` of `slots` reads this epoch: every unit goes to exactly one slot."""
        units = list(self.dataset.units)
        if self.shuffle:
            random.Random(derive_seed(self.seed, "", "unit-order", self.epoch)).shuffle(units)
        return units[slot::slots]

    def _slot(self) -> tuple[int, int]:
        """(this reader's slot, number of slots) over distributed ranks x DataLoader workers."""
        rank, world_size = self.rank, self.world_size
        if rank is None or world_size is None:
            initialised = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if initialised else 0
            world_size = dist.get_world_size() if initialised else 1
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        return rank * num_workers + worker_id, world_size * num_workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, slots = self._slot()
        units = self.units_for(slot, slots)
        if not units:
            warnings.warn(
                f"reader slot {slot} of {slots} (ranks x DataLoader workers) gets no samples: the dataset has "
                f"only {len(self.dataset.units)} units (one per input shard); use fewer DataLoader workers",
                stacklevel=2,
            )
        rows = (
            row
            for unit in units
            for row in unit_rows_with_images(self.dataset, unit, self.input_storage_options)
        )
        if self.shuffle_buffer > 1:
            rng = random.Random(derive_seed(self.seed, f"slot-{slot}-of-{slots}", "shuffle-buffer", self.epoch))
            rows = shuffled(rows, self.shuffle_buffer, rng)
        for row in rows:
            yield self.sample(row)

    def _choice(self, key: str, purpose: str, count: int) -> int:
        if self.sampling == "sequential":
            return self.epoch % count
        return derive_seed(self.seed, key, purpose, self.epoch) % count

    def sample(self, row: dict[str, Any]) -> dict[str, Any]:
        """One training sample from one reader row (with its image bytes)."""
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
