"""The `hf:` kind: transformers models as teachers and captioners.

  hf:ORG/NAME          a model on the Hugging Face hub
  hf:/path/to/folder   a local folder (save_pretrained); a folder with a config and no weight
                       files builds the architecture with seeded random weights, identical in
                       every process (tests, demos)

Teachers: any model with `get_image_features` and `get_text_features` (CLIP, SigLIP, ...),
loaded with AutoModel. Views are resized and normalised as the image processor's config says
(`pixels_for_model`, like every other teacher); texts are tokenised to the model's context
with max-length padding, which SigLIP-style models need and CLIP-style models ignore.

Captioners: any model whose `generate` takes pixel values (BLIP, GIT, VisionEncoderDecoder,
image-text-to-text models such as LLaVA, with `options: {prompt: ...}`), loaded with
AutoModelForImageTextToText and fed by its own processor. `generate` decodes with the model's
own KV cache; the tokens are chosen by our seeded per-row sampler (teachers/sampling.py)
through `SeededSampling`, so captions reproduce whatever the batch.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    BlipForConditionalGeneration,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    ProcessorMixin,
)

from dr_pipeline.core.config import CaptionerConfig, SamplerConfig, TeacherConfig
from dr_pipeline.core.errors import ConfigError, error_line
from dr_pipeline.core.records import VIEW_RESIZE, CaptionerCard, TeacherCard
from teachers.base import (
    SeededCaptioner,
    TwoTowerTeacher,
    pixels_for_model,
    precision_context,
    resolve_precision,
    seeded_init,
)
from teachers.sampling import RowNoise, choose_tokens
from teachers.weights import QUOTED_ERROR_CHARS

KIND = "hf"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _is_random_init(rest: str) -> bool:
    """A local folder holding a config but no weight files."""
    return os.path.isdir(rest) and not any(path.suffix in _WEIGHT_SUFFIXES for path in Path(rest).iterdir())


def load_model(spec_text: str, rest: str, auto_class) -> tuple[torch.nn.Module, str]:
    """The model in eval mode on the CPU in float32 (precision is autocast), and its card's `weights`."""
    try:
        if _is_random_init(rest):
            config = AutoConfig.from_pretrained(rest)
            with seeded_init(rest) as seed:
                model = auto_class.from_config(config, dtype=torch.float32)
            weights = f"random-init:{seed}"
        else:
            model = auto_class.from_pretrained(rest, dtype=torch.float32)
            weights = rest
    except Exception as error:  # hub, file, config and architecture errors all mean "cannot load"
        raise ConfigError(f"spec {spec_text!r}: cannot load the transformers model ({error_line(error, limit=QUOTED_ERROR_CHARS)})") from error
    return model.eval(), weights


def load_processors(spec_text: str, rest: str):
    """(image processor, tokenizer, joint processor or None) of a model folder or hub id."""
    try:
        processor = AutoProcessor.from_pretrained(rest)
        if isinstance(processor, ProcessorMixin) and hasattr(processor, "image_processor"):
            return processor.image_processor, processor.tokenizer, processor
        return AutoImageProcessor.from_pretrained(rest), AutoTokenizer.from_pretrained(rest), None
    except Exception as error:
        raise ConfigError(f"spec {spec_text!r}: cannot load the model's processor ({error_line(error, limit=QUOTED_ERROR_CHARS)})") from error


def image_preprocess(image_processor, spec_text: str) -> dict:
    """Input size, mean/std and interpolation of a fixed-square-input image processor."""
    size = image_processor.crop_size if getattr(image_processor, "do_center_crop", False) else image_processor.size
    side = size.shortest_edge if size.height is None else size.height
    if side is None or (size.width is not None and size.width != size.height):
        raise ConfigError(f"spec {spec_text!r}: needs a square input size, the image processor has {size}")
    if not image_processor.do_rescale or abs(image_processor.rescale_factor - 1 / 255) > 1e-9:
        raise ConfigError(f"spec {spec_text!r}: needs pixels rescaled by 1/255 (the image processor does otherwise)")
    normalize = image_processor.do_normalize
    resample = getattr(image_processor, "resample", None)
    return {
        "input_size": int(side),
        "mean": tuple(float(v) for v in image_processor.image_mean) if normalize else (0.0, 0.0, 0.0),
        "std": tuple(float(v) for v in image_processor.image_std) if normalize else (1.0, 1.0, 1.0),
        "interpolation": _PIL_RESAMPLE.get(resample, None if resample is None else str(resample)),
    }


