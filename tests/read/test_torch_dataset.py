"""Replay exactness and the PyTorch dataset, against the generator's own CPU stage and the reader's rows."""

import copy
import json
import random
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import dr_pipeline
from dr_pipeline.views.augment import render_view
from dr_pipeline.views.decode import decode_image
from dr_pipeline.core.errors import DatasetError
from dr_pipeline.generate.prepare import prepare_unit
from dr_pipeline.read.replay import ViewRenderer, unit_rows_with_images
from dr_pipeline.read.torch_dataset import ReinforcedTorchDataset, shuffled

BOTH = ["kept", "from_input"]


def _generator_views(generated):
    """key -> uint8 [K, 3, S, S]: the views the model actor received, from re-running the CPU stage."""
    views = {}
    for unit in generated.dataset.units:
        for batch in prepare_unit(unit["input"], generated.job, caption_sizes=()):
            view_batch = batch.view_batch()
            if view_batch is not None:
                views.update(zip(view_batch.keys, torch.from_numpy(view_batch.views)))
    return views


def _reader_rows(dataset):
    return {row["key"]: row for unit in dataset.units for row in unit_rows_with_images(dataset, unit)}


@pytest.mark.parametrize("name", BOTH)
def test_replayed_views_are_pixel_identical_to_the_views_the_teachers_embedded(generated, name):
    expected = _generator_views(generated[name])
    renderer = ViewRenderer(generated[name].job)
    rows = _reader_rows(generated[name].dataset)
    assert rows.keys() == expected.keys() and len(rows) == 18
    for key, row in rows.items():
        for index in range(generated[name].job.augmentation.num_views):
            assert torch.equal(renderer.render(row, index), expected[key][index]), (key, index)


def test_kept_dataset_exercises_flip_and_erasing(generated):
    views = [v for row in _reader_rows(generated["kept"].dataset).values() for v in row["aug"]]
    assert any(v.flip for v in views) and any(v.erase for v in views)


@pytest.mark.parametrize("name", BOTH)
def test_samples_are_the_replayed_view_and_the_rows_embeddings(generated, name):
    dataset, job = generated[name].dataset, generated[name].job
    expected_views = _generator_views(generated[name])
    rows = _reader_rows(dataset)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
    torch_dataset = ReinforcedTorchDataset(job.output.url, mean=mean.flatten().tolist(), std=std.flatten().tolist())
    samples = list(torch_dataset)
    assert sorted(s["key"] for s in samples) == sorted(rows)
    captions = {row["source"] for row in dataset.manifest["text_rows"][1:]}
    for sample in samples:
        row, view = rows[sample["key"]], sample["view_index"]
        torch.testing.assert_close(sample["image"], (expected_views[sample["key"]][view].float() / 255 - mean) / std)
        for teacher in dataset.layout.teachers:
            assert np.array_equal(sample["image_emb"][teacher.id].numpy(), row[teacher.image_column][view])
            assert np.array_equal(sample["text_emb"][teacher.id].numpy(), row[teacher.text_column][0])
        assert sample["text"] == row["text"]
        synthetic = [
            i for i, source in enumerate(dataset.manifest["text_rows"][1:], start=1)
            if row[source["source"]][source["index"]] == sample["syn_text"]
            and all(np.array_equal(sample["syn_text_emb"][t.id].numpy(), row[t.text_column][i])
                    for t in dataset.layout.teachers)
        ]
        assert synthetic and captions == {"captions_tiny_coca"}
        norms = [np.linalg.norm(e.numpy()) for e in sample["image_emb"].values()]
        np.testing.assert_allclose(norms, 1.0, atol=2e-2)  # bfloat16 widened to float32, not reinterpreted


def test_student_size_replays_the_same_view_at_another_resolution(generated):
    job = generated["kept"].job
    torch_dataset = ReinforcedTorchDataset(generated["kept"].dataset, image_size=96, mean=[0, 0, 0], std=[1, 1, 1])
    rows = _reader_rows(generated["kept"].dataset)
    for sample in list(torch_dataset)[:4]:
        row = rows[sample["key"]]
        pixels = decode_image(row["image"], job.input.max_image_pixels)
        view = render_view(pixels, row["aug"][sample["view_index"]], 96, job.augmentation)
        assert sample["image"].shape == (3, 96, 96)
        torch.testing.assert_close(sample["image"], view.float() / 255)


def _epoch(torch_dataset, epoch):
    torch_dataset.set_epoch(epoch)
    return [(s["key"], s["view_index"], s["syn_text"]) for s in torch_dataset]


