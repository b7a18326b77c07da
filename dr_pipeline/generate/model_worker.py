"""The accelerator stage: one actor holds the whole teacher ensemble and every captioner.

Holding them together means views travel to the device once for all teachers,
and synthetic captions are embedded by every teacher without another hop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import ray
import torch

from dr_pipeline.core.accelerator import Acceleration, teacher_batch_size, views_to_device
from dr_pipeline.core.config import JobConfig, ResourcesConfig
from dr_pipeline.core.records import ModelCards
from dr_pipeline.generate.prepare import ViewBatch, caption_input_sizes, render_model_inputs
from dr_pipeline.core.schema import transfer_dtype
from dr_pipeline.core.seeding import derive_seed
from dr_pipeline.core.timing import StageClock
from teachers import Teacher, build_captioner, build_teacher


@dataclass
class BatchResult:
    image_emb: dict[str, np.ndarray]  # teacher id -> [N, K, D] in schema.transfer_dtype
    text_emb: dict[str, np.ndarray]  # teacher id -> [N, 1 + S_total, D]
    captions: dict[str, list[list[str]]]  # captioner id -> N lists of S captions
    seconds: dict[str, float]  # time per stage inside the actor (captioning, teacher_forward)


def caption_seeds(run_seed: int, captioner_id: str, keys: list[str], num_captions: int) -> list[list[int]]:
    """Seeds of caption j of each key: a pure function of (run seed, key, captioner, j)."""
    return [[derive_seed(run_seed, key, f"caption/{captioner_id}", j) for j in range(num_captions)] for key in keys]


def model_threads(resources: ResourcesConfig) -> int:
    """Torch CPU threads of a model actor: as configured, else its CPU reservation (what Ray gives it)."""
    return resources.model_threads or max(1, int(resources.cpus_per_actor))


def acceleration_for(resources: ResourcesConfig, device: torch.device) -> Acceleration:
    """The job's speed settings as they apply on `device`: channels-last only pays on CUDA."""
    return Acceleration(channels_last=resources.channels_last and device.type == "cuda",
                        compile_backend=resources.compile)


