"""The `open_clip:` kind's builders: any open_clip model as a teacher, open_clip CoCa models as
captioners (its spec checks and costs, which need no open_clip import, are in open_clip_spec.py).

Spec forms (REST after `open_clip:`):
  MODEL/TAG                 pretrained tag from open_clip.list_pretrained()
  hf-hub:ORG/NAME           open_clip model on the Hugging Face hub (config and weights)
  MODEL@/path/w.pt          local checkpoint, loaded with torch.load(weights_only=True)
  MODEL@hf-hub:ORG/NAME     checkpoint file of a hub repository (e.g. the MobileCLIP2 CoCa
                            captioners, released as plain open_clip weights); see weights.py
  MODEL@s3://bucket/w.pt    checkpoint at any fsspec URL
  MODEL                     random init, identical in every process (tests, CPU quickstart)

The tiny configs in model_configs/ are registered with open_clip on import.
"""

from __future__ import annotations

import logging

import open_clip
import torch
from open_clip.transformer import MultimodalTransformer
from torch import nn

from dr_pipeline.core.config import CaptionerConfig, SamplerConfig, TeacherConfig
from dr_pipeline.core.errors import ConfigError, error_line
from dr_pipeline.core.records import VIEW_RESIZE, CaptionerCard, TeacherCard
from teachers.base import (
    SeededCaptioner,
    TwoTowerTeacher,
    precision_context,
    pixels_for_model,
    resolve_precision,
    seeded_init,
)
from teachers.coca_decoding import FullRecomputeStepper, KVCacheStepper, kv_cache_unsupported
from teachers.open_clip_spec import NOT_GENERATIVE, OUR_MODEL_CONFIGS, OpenClipSpec
from teachers.sampling import sample_tokens
from teachers.weights import QUOTED_ERROR_CHARS, describe_weights, local_weights

KIND = "open_clip"

open_clip.add_model_config(OUR_MODEL_CONFIGS)

log = logging.getLogger(__name__)


def _initialise_decoder_projection(model: nn.Module) -> None:
    """open_clip 3.x leaves CoCa's MultimodalTransformer.text_projection as torch.empty (its
    init_parameters is never called): a random-init CoCa would decode from whatever that
    memory held, different in every process. Initialise it as that method intends."""
    decoder = getattr(model, "text_decoder", None)
    if isinstance(decoder, MultimodalTransformer):
        nn.init.normal_(decoder.text_projection, std=decoder.width**-0.5)


def load_model(spec_text: str, rest: str) -> tuple[nn.Module, str]:
    """The model in eval mode on the CPU, and its `weights` card entry.

    Runs under a forked RNG so building a model never moves the caller's random state;
    a random init is seeded from the spec so every process builds the same weights.
    """
    spec = OpenClipSpec.parse(rest)
    try:
        pretrained = spec.tag or (local_weights(spec.path) if spec.path else None)
    except ConfigError as error:
        raise ConfigError(f"spec {spec_text!r}: {error}") from error
    with seeded_init(rest) as seed:
        try:
            model = open_clip.create_model(spec.model, pretrained=pretrained, device="cpu", weights_only=True)
        except Exception as error:  # open_clip reports bad weights with many types, asserts included
            raise ConfigError(f"spec {spec_text!r}: cannot load the open_clip model ({error_line(error, limit=QUOTED_ERROR_CHARS)})") from error
        if spec.random_init:
            _initialise_decoder_projection(model)
    if spec.random_init:
        weights = f"random-init:{seed}"
    else:
        weights = describe_weights(spec.path) if spec.path else spec.tag or spec.model
    return model.eval(), weights


def _image_preprocess(model: nn.Module, spec_text: str) -> dict:
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"]
    height, width = (size, size) if isinstance(size, int) else size
    if height != width:
        raise ConfigError(f"spec {spec_text!r}: non-square input size {height}x{width} is not supported")
    return {
        "input_size": int(height),
        "mean": tuple(float(value) for value in cfg["mean"]),
        "std": tuple(float(value) for value in cfg["std"]),
        "interpolation": cfg.get("interpolation"),
    }


def _tokenizer_name(tokenizer) -> str:
    name = f"open_clip.{type(tokenizer).__name__}"
    source = getattr(getattr(tokenizer, "tokenizer", None), "name_or_path", None)
    return f"{name}({source})" if source else name


class OpenClipTeacher(TwoTowerTeacher):
    """Embeds views and texts with open_clip's encode_image / encode_text (normalised)."""

    IMAGE_METHOD = "encode_image"
    TEXT_METHOD = "encode_text"

    @torch.inference_mode()
    def encode_image(self, views: torch.Tensor) -> torch.Tensor:
        if len(views) == 0:  # open_clip's ViT cannot reshape an empty batch
            return torch.empty(0, self.card.embedding_dim)
        pixels = pixels_for_model(views, self.card.input_size, self.card.mean, self.card.std, self.device)
        with precision_context(self.device, self.precision):
            embeddings = self._image_tower(pixels.contiguous(memory_format=self.acceleration.memory_format),
                                            normalize=True)
        return embeddings.float().cpu()

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        with precision_context(self.device, self.precision):
            embeddings = self._text_tower(tokens, normalize=True)
        return embeddings.float().cpu()


