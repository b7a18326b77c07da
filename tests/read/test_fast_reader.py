"""The batched reader and the PyTorch dataset's fast path: the same values as the row path,
resuming mid-epoch across ranks and DataLoader workers, and views rendered on the trainer's device."""

import json

import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from dr_pipeline.read.torch_dataset import ReinforcedTorchDataset
from tests.core.test_accelerator import ACCELERATOR_BATCH_MEAN_ABS_BOUND
from tests.read.fast_path import assert_batches_equal_rows, assert_fast_samples_equal_row_path

BOTH = ["kept", "from_input"]  # Arrow float16 with kept images; webdataset bfloat16 read from the input shards


@pytest.mark.parametrize("name", BOTH)
def test_row_batches_hold_the_rows_values(generated, name):
    assert assert_batches_equal_rows(generated[name].dataset) == 18


@pytest.mark.parametrize("name", BOTH)
def test_fast_samples_equal_the_row_path(generated, name):
    assert_fast_samples_equal_row_path(generated[name].job.output.url)


def test_fast_samples_equal_the_row_path_at_the_students_size(generated):
    assert_fast_samples_equal_row_path(generated["kept"].job.output.url, image_size=96, sampling="sequential")


def _keys(batches):
    return [key for batch in batches for key in batch["key"]]


@pytest.mark.parametrize("loader_batch", [None, 3])
def test_resuming_mid_epoch_yields_the_unseen_samples_in_order(generated, loader_batch):
    """Two ranks x 2 DataLoader workers (one slot without units): stop after n batches, save the state
    through JSON, resume in fresh objects: what was seen + what the resumed loader yields = one whole epoch."""
    url = generated["kept"].job.output.url

    def dataset(rank):
        made = ReinforcedTorchDataset(url, rank=rank, world_size=2, seed=1, shuffle_buffer=4, image_size=32,
                                      batch_size=None if loader_batch else 2)
        made.set_epoch(3)
        return made

    def loader(made):
        return DataLoader(made, batch_size=loader_batch, num_workers=2)

    for rank in range(2):
        uninterrupted = dataset(rank)
        whole = _keys(uninterrupted.tracked(loader(uninterrupted)))
        batches = -(-len(whole) // (loader_batch or 2))
        assert len(set(whole)) == len(whole) and batches >= 3
        for stop in sorted({1, 2, batches - 1}):
            first = dataset(rank)
            seen = []
            for batch in first.tracked(loader(first)):
                seen.append(batch)
                if len(seen) == stop:
                    break
            state = json.loads(json.dumps(first.state_dict()))
            resumed = dataset(rank)
            resumed.load_state_dict(state)
            resumed.set_epoch(3)
            rest = _keys(resumed.tracked(loader(resumed)))
            assert _keys(seen) + rest == whole, (rank, stop)
            assert resumed.state_dict() == uninterrupted.state_dict()


def test_resume_refuses_another_number_of_slots(generated):
    url = generated["kept"].job.output.url
    first = ReinforcedTorchDataset(url, batch_size=2)
    next(first.tracked(DataLoader(first, batch_size=None, num_workers=2)))
    resumed = ReinforcedTorchDataset(url, batch_size=2)
    resumed.load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="saved with 2 reader slots .* this loader has 1"):
        next(iter(resumed))


@pytest.mark.parametrize("name", BOTH)
def test_views_rendered_on_the_trainers_device_match_the_loaders(generated, name):
    """The accelerator renderer on the trainer's device (CPU torch here, CUDA when present) stays
    within its documented bound of the loader's reference PIL replay."""
    url = generated[name].job.output.url
    on_loader = ReinforcedTorchDataset(url, batch_size=4, image_size=128)
    on_device = ReinforcedTorchDataset(url, batch_size=4, image_size=128, render_on="device")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    pairs = list(zip(on_loader, on_device))
    assert len(pairs) == 5
    std = on_loader.std.view(1, 3, 1, 1)
    for expected, batch in pairs:
        assert "image" not in batch and len(batch["original"]) == len(batch["view_params"]) == len(batch["key"])
        assert batch["key"] == expected["key"] and torch.equal(batch["view_index"], expected["view_index"])
        for device in devices:
            images = on_device.images_on(batch, device).cpu()
            grey_levels = ((images - expected["image"]) * std * 255).abs()
            print(f"{device}: max {float(grey_levels.max()):.3f} grey levels, mean {float(grey_levels.mean()):.4f}")
            assert float(grey_levels.mean()) <= ACCELERATOR_BATCH_MEAN_ABS_BOUND
    with pytest.raises(ValueError, match="needs batch_size"):
        ReinforcedTorchDataset(url, render_on="device")


def test_float16_embeddings_are_stored_without_a_dictionary(generated):
    """A float16 dictionary saves no bytes and makes reading 4x slower; keys and texts keep theirs."""
    dataset = generated["kept"].dataset
    metadata = pq.ParquetFile(dataset.location.join(dataset.units[0]["files"]["data"]["path"])).metadata
    encodings = {}
    for index in range(metadata.num_columns):
        column = metadata.row_group(0).column(index)
        encodings[column.path_in_schema.split(".")[0]] = column.encodings
    assert "RLE_DICTIONARY" not in encodings["image_emb_tiny_vit_32"] + encodings["text_emb_tiny_vit_16_160"]
    assert "RLE_DICTIONARY" in encodings["key"] and "RLE_DICTIONARY" in encodings["text"]