def _chunks(total: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


class ModelWorker:
    """Runs as a Ray actor (GPUs from the job's resources); also usable in-process."""

    def __init__(self, job: JobConfig, use_gpu: bool):
        self.job = job
        torch.set_num_threads(model_threads(job.resources))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.teachers = [build_teacher(t, self.device, t.precision) for t in job.teachers]
        self.captioners = [build_captioner(c, self.device, c.precision) for c in job.captioners]
        acceleration = acceleration_for(job.resources, self.device)
        for teacher in self.teachers:
            if hasattr(teacher, "accelerate"):  # built-in adapters; a plug-in may run as it likes
                teacher.accelerate(acceleration)
        view_size = job.augmentation.random_resized_crop.size
        self.batch_sizes = [
            teacher_batch_size(config.batch_size, teacher.encode_image, view_size, self.device)
            for config, teacher in zip(job.teachers, self.teachers)
        ]

    def describe(self) -> ModelCards:
        """Cards of the loaded models, as the manifest records them."""
        return {
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
            "device": str(self.device),
            "teachers": [t.card.to_dict() for t in self.teachers],
            "captioners": [c.card.to_dict() for c in self.captioners],
        }

    def process(self, batch: ViewBatch) -> BatchResult:
        """The batch's captions from every captioner, then every teacher's embeddings of what
        `teacher_inputs` gives it."""
        clock = StageClock()
        with torch.inference_mode():
            views, caption_views = self.model_inputs(batch, clock)
            with clock.stage("captioning"):
                captions = self._caption(batch.keys, caption_views)
            added = [[caption for c in self.job.captioners for caption in captions[c.id][i]] for i in range(len(batch))]
            with clock.stage("teacher_forward"):
                image_emb, text_emb = self._embed(self.teacher_inputs(batch, views, added))
        return BatchResult(image_emb=image_emb, text_emb=text_emb, captions=captions, seconds=dict(clock.seconds))

    def teacher_inputs(
        self, batch: ViewBatch, views: torch.Tensor, added: list[list[str]]
    ) -> Iterator[tuple[torch.Tensor, list[list[str]]]]:
        """Each teacher's (views, text rows), in teacher order, `added` being each row's captions
        from this worker's captioners: here every teacher embeds the views, the real caption and
        the new captions (schema v1's text rows)."""
        texts = [[text, *new] for text, new in zip(batch.texts, added)]
        return ((views, texts) for _ in self.teachers)

    def model_inputs(self, batch: ViewBatch, clock: StageClock) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The batch's views and captioner centre views on the device, copied there once for every
        model ("to_device"), or rendered there from the originals ("augment", augment.render_views_tensor)."""
        pin = self.job.resources.pin_memory
        if batch.originals is None:
            with clock.stage("to_device"):
                caption_views = {size: views_to_device(v, self.device, pin) for size, v in batch.caption_views.items()}
                return views_to_device(batch.views, self.device, pin), caption_views
        augmentation = self.job.augmentation
        with clock.stage("augment"):
            caption_sizes = caption_input_sizes({"captioners": [c.card.to_dict() for c in self.captioners]})
            rendered = [
                render_model_inputs(
                    views_to_device(image, self.device, pin), params, caption_sizes, augmentation, on_device=True
                )
                for image, params in zip(batch.originals, batch.view_params or [])
            ]
            caption_views = {size: torch.stack([r[1][size] for r in rendered]) for size in caption_sizes}
            return torch.stack([r[0] for r in rendered]), caption_views

    def _caption(self, keys: list[str], caption_views: dict[int, torch.Tensor]) -> dict[str, list[list[str]]]:
        captions: dict[str, list[list[str]]] = {}
        for config, captioner in zip(self.job.captioners, self.captioners):
            images = caption_views[captioner.card.input_size]
            seeds = caption_seeds(self.job.seed, config.id, keys, config.num_captions)
            rows: list[list[str]] = []
            for part in _chunks(len(keys), config.batch_size):
                rows += captioner.caption(images[part], seeds[part], config.sampler, config.postprocess)
            captions[config.id] = rows
        return captions

    def _embed(
        self, inputs: Iterable[tuple[torch.Tensor, list[list[str]]]]
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Stored embeddings by teacher id of each teacher's (views, texts), given in teacher order."""
        image_emb: dict[str, np.ndarray] = {}
        text_emb: dict[str, np.ndarray] = {}
        teachers = zip(self.job.teachers, self.batch_sizes, self.teachers)
        for (config, batch_size, teacher), (views, texts) in zip(teachers, inputs):
            image, text = self.embed_with(batch_size, teacher, views, texts)
            if image is not None:
                image_emb[config.id] = image
            if text is not None:
                text_emb[config.id] = text
        return image_emb, text_emb

    def embed_with(
        self, batch_size: int, teacher: Teacher, views: torch.Tensor, texts: list[list[str]]
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """One teacher's stored embeddings of views [N, K, 3, S, S] -> [N, K, D] and of N equally
        long rows of texts -> [N, rows, D]; None for a side it does not have or has nothing to embed."""
        dtype = transfer_dtype(self.job.output.embedding_dtype)
        image = text = None
        if teacher.card.has_image and views.shape[1]:
            n, k = views.shape[:2]
            flat_views = views.reshape(n * k, *views.shape[2:])
            image = _encode_in_chunks(teacher.encode_image, flat_views, batch_size, dtype).reshape(n, k, -1)
        if teacher.card.has_text and texts[0]:
            flat_texts = [t for row in texts for t in row]
            encoded = _encode_in_chunks(teacher.encode_text, flat_texts, batch_size, dtype)
            text = encoded.reshape(len(texts), len(texts[0]), -1)
        return image, text


def _encode_in_chunks(encode: Any, items: Any, batch_size: int, dtype: str) -> np.ndarray:
    return to_storage(torch.cat([encode(items[part]) for part in _chunks(len(items), batch_size)]), dtype)


def to_storage(embeddings: torch.Tensor, embedding_dtype: str) -> np.ndarray:
    """Float embeddings -> the numpy array stored for a float `embedding_dtype` (bfloat16 as raw uint16 bits)."""
    if embedding_dtype == "bfloat16":
        return embeddings.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return embeddings.to(getattr(torch, embedding_dtype)).cpu().numpy()