def test_an_epoch_is_deterministic_for_its_seed_and_differs_between_epochs(generated):
    url = generated["kept"].job.output.url
    first, again = ReinforcedTorchDataset(url, seed=3, shuffle_buffer=8), ReinforcedTorchDataset(url, seed=3,
                                                                                                  shuffle_buffer=8)
    assert _epoch(first, 0) == _epoch(again, 0)
    assert _epoch(first, 1) == _epoch(again, 1)
    assert _epoch(first, 0) != _epoch(first, 1)
    assert _epoch(first, 0) != _epoch(ReinforcedTorchDataset(url, seed=4, shuffle_buffer=8), 0)
    views_per_epoch = [{view for _, view, _ in _epoch(first, epoch)} for epoch in range(2)]
    assert all(len(views) > 1 for views in views_per_epoch)  # random views differ between samples


def test_sequential_sampling_walks_through_the_views(generated):
    torch_dataset = ReinforcedTorchDataset(generated["kept"].job.output.url, sampling="sequential")
    for epoch in range(4):
        assert {view for _, view, _ in _epoch(torch_dataset, epoch)} == {epoch % 3}


def test_ranks_and_workers_read_every_sample_once(generated):
    url = generated["kept"].job.output.url
    all_keys = sorted(row["key"] for row in generated["kept"].dataset.iter_samples())
    per_rank = []
    for rank in range(2):
        torch_dataset = ReinforcedTorchDataset(url, rank=rank, world_size=2, seed=1)
        torch_dataset.set_epoch(5)
        loader = DataLoader(torch_dataset, batch_size=4, num_workers=2)
        per_rank.append([key for batch in loader for key in batch["key"]])
    assert sorted(per_rank[0] + per_rank[1]) == all_keys
    assert not set(per_rank[0]) & set(per_rank[1])
    assert all(per_rank)


def test_a_slot_without_units_warns_and_a_bad_rank_is_refused(generated):
    url = generated["kept"].job.output.url
    with pytest.warns(UserWarning, match="reader slot 3 of 4 .* gets no samples: the dataset has only 3 units"):
        assert list(ReinforcedTorchDataset(url, rank=3, world_size=4)) == []
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        ReinforcedTorchDataset(url, rank=2, world_size=2)


def test_dataloader_collates_batches(generated):
    torch_dataset = ReinforcedTorchDataset(generated["from_input"].job.output.url, image_size=64)
    batch = next(iter(DataLoader(torch_dataset, batch_size=5)))
    assert batch["image"].shape == (5, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert {t: e.shape for t, e in batch["image_emb"].items()} == {"tiny_vit_32": (5, 64), "tiny_vit_16_160": (5, 96)}
    assert batch["syn_text_emb"]["tiny_vit_16_160"].shape == (5, 96)
    assert len(batch["text"]) == len(batch["syn_text"]) == len(batch["key"]) == 5
    assert batch["view_index"].tolist() == [int(v) for v in batch["view_index"]]


def test_package_level_open_dataset(generated):
    dataset = dr_pipeline.open_dataset(generated["kept"].job.output.url)
    assert dataset.manifest == generated["kept"].dataset.manifest


def test_input_shard_that_no_longer_holds_the_samples_is_a_clear_error(generated, tmp_path):
    """The plan names each unit's input shard; point unit 0 at another shard's file."""
    copy_root = tmp_path / "copy"
    shutil.copytree(generated["from_input"].dataset.location.path, copy_root)
    plan = json.loads((copy_root / "plan.json").read_text())
    plan["units"][0]["input"] = plan["units"][1]["input"]
    (copy_root / "plan.json").write_text(json.dumps(plan))
    dataset = dr_pipeline.open_dataset(str(copy_root))
    with pytest.raises(DatasetError, match="is not in its input shard"):
        list(unit_rows_with_images(dataset, dataset.units[0]))


def test_changed_input_image_is_a_clear_error(generated, monkeypatch):
    dataset = copy.deepcopy(generated["from_input"].dataset)
    original = dataset.iter_unit

    def tampered(unit):
        for row in original(unit):
            yield {**row, "image_sha256": "0" * 64}

    monkeypatch.setattr(dataset, "iter_unit", tampered)
    with pytest.raises(DatasetError, match="sha256 mismatch"):
        list(unit_rows_with_images(dataset, dataset.units[0]))


def test_shuffle_buffer_permutes_deterministically():
    items = list(range(100))
    once = list(shuffled(items, 10, random.Random(0)))
    assert sorted(once) == items and once != items
    assert once == list(shuffled(items, 10, random.Random(0)))
    assert sorted(shuffled(items[:5], 10, random.Random(0))) == items[:5]  # buffer larger than the input
