"""The CPU stage: read a shard, decode each image once, validate, sample the K
augmentation parameters and render the views the teachers will see.

It runs in CPU workers, never in a model actor, so accelerators only ever
receive ready uint8 views. Every input sample leaves this stage either as a
PreparedSample or as a failure record with its key and reason.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from dr_pipeline.views.augment import center_view_params, render_views, render_views_tensor, sample_views
from dr_pipeline.core.config import AugmentationConfig, JobConfig
from dr_pipeline.core.records import FailureRecord, ModelCards, ViewParams
from dr_pipeline.views.decode import ImageRejected, decode_image
from dr_pipeline.sources.records import InputFailure, RawSample
from dr_pipeline.sources.shards import iter_shard
from dr_pipeline.core.schema import safe_key, sample_uid
from dr_pipeline.core.timing import StageClock


@dataclass
class PreparedSample:
    """One valid sample: its metadata and view parameters (the pixels travel in ViewBatch)."""

    key: str
    source_key: str
    uid: str  # schema.sample_uid
    url: str | None
    text: str
    image: bytes | None
    image_format: str
    height: int
    width: int
    image_sha256: str
    views: list[ViewParams]


@dataclass
class ViewBatch:
    """What a model actor receives: rendered views (or, when the actor renders them, the
    decoded originals and their view parameters) and the texts to embed."""

    keys: list[str]
    texts: list[str]
    views: np.ndarray | None  # uint8 [N, K, 3, S, S]; None when the actor renders the views
    caption_views: dict[int, np.ndarray]  # captioner input size -> uint8 [N, 3, s, s]
    # decoded images uint8 [C, H, W] and their view parameters, when the actor renders the views
    originals: list[np.ndarray] | None = field(default=None, kw_only=True)
    view_params: list[list[ViewParams]] | None = field(default=None, kw_only=True)

    def __len__(self) -> int:
        return len(self.keys)

    def rows(self, indices: list[int]) -> "ViewBatch":
        """The batch of only these rows, in this order, in either render mode (rendered views,
        or the originals and their parameters for the actor to render)."""
        return ViewBatch(
            keys=[self.keys[i] for i in indices],
            texts=[self.texts[i] for i in indices],
            views=None if self.views is None else self.views[indices],
            caption_views={size: views[indices] for size, views in self.caption_views.items()},
            originals=None if self.originals is None else [self.originals[i] for i in indices],
            view_params=None if self.view_params is None else [self.view_params[i] for i in indices],
        )


def caption_input_sizes(cards: ModelCards) -> tuple[int, ...]:
    """The input sizes centre views are rendered at, one per distinct captioner input size."""
    return tuple(sorted({c["input_size"] for c in cards["captioners"]}))


def render_model_inputs(
    pixels: torch.Tensor,
    params: list[ViewParams],
    caption_sizes: tuple[int, ...],
    cfg: AugmentationConfig,
    on_device: bool = False,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One decoded image rendered for the models: a teacher view per params, and the unaugmented
    centre view at each captioner input size. By the reference PIL renderer on the CPU, or with
    `on_device` by the tensor renderer on the image's device (augment.py)."""
    render = render_views_tensor if on_device else render_views
    views = render(pixels, params, cfg.random_resized_crop.size, cfg)
    center = center_view_params(int(pixels.shape[1]), int(pixels.shape[2]))
    return views, {size: render(pixels, [center], size, cfg)[0] for size in caption_sizes}


