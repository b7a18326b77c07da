"""What every teacher and captioner adapter provides, and the input handling they share.

A card travels into the dataset manifest: it must say everything a trainer needs to
use the stored embeddings and captions without guessing (which weights, which input
size and normalisation, how views of another size were resized, which tokenizer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from dr_pipeline.core.accelerator import Acceleration
from dr_pipeline.core.config import CaptionPostprocessConfig, SamplerConfig
from dr_pipeline.core.records import VIEW_RESIZE, CaptionerCard, TeacherCard
from dr_pipeline.core.seeding import derive_seed
from teachers.sampling import postprocess_caption

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Teacher(Protocol):
    card: TeacherCard

    def encode_image(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, S, S] views -> float32 [N, D] on the CPU, as the model emits them."""
        ...

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """N texts (truncated to the context by the tokenizer) -> float32 [N, D] on the CPU."""
        ...


class Captioner(Protocol):
    card: CaptionerCard

    def caption(
        self,
        images: torch.Tensor,
        seeds: list[list[int]],
        sampler: SamplerConfig,
        postprocess: CaptionPostprocessConfig,
    ) -> list[list[str]]:
        """uint8 [N, 3, s, s] images (resized to card.input_size when s differs); seeds[i][j]
        seeds caption j of image i. Returns, per image, one caption per seed."""
        ...


@contextlib.contextmanager
def seeded_init(rest: str) -> Iterator[int]:
    """Build a model with random weights that are the same in every process.

    Several actors and a later `verify` must agree on a random-init model, so its
    initialisation is seeded from the spec (REST after `KIND:`); the RNG is forked so
    building a model never moves the caller's random state. Yields the seed, which
    cards record as weights="random-init:<seed>".
    """
    seed = derive_seed(0, rest, "random-init", 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield seed


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a model actually runs at: reduced precision only on CUDA, where it pays."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device.type != "cuda":
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def precision_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision with fp32 weights, so one loaded model serves every precision."""
    dtype = _AUTOCAST_DTYPES.get(precision)
    if device.type == "cuda" and dtype is not None:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def pixels_for_model(
    images: torch.Tensor,
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    device: torch.device,
) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> normalised float32 [N, 3, size, size] on `device`.

    All teachers see the same rendered views; one whose input size differs gets them
    resized here (VIEW_RESIZE), never re-rendered, so every teacher embeds the same crop.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [N, 3, S, S], got {images.dtype} {list(images.shape)}")
    pixels = images.to(device, non_blocking=True).float()
    if pixels.shape[-2:] != (size, size):
        pixels = F.interpolate(pixels, size=(size, size), mode=VIEW_RESIZE, antialias=True, align_corners=False)
        pixels = pixels.clamp_(0, 255)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return (pixels / 255 - mean_t) / std_t


class TwoTowerTeacher:
    """What the built-in teacher adapters share: the model on its device with its tokenizer,
    card and precision, and its two tower methods (IMAGE_METHOD, TEXT_METHOD), which
    `accelerate` turns channels-last / compiled."""

    IMAGE_METHOD: str
    TEXT_METHOD: str

    def __init__(self, model: torch.nn.Module, tokenizer: Any, card: TeacherCard, device: torch.device, precision: str):
        self.model = model.to(device)
        self.tokenizer = tokenizer
        self.card = card
        self.device = device
        self.precision = precision
        self.acceleration = Acceleration()
        self._image_tower = getattr(self.model, self.IMAGE_METHOD)
        self._text_tower = getattr(self.model, self.TEXT_METHOD)

    def accelerate(self, acceleration: Acceleration) -> None:
        acceleration.prepare(self.model)
        self.acceleration = acceleration
        self._image_tower = acceleration.compiled(getattr(self.model, self.IMAGE_METHOD))
        self._text_tower = acceleration.compiled(getattr(self.model, self.TEXT_METHOD))


DECODINGS = ("kv-cache", "full-recompute")


class SeededCaptioner:
    """What the built-in captioners share: captions from the token ids of `generate` (given by
    each adapter), and the checks every generate makes of its arguments."""

    card: CaptionerCard
    tokenizer: Any

    def generate(
        self, images: torch.Tensor, seeds: list[list[int]], sampler: SamplerConfig, decoding: str | None = None
    ) -> list[list[list[int]]]:
        """Sampled token ids per image and seed, stop token included."""
        raise NotImplementedError

    def special_tokens(self) -> set[int]:
        raise NotImplementedError

    def caption_tokens(self, generated: list[int]) -> list[int]:
        """The ids postprocess_caption sees for one generated row (open_clip puts the start token back)."""
        return generated

    def caption(
        self,
        images: torch.Tensor,
        seeds: list[list[int]],
        sampler: SamplerConfig,
        postprocess: CaptionPostprocessConfig,
    ) -> list[list[str]]:
        special = self.special_tokens()
        return [
            [postprocess_caption(self.caption_tokens(row), self.tokenizer.decode, special, postprocess) for row in rows]
            for rows in self.generate(images, seeds, sampler)
        ]

    def checked_decoding(self, images: torch.Tensor, seeds: list[list[int]], decoding: str | None) -> str:
        """The decoding to use (the card's unless given); ValueError for a bad argument."""
        decoding = decoding or self.card.decoding
        if decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
        if len(seeds) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but seeds for {len(seeds)}")
        return decoding
