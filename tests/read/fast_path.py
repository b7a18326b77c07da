"""Checks shared by the fast-reader tests: the batched path against the row path it replaces."""

import random

import numpy as np
import torch
from torch.utils.data import default_collate

from dr_pipeline.read.replay import unit_rows_with_images
from dr_pipeline.core.seeding import derive_seed
from dr_pipeline.read.torch_dataset import ReinforcedTorchDataset, shuffled


def assert_batches_equal_rows(dataset, batch_size=4):
    """Every RowBatch value (plain columns, all K view parameters, widened embeddings) equals the row's."""
    checked = 0
    for unit in dataset.units:
        rows = list(dataset.iter_unit(unit))
        batches = list(dataset.iter_unit_batches(unit, batch_size))
        assert [len(b) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
        flat = [(batch, i) for batch in batches for i in range(len(batch))]
        assert len(flat) == len(rows)
        for (batch, i), row in zip(flat, rows):
            for name in batch.columns.column_names:
                if name != "aug":
                    assert batch.column(name)[i] == row[name], (row["key"], name)
            assert [batch.views.params(i, k) for k in range(dataset.layout.num_views)] == row["aug"]
            for name in dataset.layout.embedding_shapes():
                decoded = batch.decoded(name)[i]
                assert decoded.dtype == np.float32 and np.array_equal(decoded, row[name]), (row["key"], name)
            checked += 1
    return checked


def reference_samples(torch_dataset: ReinforcedTorchDataset):
    """The samples of one epoch as the row path gave them before the fast path (one slot)."""
    rows = (row for unit in torch_dataset.units_for(0, 1)
            for row in unit_rows_with_images(torch_dataset.dataset, unit, torch_dataset.input_storage_options))
    if torch_dataset.shuffle_buffer > 1:
        seed = derive_seed(torch_dataset.seed, "slot-0-of-1", "shuffle-buffer", torch_dataset.epoch)
        rows = shuffled(rows, torch_dataset.shuffle_buffer, random.Random(seed))
    return [torch_dataset.sample(row) for row in rows]


def assert_same_values(fast, expected, where=""):
    """Nested dicts / lists / tensors equal value for value (the fast path's "position" aside)."""
    if isinstance(expected, dict):
        assert set(fast) - {"position"} == set(expected), where
        for name in expected:
            assert_same_values(fast[name], expected[name], f"{where}.{name}")
    elif isinstance(expected, torch.Tensor):
        assert fast.dtype == expected.dtype and torch.equal(fast, expected), where
    else:
        assert fast == expected, where


def assert_fast_samples_equal_row_path(url, **options):
    """Per sample and collated (batch_size 5, against torch's default collate of the row path)."""
    single = ReinforcedTorchDataset(url, seed=2, shuffle_buffer=8, **options)
    batched = ReinforcedTorchDataset(url, seed=2, shuffle_buffer=8, batch_size=5, **options)
    for dataset in (single, batched):
        dataset.set_epoch(1)
    expected = reference_samples(single)
    got = list(single)
    assert len(got) == len(expected) > 1
    for fast, reference in zip(got, expected):
        assert_same_values(fast, reference, reference["key"])
    batches = list(batched)
    assert [len(b["key"]) for b in batches] == [5] * (len(expected) // 5) + ([len(expected) % 5] if len(expected) % 5 else [])
    for index, batch in enumerate(batches):
        assert_same_values(batch, default_collate(expected[5 * index: 5 * index + 5]), f"batch {index}")
        assert batch["image"].is_contiguous()  # rendered channels last, handed over in torch's default layout
