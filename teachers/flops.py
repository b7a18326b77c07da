"""Forward FLOPs of transformer towers from their architecture numbers, without building a model.

A multiply-add counts 2 FLOPs. A pre-norm transformer layer of width W and MLP
hidden size H on T tokens costs

    2·T·(4·W² + 2·W·H)    the q, k, v and output projections and the two MLP matrices
  + 4·T²·W                 attention scores (Q·Kᵀ) and the weighted sum of V

Norms, softmax, activations and biases are left out (under 1% at CLIP sizes).
- ViT image tower: T = (S/p)² patches + 1 class token, plus the patch embedding
  2·(S/p)²·3p²·W and the output projection 2·W·D.
- Text tower: T = the context length (open_clip encodes the whole padded
  context), plus the output projection 2·W·D.
- Attentional pooler (CoCa): Q queries of width D over T tokens of width W:
  2·Q·D² (queries) + 2·T·2·W·D (keys, values) + 4·Q·T·D + 2·Q·D² (output).
- Caption decoding with a KV cache, the token at position t: every text and
  decoder layer on one token, attending over t + 1 cached tokens (4·(t+1)·W),
  each decoder layer's cross-attention to N image tokens (q and output
  projections 2·2·W², attention 4·N·W, its MLP 2·2·W·H), and the vocabulary
  projection 2·W·V. The image tokens' cross-attention keys and values,
  2·N·2·W² per decoder layer, are projected once per image.
tests/tools/test_plan.py checks these against torch's FLOP counter on real modules.
"""

from __future__ import annotations

from dataclasses import dataclass


def transformer_flops(tokens: int, width: int, layers: int, mlp_ratio: float = 4.0) -> float:
    hidden = mlp_ratio * width
    per_layer = 2 * tokens * (4 * width**2 + 2 * width * hidden) + 4 * tokens**2 * width
    return layers * per_layer


def vit_flops(image_size: int, patch_size: int, width: int, layers: int, output_dim: int,
              mlp_ratio: float = 4.0) -> float:
    patches = (image_size // patch_size) ** 2
    embed = 2 * patches * 3 * patch_size**2 * width
    return embed + transformer_flops(patches + 1, width, layers, mlp_ratio) + 2 * width * output_dim


def text_flops(context_length: int, width: int, layers: int, output_dim: int, mlp_ratio: float = 4.0) -> float:
    return transformer_flops(context_length, width, layers, mlp_ratio) + 2 * width * output_dim


def attentional_pool_flops(tokens: int, width: int, queries: int, output_dim: int) -> float:
    return 4 * queries * output_dim**2 + 4 * tokens * width * output_dim + 4 * queries * tokens * output_dim


@dataclass(frozen=True)
class DecoderShape:
    """The text tower and multimodal decoder of a captioner, as decoding sees them."""

    text_width: int
    text_layers: int
    decoder_width: int
    decoder_layers: int
    vocab_size: int
    image_tokens: int
    mlp_ratio: float = 4.0

    def image_flops(self) -> float:
        """Once per image: the cross-attention keys and values of its tokens, every decoder layer."""
        return self.decoder_layers * 2 * self.image_tokens * 2 * self.decoder_width**2

    def caption_flops(self, tokens: int) -> float:
        """One caption of `tokens` tokens (the start token's step included), decoded with a KV cache."""
        text_step = 2 * (4 * self.text_width**2 + 2 * self.text_width * self.mlp_ratio * self.text_width)
        width = self.decoder_width
        decoder_step = 2 * (4 * width**2 + 2 * width * self.mlp_ratio * width)
        cross_step = 2 * 2 * width**2 + 4 * self.image_tokens * width + 2 * 2 * width * self.mlp_ratio * width
        per_token = (
            self.text_layers * text_step
            + self.decoder_layers * (decoder_step + cross_step)
            + 2 * width * self.vocab_size
        )
        # attention over the cache: position t attends over t + 1 tokens, in every self-attention layer
        cached = tokens * (tokens + 1) / 2
        attention = 4 * cached * (self.text_layers * self.text_width + self.decoder_layers * width)
        return tokens * per_token + attention


@dataclass(frozen=True)
class ModelCost:
    """What one model costs per item; None where its architecture is not one these formulas cover."""

    embedding_dim: int | None
    image_flops: float | None  # one image (view) through the image tower
    text_flops: float | None  # one text through the text tower
    decoder: DecoderShape | None = None  # captioners only
    architecture: str = ""  # the formula's inputs, for the plan's report
