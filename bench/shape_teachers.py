"""Stand-in teachers of a chosen embedding width, for benchmarks of what is stored, not of models.

    spec: python:bench.shape_teachers:ProjectionTeacher   options: {dim: 768}

The image embedding is a fixed random projection of the view pooled to 8 x 8 pixels, the
text embedding a random vector seeded by the text's CRC32: cheap, deterministic, L2-normalised,
with the shape of a real teacher's output (the reader's figures depend on the shape only).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.nn.functional as F

from dr_pipeline.core.config import TeacherConfig
from teachers import VIEW_RESIZE, TeacherCard

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ProjectionTeacher:
    def __init__(self, config: TeacherConfig, device: torch.device, precision: str):
        dim = int(config.options.get("dim", 768))
        self.device = device
        self.projection = torch.from_numpy(np.random.default_rng(dim).standard_normal((3 * 8 * 8, dim)).astype(np.float32))
        self.card = TeacherCard(
            id=config.id, spec=config.spec, kind="python", model=f"projection-{dim}", weights=f"random-init:{dim}",
            embedding_dim=dim, input_size=224, mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic",
            view_resize=VIEW_RESIZE, context_length=77, tokenizer=None, logit_scale=100.0, logit_bias=None,
        )

    @torch.inference_mode()
    def encode_image(self, views: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(views.float().cpu() / 255, 8).flatten(1)
        return F.normalize(pooled @ self.projection, dim=-1)

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        rows = [np.random.default_rng(zlib.crc32(t.encode())).standard_normal(self.card.embedding_dim) for t in texts]
        return F.normalize(torch.from_numpy(np.stack(rows).astype(np.float32)), dim=-1)