def _tokenizer_name(tokenizer) -> str:
    return f"transformers.{type(tokenizer).__name__}({tokenizer.name_or_path})"


def _features(output) -> torch.Tensor:
    """transformers 5 returns get_*_features as a model output whose pooler_output is the embedding."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class HfTeacher(TwoTowerTeacher):
    """L2-normalised get_image_features / get_text_features of a transformers model."""

    IMAGE_METHOD = "get_image_features"
    TEXT_METHOD = "get_text_features"

    @torch.inference_mode()
    def encode_image(self, views: torch.Tensor) -> torch.Tensor:
        pixels = pixels_for_model(views, self.card.input_size, self.card.mean, self.card.std, self.device)
        pixels = pixels.contiguous(memory_format=self.acceleration.memory_format)
        with precision_context(self.device, self.precision):
            embeddings = _features(self._image_tower(pixel_values=pixels))
        return F.normalize(embeddings.float(), dim=-1).cpu()

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Padded to the context: SigLIP-style models are trained on max-length padding."""
        encoded = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.card.context_length, return_tensors="pt"
        )
        return {name: encoded[name].to(self.device) for name in ("input_ids", "attention_mask") if name in encoded}

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        with precision_context(self.device, self.precision):
            embeddings = _features(self._text_tower(**self.tokenize(texts)))
        return F.normalize(embeddings.float(), dim=-1).cpu()


def _context_length(model, tokenizer) -> int:
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return int(min(tokenizer.model_max_length, positions or tokenizer.model_max_length))


def build_hf_teacher(rest: str, config: TeacherConfig, device: torch.device, precision: str) -> HfTeacher:
    model, weights = load_model(config.spec, rest, AutoModel)
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise ConfigError(
            f"teacher spec {config.spec!r}: {type(model).__name__} has no get_image_features / get_text_features"
        )
    image_processor, tokenizer, _ = load_processors(config.spec, rest)
    logit_scale = getattr(model, "logit_scale", None)
    logit_bias = getattr(model, "logit_bias", None)
    card = TeacherCard(
        id=config.id,
        spec=config.spec,
        kind=KIND,
        model=type(model).__name__,
        weights=weights,
        embedding_dim=0,  # read from one forward below
        **image_preprocess(image_processor, config.spec),
        view_resize=VIEW_RESIZE,
        context_length=_context_length(model, tokenizer),
        tokenizer=_tokenizer_name(tokenizer),
        logit_scale=float(logit_scale.exp().item()) if logit_scale is not None else None,
        logit_bias=float(logit_bias.item()) if logit_bias is not None else None,
    )
    teacher = HfTeacher(model, tokenizer, card, device, resolve_precision(precision, device))
    teacher.card = dataclasses.replace(card, embedding_dim=int(teacher.encode_text([""]).shape[-1]))
    return teacher


class SeededSampling(LogitsProcessor):
    """Our sampler inside transformers' `generate`, as its last logits processor.

    Each step every row's token is drawn by `sampling.choose_tokens` from the row's own seeded
    noise, and the scores handed back keep only that token, so generate's greedy choice emits
    it. generate keeps finished rows in the batch (padded); their draws are discarded and never
    touch another row's stream. The minimum length is left to generate's `min_new_tokens`,
    which knows each model's stop tokens (BLIP's generate, for one, substitutes its own).
    """

    def __init__(self, seeds: list[int], sampler: SamplerConfig, device: torch.device):
        self.noise = RowNoise(seeds, device)
        self.sampler = sampler.model_copy(update={"min_length": 0})
        self.no_stops = torch.tensor([], dtype=torch.long, device=device)
        self.prompt_length: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        generated = input_ids.shape[1] - self.prompt_length
        uniforms = self.noise.draw(scores.shape[-1])
        tokens = choose_tokens(scores, input_ids, generated, uniforms, self.sampler, self.no_stops)
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens[:, None], 0.0)


def _stop_token_ids(model) -> set[int]:
    """The ids that end a caption in `generate`: the generation config's end-of-sequence ids,
    except BLIP, whose generate ends captions at its text config's sep token."""
    if isinstance(model, BlipForConditionalGeneration):
        return {model.config.text_config.sep_token_id}
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


