"""The `st:` kind: a sentence-transformers model as a text-only teacher.

  st:ORG/NAME          a model on the Hugging Face hub
  st:/path/to/model    a local sentence-transformers folder

It embeds the real and synthetic captions only: its card says has_image=False, so the
dataset has a text embedding column for it and no image one. Embeddings are
L2-normalised like every other teacher's.
"""

from __future__ import annotations

import torch

from dr_pipeline.core.config import TeacherConfig
from dr_pipeline.core.errors import ConfigError, error_line
from dr_pipeline.core.records import VIEW_RESIZE, TeacherCard
from teachers.base import precision_context, resolve_precision
from teachers.weights import QUOTED_ERROR_CHARS

KIND = "st"


class SentenceTransformerTeacher:
    """Text embeddings from SentenceTransformer.encode; there is no image side."""

    def __init__(self, model, card: TeacherCard, device: torch.device, precision: str):
        self.model = model
        self.card = card
        self.device = device
        self.precision = precision

    def encode_image(self, views: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{self.card.spec} is a text-only teacher (card.has_image is False)")

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        with precision_context(self.device, self.precision):
            embeddings = self.model.encode(
                texts,
                batch_size=max(len(texts), 1),  # the caller already batches
                convert_to_tensor=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return embeddings.float().cpu()


def build_sentence_transformer_teacher(
    rest: str, config: TeacherConfig, device: torch.device, precision: str
) -> SentenceTransformerTeacher:
    try:
        from sentence_transformers import SentenceTransformer
    except ModuleNotFoundError as missing:
        raise ConfigError(f"teacher spec {config.spec!r} needs {missing.name}: pip install 'dr-gen[st]'") from None
    try:
        model = SentenceTransformer(rest, device=str(device)).eval()
    except Exception as error:  # hub, file and config errors all mean "cannot load"
        raise ConfigError(
            f"teacher spec {config.spec!r}: cannot load the sentence-transformers model ({error_line(error, limit=QUOTED_ERROR_CHARS)})"
        ) from error
    tokenizer = model.tokenizer
    card = TeacherCard(
        id=config.id,
        spec=config.spec,
        kind=KIND,
        model=rest,
        weights=rest,
        embedding_dim=int(model.get_embedding_dimension()),
        input_size=None,
        mean=None,
        std=None,
        interpolation=None,
        view_resize=VIEW_RESIZE,
        context_length=int(model.max_seq_length),
        tokenizer=f"transformers.{type(tokenizer).__name__}({tokenizer.name_or_path})",
        logit_scale=None,
        logit_bias=None,
        has_image=False,
    )
    return SentenceTransformerTeacher(model, card, device, resolve_precision(precision, device))
