"""The `open_clip:` kind's offline side: parsing a spec, checking it, its cost from the architecture,
all without importing open_clip (which imports torch, torchvision, transformers and timm: seconds
before Ray could start). What open_clip would answer is read from its own files instead:

- model names and configs: the JSON files of open_clip's `model_configs` folder (found with
  importlib.util.find_spec, which does not import the package) and of ours, teachers/model_configs,
  kept as open_clip keeps them (only files with embed_dim, vision_cfg and text_cfg; natural order);
- pretrained tags: open_clip's `pretrained.py` run without its imports (its table is plain Python;
  its imports serve downloads), its own functions then answering.

tests/teachers/test_open_clip_spec.py compares every answer with open_clip's.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from teachers.flops import DecoderShape, ModelCost, attentional_pool_flops, text_flops, vit_flops
from teachers.registry import Role
from teachers.weights import HF_HUB, HUB_ID, weights_problem

OUR_MODEL_CONFIGS = Path(__file__).parent / "model_configs"
"""Tiny configs for tests and the CPU quickstart; open_clip_adapter registers them with open_clip."""


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


def _open_clip_folder() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip is not installed", name="open_clip")
    return Path(spec.submodule_search_locations[0])


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


@functools.cache
def model_configs() -> dict[str, dict]:
    """Model name -> architecture config, as open_clip.list_models / get_model_config have them
    once open_clip_adapter added our folder."""
    configs = {}
    for folder in (_open_clip_folder() / "model_configs", OUR_MODEL_CONFIGS):
        for path in folder.glob("*.json"):
            config = json.loads(path.read_text())
            if all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg")):
                configs[path.stem] = config
    return dict(sorted(configs.items(), key=lambda item: _natural_key(item[0])))


@functools.cache
def _pretrained() -> dict[str, Callable[..., Any]]:
    """open_clip.pretrained's namespace after running its source without its package-relative and
    optional imports (the try blocks: safetensors.torch imports torch, huggingface_hub serves
    downloads); the constants it takes from the package come from open_clip/constants.py, which
    imports nothing."""
    folder = _open_clip_folder()
    namespace: dict[str, Any] = {"__name__": "open_clip_pretrained_table"}
    exec(compile((folder / "constants.py").read_text(), str(folder / "constants.py"), "exec"), namespace)
    tree = ast.parse((folder / "pretrained.py").read_text())
    tree.body = [node for node in tree.body
                 if not isinstance(node, ast.Try) and not (isinstance(node, ast.ImportFrom) and node.level)]
    exec(compile(tree, str(folder / "pretrained.py"), "exec"), namespace)
    return namespace


def list_pretrained() -> list[tuple[str, str]]:
    return _pretrained()["list_pretrained"]()


def pretrained_cfg(model: str, tag: str) -> dict:
    return _pretrained()["get_pretrained_cfg"](model, tag)


def is_pretrained(model: str, tag: str) -> bool:
    return _pretrained()["is_pretrained_cfg"](model, tag)


def pretrained_tags(model: str) -> list[str]:
    return _pretrained()["list_pretrained_tags_by_model"](model)


def registry_model_of_hub_id(hub_id: str) -> str | None:
    """The architecture of a hub id that open_clip's pretrained list knows, without the network."""
    for model, tag in list_pretrained():
        if pretrained_cfg(model, tag).get("hf_hub", "").rstrip("/") == hub_id:
            return model
    return None


def is_generative(model_name: str) -> bool:
    return "multimodal_cfg" in model_configs().get(model_name, {})


NOT_GENERATIVE = "{} has no text decoder; a captioner needs an open_clip CoCa model (e.g. coca_ViT-L-14)"


def spec_problem(rest: str, role: Role) -> str | None:
    """What is wrong with an `open_clip:` spec, checked offline; None when it looks usable."""
    if not rest:
        return "missing model name, e.g. open_clip:ViT-B-32/openai"
    spec = OpenClipSpec.parse(rest)
    if spec.hub_id is not None:
        if not HUB_ID.fullmatch(spec.hub_id):
            return f"hf-hub id must be ORG/NAME, got {spec.hub_id!r}"
        known = registry_model_of_hub_id(spec.hub_id)
        if role == "captioner" and known is not None and not is_generative(known):
            return NOT_GENERATIVE.format(spec.hub_id)
        return None
    models = list(model_configs())
    if spec.model not in models:
        close = difflib.get_close_matches(spec.model, models, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else " (see open_clip.list_models())"
        return f"unknown open_clip model {spec.model!r}{hint}"
    if spec.tag is not None and not is_pretrained(spec.model, spec.tag):
        tags = pretrained_tags(spec.model)
        known = ", ".join(tags[:6]) + (f" and {len(tags) - 6} more" if len(tags) > 6 else "")
        return f"unknown pretrained tag {spec.tag!r} for {spec.model} (known: {known or 'none'})"
    if spec.path is not None and (problem := weights_problem(spec.path)):
        return problem
    if role == "captioner" and not is_generative(spec.model):
        return NOT_GENERATIVE.format(spec.model)
    return None


def estimate_cost(rest: str, role: Role) -> ModelCost | None:
    """Per-item forward FLOPs from the model's open_clip config (no weights read; see teachers/flops.py).

    ViT towers and open_clip text towers are covered; a timm or Hugging Face tower
    gets None for its FLOPs. An hf-hub spec is covered when open_clip's pretrained
    list names its architecture.
    """
    spec = OpenClipSpec.parse(rest)
    model = registry_model_of_hub_id(spec.hub_id) if spec.hub_id is not None else spec.model
    config = model_configs().get(model) if model else None
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
