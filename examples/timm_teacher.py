"""An image-only teacher from timm, plugged in by spec string with no change to dr-gen:

    teachers:
      - id: dinov2_s14
        spec: python:examples.timm_teacher:TimmImageTeacher
        options: {model: vit_small_patch14_dinov2.lvd142m, pretrained: true}

dr-gen calls `TimmImageTeacher(config, device, precision)` (see teachers/python_adapter.py).
The teacher embeds the K views only: its card says has_text=False, so the dataset gets an
image embedding column for it and no text one. With `pretrained: false` the architecture is
built with seeded random weights, the same in every process (tests, demos).
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

from dr_pipeline.core.config import TeacherConfig
from dr_pipeline.core.errors import ConfigError
from teachers import VIEW_RESIZE, TeacherCard
from teachers.base import pixels_for_model, precision_context, resolve_precision, seeded_init


class TimmImageTeacher:
    """L2-normalised pooled features (the classifier removed) of a timm image model."""

    def __init__(self, config: TeacherConfig, device: torch.device, precision: str):
        name = config.options.get("model")
        if not isinstance(name, str):
            raise ConfigError(f"teacher {config.id!r}: options.model must name a timm model (timm.list_models())")
        pretrained = bool(config.options.get("pretrained", True))
        with seeded_init(f"timm:{name}") as seed:
            model = timm.create_model(name, pretrained=pretrained, num_classes=0)
        self.model = model.eval().to(device)
        self.device = device
        self.precision = resolve_precision(precision, device)
        data = timm.data.resolve_model_data_config(model)
        _, height, width = data["input_size"]
        if height != width:
            raise ConfigError(f"teacher {config.id!r}: {name} takes {height}x{width} inputs; views are square")
        self.card = TeacherCard(
            id=config.id,
            spec=config.spec,
            kind="python",
            model=f"timm:{name}",
            weights=f"timm:{name}" if pretrained else f"random-init:{seed}",
            embedding_dim=int(model.num_features),
            input_size=int(height),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            interpolation=data["interpolation"],
            view_resize=VIEW_RESIZE,
            context_length=None,
            tokenizer=None,
            logit_scale=None,
            logit_bias=None,
            has_text=False,
        )

    @torch.inference_mode()
    def encode_image(self, views: torch.Tensor) -> torch.Tensor:
        card = self.card
        pixels = pixels_for_model(views, card.input_size, card.mean, card.std, self.device)
        with precision_context(self.device, self.precision):
            features = self.model(pixels)
        return F.normalize(features.float(), dim=-1).cpu()

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        raise TypeError(f"{self.card.spec} is an image-only teacher (card.has_text is False)")