_SPECIAL_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def _keep_only_token_ids(model) -> None:
    """Reduce every generation config inside the model to its special token ids.

    generate fills what a call leaves unset from the model's generation config, so a
    checkpoint's generation_config.json (beams, repetition rules, suppressed tokens) would
    reshape the scores before our sampler sees them; without it, the sampler alone decides.
    """
    for module in model.modules():
        config = getattr(module, "generation_config", None)
        if isinstance(config, GenerationConfig):
            module.generation_config = GenerationConfig(
                **{name: getattr(config, name) for name in _SPECIAL_TOKEN_FIELDS if getattr(config, name) is not None}
            )


class HfCaptioner(SeededCaptioner):
    """Captions from a transformers `generate` with the seeded sampler and the model's KV cache."""

    def __init__(self, model, processors, card: CaptionerCard, prompt: str | None, device, precision: str):
        self.model = model.to(device)
        self.image_processor, self.tokenizer, self.processor = processors
        self.card = card
        self.prompt = prompt
        self.device = device
        self.precision = precision
        self.stop_tokens = _stop_token_ids(model)

    def model_inputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The processor's inputs for uint8 [N, 3, s, s] images (and the prompt, if any)."""
        pictures = list(images)
        if self.processor is not None:
            text = [self.prompt] * len(pictures) if self.prompt is not None else None
            inputs = self.processor(images=pictures, text=text, return_tensors="pt")
        else:
            inputs = self.image_processor(pictures, return_tensors="pt")
        return {name: value.to(self.device) for name, value in inputs.items()}

    def special_tokens(self) -> set[int]:
        return set(self.tokenizer.all_special_ids)

    @torch.inference_mode()
    def generate(
        self, images: torch.Tensor, seeds: list[list[int]], sampler: SamplerConfig, decoding: str | None = None
    ) -> list[list[list[int]]]:
        """Sampled token ids per image and seed (stop token included, prompt not); decoding
        "full-recompute" runs generate without its KV cache, the reference the cache must match."""
        decoding = self.checked_decoding(images, seeds, decoding)
        if not any(seeds):
            return [[] for _ in seeds]
        counts = torch.tensor([len(image_seeds) for image_seeds in seeds])
        inputs = {
            name: value.repeat_interleave(counts.to(value.device), dim=0)
            for name, value in self.model_inputs(images).items()
        }
        prompt_length = inputs["input_ids"].shape[1] if "input_ids" in inputs else 1
        if prompt_length + sampler.max_length > self.card.context_length:
            raise ConfigError(
                f"captioner spec {self.card.spec!r}: sampler max_length {sampler.max_length} and a prompt of "
                f"{prompt_length} tokens exceed the context length {self.card.context_length}"
            )
        sampling = SeededSampling([seed for image_seeds in seeds for seed in image_seeds], sampler, self.device)
        generation = GenerationConfig(
            do_sample=False,  # greedy over the scores SeededSampling leaves: the token it drew
            max_new_tokens=sampler.max_length,
            min_new_tokens=sampler.min_length,
            use_cache=decoding == "kv-cache",
        )
        with precision_context(self.device, self.precision):
            sequences = self.model.generate(
                **inputs, generation_config=generation, logits_processor=LogitsProcessorList([sampling])
            )
        rows = iter(self._until_stop(row) for row in sequences[:, sampling.prompt_length :].tolist())
        return [[next(rows) for _ in image_seeds] for image_seeds in seeds]

    def _until_stop(self, tokens: list[int]) -> list[int]:
        """A generated row up to its first stop token (included); generate pads finished rows."""
        for index, token in enumerate(tokens):
            if token in self.stop_tokens:
                return tokens[: index + 1]
        return tokens


def build_hf_captioner(rest: str, config: CaptionerConfig, device: torch.device, precision: str) -> HfCaptioner:
    model, weights = load_model(config.spec, rest, AutoModelForImageTextToText)
    _keep_only_token_ids(model)
    processors = load_processors(config.spec, rest)
    prompt = config.options.get("prompt")
    if prompt is not None and processors[2] is None:
        raise ConfigError(f"captioner spec {config.spec!r}: a prompt needs a model folder with a joint processor")
    card = CaptionerCard(
        id=config.id,
        spec=config.spec,
        kind=KIND,
        model=type(model).__name__,
        weights=weights,
        **image_preprocess(processors[0], config.spec),
        context_length=_context_length(model, processors[1]),
        tokenizer=_tokenizer_name(processors[1]),
        decoding="kv-cache",
    )
    return HfCaptioner(model, processors, card, prompt, device, resolve_precision(precision, device))
