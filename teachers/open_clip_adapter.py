"""The `open_clip:` kind: any open_clip model as a teacher, open_clip CoCa models as captioners.

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

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.transformer import MultimodalTransformer
from torch import nn

from dr_pipeline.core.config import CaptionerConfig, SamplerConfig, TeacherConfig
from dr_pipeline.core.errors import ConfigError, error_line
from dr_pipeline.core.records import VIEW_RESIZE, CaptionerCard, TeacherCard
from teachers.base import (
    QUOTED_ERROR_CHARS,
    SeededCaptioner,
    TwoTowerTeacher,
    precision_context,
    pixels_for_model,
    resolve_precision,
    seeded_init,
)
from teachers.coca_decoding import FullRecomputeStepper, KVCacheStepper, kv_cache_unsupported
from teachers.flops import DecoderShape, ModelCost, attentional_pool_flops, text_flops, vit_flops
from teachers.registry import Role, TeacherKind, register_kind
from teachers.sampling import sample_tokens
from teachers.weights import HF_HUB, HUB_ID, describe_weights, local_weights, weights_problem

KIND = "open_clip"

open_clip.add_model_config(Path(__file__).parent / "model_configs")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenClipSpec:
    """REST of an `open_clip:` spec, split into what open_clip.create_model takes."""

    model: str  # open_clip model name, or "hf-hub:ORG/NAME"
    tag: str | None = None
    path: str | None = None  # a weights reference (teachers/weights.py)

    @classmethod
    def parse(cls, rest: str) -> "OpenClipSpec":
        if rest.startswith(HF_HUB):
            return cls(rest)
        if "@" in rest:
            model, _, path = rest.partition("@")
            return cls(model, path=path)
        model, slash, tag = rest.partition("/")
        return cls(model, tag=tag if slash else None)

    @property
    def hub_id(self) -> str | None:
        return self.model[len(HF_HUB) :] if self.model.startswith(HF_HUB) else None

    @property
    def random_init(self) -> bool:
        return self.hub_id is None and self.tag is None and self.path is None


def _registry_model_of_hub_id(hub_id: str) -> str | None:
    """The architecture of a hub id that open_clip's pretrained list knows, without the network."""
    for model, tag in open_clip.list_pretrained():
        if open_clip.get_pretrained_cfg(model, tag).get("hf_hub", "").rstrip("/") == hub_id:
            return model
    return None


def _is_generative(model_name: str) -> bool:
    return "multimodal_cfg" in (open_clip.get_model_config(model_name) or {})


_NOT_GENERATIVE = "{} has no text decoder; a captioner needs an open_clip CoCa model (e.g. coca_ViT-L-14)"


def spec_problem(rest: str, role: Role) -> str | None:
    """What is wrong with an `open_clip:` spec, checked offline; None when it looks usable."""
    if not rest:
        return "missing model name, e.g. open_clip:ViT-B-32/openai"
    spec = OpenClipSpec.parse(rest)
    if spec.hub_id is not None:
        if not HUB_ID.fullmatch(spec.hub_id):
            return f"hf-hub id must be ORG/NAME, got {spec.hub_id!r}"
        known = _registry_model_of_hub_id(spec.hub_id)
        if role == "captioner" and known is not None and not _is_generative(known):
            return _NOT_GENERATIVE.format(spec.hub_id)
        return None
    if spec.model not in open_clip.list_models():
        close = difflib.get_close_matches(spec.model, open_clip.list_models(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else " (see open_clip.list_models())"
        return f"unknown open_clip model {spec.model!r}{hint}"
    if spec.tag is not None and not open_clip.is_pretrained_cfg(spec.model, spec.tag):
        tags = open_clip.list_pretrained_tags_by_model(spec.model)
        known = ", ".join(tags[:6]) + (f" and {len(tags) - 6} more" if len(tags) > 6 else "")
        return f"unknown pretrained tag {spec.tag!r} for {spec.model} (known: {known or 'none'})"
    if spec.path is not None and (problem := weights_problem(spec.path)):
        return problem
    if role == "captioner" and not _is_generative(spec.model):
        return _NOT_GENERATIVE.format(spec.model)
    return None


def estimate_cost(rest: str, role: Role) -> ModelCost | None:
    """Per-item forward FLOPs from the model's open_clip config (no weights read; see teachers/flops.py).

    ViT towers and open_clip text towers are covered; a timm or Hugging Face tower
    gets None for its FLOPs. An hf-hub spec is covered when open_clip's pretrained
    list names its architecture.
    """
    spec = OpenClipSpec.parse(rest)
    model = _registry_model_of_hub_id(spec.hub_id) if spec.hub_id is not None else spec.model
    config = open_clip.get_model_config(model) if model else None
    if not config:
        return None
    embed_dim = config["embed_dim"]
    vision, text = config["vision_cfg"], config["text_cfg"]
    image = described = None
    if "timm_model_name" not in vision and isinstance(vision.get("layers"), int):
        size = vision.get("image_size", 224)
        size = size if isinstance(size, int) else size[0]
        patch, width = vision["patch_size"], vision["width"]
        image = vit_flops(size, patch, width, vision["layers"], embed_dim, vision.get("mlp_ratio", 4.0))
        if vision.get("attentional_pool"):
            tokens = (size // patch) ** 2 + 1
            image += attentional_pool_flops(tokens, width, vision.get("attn_pooler_queries", 256), embed_dim)
        described = f"ViT {size}px/{patch} width {width} x {vision['layers']} layers"
    text_cost = None
    if "hf_model_name" not in text:
        tokens = text["context_length"] + (1 if text.get("embed_cls") else 0)  # CoCa appends a CLS token
        text_cost = text_flops(tokens, text["width"], text["layers"], embed_dim,
                               text.get("mlp_ratio", 4.0))
    decoder = None
    multimodal = config.get("multimodal_cfg")
    if multimodal and role == "captioner":
        decoder = DecoderShape(
            text_width=text["width"],
            text_layers=text["layers"],
            decoder_width=multimodal["width"],
            decoder_layers=multimodal["layers"],
            vocab_size=multimodal.get("vocab_size", text["vocab_size"]),
            image_tokens=vision.get("attn_pooler_queries", 256) - 1,  # the first pooled token is the embedding
            mlp_ratio=multimodal.get("mlp_ratio", 4.0),
        )
    architecture = ", ".join(filter(None, [
        model, described or "image tower not covered",
        f"text width {text['width']} x {text['layers']} layers, context {text['context_length']}",
    ]))
    return ModelCost(embed_dim, image, text_cost, decoder, architecture)


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
        raise ConfigError(f"captioner spec {config.spec!r}: " + _NOT_GENERATIVE.format(rest))
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


register_kind(
    TeacherKind(
        name=KIND,
        description="open_clip models by pretrained tag (MODEL/TAG), hub repository (hf-hub:ORG/NAME), checkpoint "
        "file (MODEL@/path, MODEL@hf-hub:ORG/NAME[/FILE], MODEL@s3://...) or seeded random init (MODEL); "
        "CoCa models can also caption",
        example="open_clip:ViT-L-14/datacomp_xl_s13b_b90k",
        captioner_example="open_clip:coca_ViT-L-14@hf-hub:apple/mobileclip2_coca_dfn2b_s13b_mscoco38k_s12m_context77",
        spec_problem=spec_problem,
        build_teacher=build_open_clip_teacher,
        build_captioner=build_open_clip_captioner,
        estimate_cost=estimate_cost,
        options={},
    )
)