def _embedding_dim(model: nn.Module, tokenizer) -> int:
    """Read from one text forward: open_clip exposes no uniform attribute across its towers."""
    with torch.inference_mode():
        return int(model.encode_text(tokenizer([""])).shape[-1])


def build_open_clip_teacher(rest: str, config: TeacherConfig, device: torch.device, precision: str) -> OpenClipTeacher:
    model, weights = load_model(config.spec, rest)
    model_name = OpenClipSpec.parse(rest).model
    tokenizer = open_clip.get_tokenizer(model_name)
    logit_bias = getattr(model, "logit_bias", None)
    card = TeacherCard(
        id=config.id,
        spec=config.spec,
        kind=KIND,
        model=model_name,
        weights=weights,
        embedding_dim=_embedding_dim(model, tokenizer),
        **_image_preprocess(model, config.spec),
        view_resize=VIEW_RESIZE,
        context_length=tokenizer.context_length,
        tokenizer=_tokenizer_name(tokenizer),
        logit_scale=float(model.logit_scale.exp().item()),
        logit_bias=float(logit_bias.item()) if logit_bias is not None else None,
    )
    return OpenClipTeacher(model, tokenizer, card, device, resolve_precision(precision, device))


class OpenClipCaptioner(SeededCaptioner):
    """Samples captions from an open_clip CoCa with our own decoding loop (see coca_decoding)."""

    def __init__(self, model: nn.Module, tokenizer, card: CaptionerCard, device: torch.device, precision: str):
        self.model = model.to(device)
        self.tokenizer = tokenizer
        self.card = card
        self.device = device
        self.precision = precision
        self.start_token = tokenizer.sot_token_id
        # open_clip treats sampling the pad id like the end of text.
        self.stop_tokens = (tokenizer.eot_token_id, model.pad_id)

    def special_tokens(self) -> set[int]:
        return {self.start_token, *self.stop_tokens}

    def caption_tokens(self, generated: list[int]) -> list[int]:
        return [self.start_token, *generated]

    @torch.inference_mode()
    def generate(
        self, images: torch.Tensor, seeds: list[list[int]], sampler: SamplerConfig, decoding: str | None = None
    ) -> list[list[list[int]]]:
        """Sampled token ids per image and seed (stop token included, start token not)."""
        decoding = self.checked_decoding(images, seeds, decoding)
        if not any(seeds):
            return [[] for _ in seeds]
        if sampler.max_length > self.card.context_length:
            raise ConfigError(
                f"captioner spec {self.card.spec!r}: sampler max_length {sampler.max_length} "
                f"exceeds the context length {self.card.context_length}"
            )
        pixels = pixels_for_model(images, self.card.input_size, self.card.mean, self.card.std, self.device)
        counts = torch.tensor([len(image_seeds) for image_seeds in seeds], device=self.device)
        row_image = torch.repeat_interleave(torch.arange(len(seeds), device=self.device), counts)
        with precision_context(self.device, self.precision):
            _, image_embs = self.model._encode_image(pixels)
            if decoding == "kv-cache":
                stepper = KVCacheStepper(self.model, image_embs, row_image, capacity=sampler.max_length)
            else:
                stepper = FullRecomputeStepper(self.model, image_embs, row_image)
            flat_seeds = [seed for image_seeds in seeds for seed in image_seeds]
            rows = iter(sample_tokens(stepper, flat_seeds, sampler, self.start_token, self.stop_tokens, self.device))
        return [[next(rows) for _ in image_seeds] for image_seeds in seeds]


def build_open_clip_captioner(
    rest: str, config: CaptionerConfig, device: torch.device, precision: str
) -> OpenClipCaptioner:
    model, weights = load_model(config.spec, rest)
    if not isinstance(model, open_clip.CoCa):
        raise ConfigError(f"captioner spec {config.spec!r}: " + NOT_GENERATIVE.format(rest))
    model_name = OpenClipSpec.parse(rest).model
    tokenizer = open_clip.get_tokenizer(model_name)
    if not isinstance(tokenizer, open_clip.SimpleTokenizer):
        raise ConfigError(f"captioner spec {config.spec!r}: captioning needs a CoCa with open_clip's CLIP tokenizer")
    unsupported = kv_cache_unsupported(model)
    if unsupported:
        log.warning("%s: decoding without a KV cache because %s", config.spec, unsupported)
    card = CaptionerCard(
        id=config.id,
        spec=config.spec,
        kind=KIND,
        model=model_name,
        weights=weights,
        **_image_preprocess(model, config.spec),
        context_length=tokenizer.context_length,
        tokenizer=_tokenizer_name(tokenizer),
        decoding="full-recompute" if unsupported else "kv-cache",
    )
    return OpenClipCaptioner(model, tokenizer, card, device, resolve_precision(precision, device))
