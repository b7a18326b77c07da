"""The GPU path, checked where it can be on a CPU: speed settings leave embeddings unchanged,
attention is fused, batch sizes follow free memory, and views rendered on the model's device
are the CPU renderer's views with the same parameters."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.teachers import tiny_hf_models
from dr_pipeline.core.accelerator import (
    CPU_BATCH_SIZE,
    MAX_AUTO_BATCH,
    Acceleration,
    batch_size_for_memory,
    teacher_batch_size,
    views_to_device,
)
from dr_pipeline.core.config import TeacherConfig, parse_job
from dr_pipeline.core.errors import ConfigError
from dr_pipeline.generate.model_worker import ModelWorker
from dr_pipeline.generate.prepare import ViewBatch, prepare_unit
from dr_pipeline.core.timing import StageClock
from teachers import build_teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GIB, MIB = 2**30, 2**20
ACCELERATOR_VIEW_MEAN_ABS_BOUND = 5.0
ACCELERATOR_BATCH_MEAN_ABS_BOUND = 1.0
"""Views rendered on the device (torchvision's tensor kernels) differ from the CPU renderer's (the
reference PIL path) by the documented bound of README "Fidelity": per view at most
ACCELERATOR_VIEW_MEAN_ABS_BOUND grey levels on average, a batch much less."""


class _OpNames(TorchDispatchMode):
    """The aten ops a block of code runs."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def _views(count: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    return "hf:" + tiny_hf_models.clip(tmp_path_factory.mktemp("hf") / "clip")


@pytest.mark.parametrize("kind", ["open_clip", "hf"])
def test_channels_last_and_compile_give_the_eager_embeddings(kind, hf_clip):
    spec = "open_clip:dr-tiny-vit-32" if kind == "open_clip" else hf_clip
    teacher = build_teacher(TeacherConfig(id="t", spec=spec))
    views, texts = _views(4, teacher.card.input_size), ["a cat on a mat", "two dogs"]
    eager_image, eager_text = teacher.encode_image(views), teacher.encode_text(texts)
    # aot_eager traces the forward as inductor would (dynamo graph capture + AOT decomposition),
    # without the minute of C++ compilation; inductor itself is for GPUs (resources.compile).
    teacher.accelerate(Acceleration(channels_last=True, compile_backend="aot_eager"))
    torch.testing.assert_close(teacher.encode_image(views), eager_image, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(teacher.encode_text(texts), eager_text, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["open_clip", "hf"])
def test_teacher_attention_runs_fused_scaled_dot_product(kind, hf_clip):
    spec = "open_clip:dr-tiny-vit-32" if kind == "open_clip" else hf_clip
    teacher = build_teacher(TeacherConfig(id="t", spec=spec))
    with _OpNames() as ops:
        teacher.encode_image(_views(2, teacher.card.input_size))
        teacher.encode_text(["a cat"])
    assert "aten.scaled_dot_product_attention.default" in ops.names


def test_batch_size_from_free_memory_and_measured_footprint():
    # a ViT-L/14 view at bf16 takes about 60 MiB of activations at its peak layer
    assert batch_size_for_memory(free_bytes=70 * GIB, bytes_per_item=60 * MIB) == int(70 * 1024 * 0.8 // 60)
    assert batch_size_for_memory(free_bytes=1 * GIB, bytes_per_item=4 * GIB) == 1
    assert batch_size_for_memory(free_bytes=80 * GIB, bytes_per_item=1024) == MAX_AUTO_BATCH
    assert batch_size_for_memory(free_bytes=80 * GIB, bytes_per_item=0) == MAX_AUTO_BATCH


def test_teacher_batch_size_is_the_configured_one_or_the_cpu_default():
    never_called = lambda views: pytest.fail("a CPU batch size needs no probe forward")  # noqa: E731
    assert teacher_batch_size(96, never_called, 224, torch.device("cpu")) == 96
    assert teacher_batch_size("auto", never_called, 224, torch.device("cpu")) == CPU_BATCH_SIZE


def test_views_reach_the_device_as_an_owned_copy():
    views = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
    views.flags.writeable = False  # as they come out of Ray's object store
    on_device = views_to_device(views, torch.device("cpu"), pin_memory=True)
    assert on_device.dtype == torch.uint8 and np.array_equal(on_device.numpy(), views)
    assert not np.shares_memory(on_device.numpy(), views)


def test_speed_settings_are_validated_and_leave_the_output_hash(small_job_dict, sample_shards, tmp_path):
    base = small_job_dict(sample_shards, tmp_path)
    fast = small_job_dict(sample_shards, tmp_path, resources={
        "channels_last": False, "compile": "inductor", "pin_memory": False, "render_views_on": "accelerator",
        "model_threads": 2,
    })
    fast["teachers"] = [{**t, "batch_size": 512} for t in fast["teachers"]]
    assert parse_job(base).teachers[0].batch_size == "auto"
    assert parse_job(fast).output_hash() == parse_job(base).output_hash()
    with pytest.raises(ConfigError, match="resources.compile"):
        parse_job(small_job_dict(sample_shards, tmp_path, resources={"compile": "no-such-backend"}))
    with pytest.raises(ConfigError, match="batch_size"):
        parse_job({**base, "teachers": [{**base["teachers"][0], "batch_size": 0}]})


def test_views_rendered_on_the_model_device_stay_within_the_bound_of_the_cpu_renderer(
    small_job_dict, sample_shards, tmp_path
):
    """Same sampled parameters; pixels within the accelerator renderer's documented bound of the
    reference, on a CPU device and on CUDA (when present), max printed."""
    cpu_job = parse_job(small_job_dict(sample_shards, tmp_path))
    device_job = parse_job(small_job_dict(sample_shards, tmp_path, resources={"render_views_on": "accelerator"}))
    worker = ModelWorker(cpu_job, use_gpu=False)
    caption_sizes = (worker.captioners[0].card.input_size,)
    cpu_batch = next(prepare_unit(sample_shards[0], cpu_job, caption_sizes))
    device_batch = next(prepare_unit(sample_shards[0], device_job, caption_sizes))
    assert [s.views for s in device_batch.samples] == [s.views for s in cpu_batch.samples]
    assert device_batch.view_batch().views is None
    reference = cpu_batch.view_batch()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        worker.device = device
        views, caption_views = worker.model_inputs(device_batch.view_batch(), StageClock())
        difference = (views.cpu().int() - torch.from_numpy(reference.views).int()).abs().float()
        caption_difference = (caption_views[caption_sizes[0]].cpu().int()
                              - torch.from_numpy(reference.caption_views[caption_sizes[0]]).int()).abs().float()
        per_view = difference.mean(dim=(2, 3, 4))
        print(f"{device}: max abs pixel difference {int(difference.max())}, mean {float(difference.mean()):.4f}, "
              f"worst view mean {float(per_view.max()):.4f}")
        assert float(per_view.max()) <= ACCELERATOR_VIEW_MEAN_ABS_BOUND
        assert float(difference.mean()) <= ACCELERATOR_BATCH_MEAN_ABS_BOUND
        assert float(caption_difference.mean()) <= ACCELERATOR_BATCH_MEAN_ABS_BOUND


def test_model_worker_embeds_device_rendered_views_as_views_rendered_before(small_job_dict, sample_shards, tmp_path):
    """Rendering on the device changes where the views are made, not what is embedded: the same
    embeddings as views rendered beforehand by the same tensor renderer."""
    cpu_job = parse_job(small_job_dict(sample_shards, tmp_path))
    device_job = parse_job(small_job_dict(sample_shards, tmp_path, resources={"render_views_on": "accelerator"}))
    worker = ModelWorker(cpu_job, use_gpu=False)
    caption_sizes = (worker.captioners[0].card.input_size,)
    device_batch = next(prepare_unit(sample_shards[0], device_job, caption_sizes)).view_batch()
    views, caption_views = worker.model_inputs(device_batch, StageClock())
    rendered_before = ViewBatch(
        keys=device_batch.keys, texts=device_batch.texts, views=views.numpy(),
        caption_views={size: v.numpy() for size, v in caption_views.items()},
    )
    cpu_result = worker.process(rendered_before)
    device_result = worker.process(device_batch)
    assert device_result.captions == cpu_result.captions
    for teacher in cpu_job.teachers:
        np.testing.assert_array_equal(device_result.image_emb[teacher.id], cpu_result.image_emb[teacher.id])
        np.testing.assert_array_equal(device_result.text_emb[teacher.id], cpu_result.text_emb[teacher.id])
    assert "augment" in device_result.seconds and "to_device" in cpu_result.seconds