@dataclass
class PreparedBatch:
    samples: list[PreparedSample] = field(default_factory=list)
    failures: list[FailureRecord] = field(default_factory=list)
    views: list[torch.Tensor] = field(default_factory=list)
    caption_views: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    render_on_model: bool = False  # keep the originals and parameters for the model actor to render
    originals: list[torch.Tensor] = field(default_factory=list)
    view_params: list[list[ViewParams]] = field(default_factory=list)

    def add_views(
        self, pixels: torch.Tensor, params: list[ViewParams], caption_sizes: tuple[int, ...], cfg: AugmentationConfig
    ) -> None:
        """Render one decoded image for the models (render_model_inputs), or keep it for the actor."""
        if self.render_on_model:
            self.originals.append(pixels)
            self.view_params.append(params)
            return
        views, caption_views = render_model_inputs(pixels, params, caption_sizes, cfg)
        self.views.append(views)
        for size, view in caption_views.items():
            self.caption_views.setdefault(size, []).append(view)

    def stacked_views(self) -> dict[str, Any]:
        """The rendered views (or the originals and parameters) as ViewBatch fields."""
        if self.render_on_model:
            originals = [image.numpy() for image in self.originals]
            return {"views": None, "caption_views": {}, "originals": originals, "view_params": self.view_params}
        return {
            "views": torch.stack(self.views).numpy(),
            "caption_views": {size: torch.stack(v).numpy() for size, v in self.caption_views.items()},
        }

    def view_batch(self) -> ViewBatch | None:
        if not self.samples:
            return None
        keys, texts = [s.key for s in self.samples], [s.text for s in self.samples]
        return ViewBatch(keys=keys, texts=texts, **self.stacked_views())


def failure_record(key: str, reason: str, detail: str) -> FailureRecord:
    return {"key": key, "reason": reason, "detail": detail}


def _metadata_problem(raw: RawSample, key: str, seen: set[str]) -> tuple[str, str] | None:
    """(reason, detail) when the sample cannot be used whatever its pixels, else None."""
    if key in seen:
        return "duplicate_key", f"key {raw.source_key!r} appears earlier in this shard"
    if raw.image is None:
        return raw.image_problem or ("missing_image", "no image (jpg, jpeg, png or webp member / image column)")
    if raw.text is None:
        return "missing_text", "no caption (txt member, json caption or text column)"
    if not raw.text.strip():
        return "empty_text", "the caption is empty or whitespace"
    return None


def prepare_unit(
    shard_url: str, job: JobConfig, caption_sizes: tuple[int, ...], clock: StageClock | None = None
) -> Iterator[PreparedBatch]:
    """Batches of at most resources.batch_size valid samples, with the failures met on the way.
    With resources.render_views_on "accelerator", the views are left to the model actor."""
    clock = clock or StageClock()
    cfg = job.augmentation
    seen: set[str] = set()
    render_on_model = job.resources.render_views_on == "accelerator"
    batch = PreparedBatch(render_on_model=render_on_model)
    for item in clock.timed("read", iter_shard(shard_url, job.input)):
        if isinstance(item, InputFailure):
            batch.failures.append(failure_record(item.key, item.reason, item.detail))
            continue
        key = safe_key(item.source_key)
        problem = _metadata_problem(item, key, seen)
        seen.add(key)
        if problem:
            batch.failures.append(failure_record(item.source_key, *problem))
            continue
        try:
            with clock.stage("decode"):
                pixels = decode_image(item.image, job.input.max_image_pixels)
        except ImageRejected as rejected:
            batch.failures.append(failure_record(item.source_key, rejected.reason, rejected.detail))
            continue
        height, width = int(pixels.shape[1]), int(pixels.shape[2])
        image_sha256 = hashlib.sha256(item.image).hexdigest()
        with clock.stage("augment"):
            params = sample_views(job.seed, key, height, width, cfg)
            batch.add_views(pixels, params, caption_sizes, cfg)
        batch.samples.append(
            PreparedSample(
                key=key,
                source_key=item.source_key,
                uid=sample_uid(item.uid, item.source_key, image_sha256),
                url=item.url,
                text=item.text,
                image=item.image if job.output.keep_images else None,
                image_format=item.image_format or "unknown",
                height=height,
                width=width,
                image_sha256=image_sha256,
                views=params,
            )
        )
        if len(batch.samples) >= job.resources.batch_size:
            yield batch
            batch = PreparedBatch(render_on_model=render_on_model)
    if batch.samples or batch.failures:
        yield batch
