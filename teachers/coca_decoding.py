"""Step-by-step decoding on open_clip CoCa modules, for `sampling.sample_tokens`.

`KVCacheStepper` pushes only the newest token of each row through the text tower and
the multimodal decoder, reusing cached self-attention keys/values and the image's
projected cross-attention keys/values. `FullRecomputeStepper` calls CoCa's own
`text` and `text_decoder` on the whole prefix every step: the slow reference that
the cached stepper must match token for token.

The cached stepper mirrors open_clip 3.x (TextTransformer.forward and
MultimodalTransformer.forward) using the blocks' own submodules. CoCa's text tower
appends a CLS token after the text and returns the text tokens without ln_final;
under the causal mask no text token sees that CLS token, so it is never computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import MultimodalTransformer, ResidualAttentionBlock, TextTransformer
from torch import nn


def kv_cache_unsupported(model: nn.Module) -> str | None:
    """Why KVCacheStepper cannot decode this CoCa model, or None when it can."""
    text, decoder = model.text, model.text_decoder
    if not isinstance(text, TextTransformer) or not isinstance(decoder, MultimodalTransformer):
        return "its text tower or decoder is not open_clip's TextTransformer / MultimodalTransformer"
    if text.attn_mask is None or text.cls_emb is None:
        return "its text tower is not causal with an appended CLS token"
    blocks = [*text.transformer.resblocks, *decoder.resblocks, *decoder.cross_attn]
    if any(type(block) is not ResidualAttentionBlock for block in blocks):
        return "it uses custom attention blocks"
    if not (text.transformer.batch_first and decoder.batch_first):
        return "its transformers are not batch-first"
    return None


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    rows, length, width = x.shape
    return x.view(rows, length, num_heads, width // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    rows, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(rows, length, heads * head_dim)


def _projection(attn: nn.MultiheadAttention, x: torch.Tensor, part: slice) -> torch.Tensor:
    """The query / key / value rows (`part` of in_proj) of a packed nn.MultiheadAttention."""
    bias = attn.in_proj_bias[part] if attn.in_proj_bias is not None else None
    return F.linear(x, attn.in_proj_weight[part], bias)


def _attend(attn: nn.MultiheadAttention, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
    """query [A, 1, E] against per-head keys/values [A, H, L, E/H], then the output projection."""
    out = F.scaled_dot_product_attention(_split_heads(query, attn.num_heads), keys, values)
    return attn.out_proj(_merge_heads(out))


class KVCache:
    """Self-attention keys and values of every layer for every live row, in one tensor allocated
    at the first step for the longest caption; the live rows are its first rows, so a row that
    finishes is dropped by moving the rows after it up, with no new allocation."""

    def __init__(self, layers: int, capacity: int):
        self.layers = layers
        self.capacity = capacity
        self.storage: torch.Tensor | None = None  # [layers, 2 (keys, values), rows, heads, capacity, head_dim]
        self.rows = 0

    def append(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor, position: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store position's [A, H, 1, d] keys/values of `layer`; return those of positions 0..position."""
        if self.storage is None:
            # Allocated on first use so the cache takes the dtype the model runs at (autocast).
            rows, heads, _, head_dim = keys.shape
            self.storage = keys.new_empty((self.layers, 2, rows, heads, self.capacity, head_dim))
            self.rows = rows
        cache = self.storage[layer, :, : self.rows]
        cache[0, :, :, position : position + 1] = keys
        cache[1, :, :, position : position + 1] = values
        return cache[0, :, :, : position + 1], cache[1, :, :, : position + 1]

    def keep_rows(self, rows: torch.Tensor) -> None:
        if self.storage is not None:
            self.storage[:, :, : len(rows)] = self.storage[:, :, rows]
        self.rows = len(rows)


def _self_attention_block(
    block: ResidualAttentionBlock, x: torch.Tensor, cache: KVCache, layer: int, position: int
) -> torch.Tensor:
    """ResidualAttentionBlock.forward for one new token under the causal mask."""
    width = x.shape[-1]
    query, key, value = _projection(block.attn, block.ln_1(x), slice(None)).split(width, dim=-1)
    heads = block.attn.num_heads
    keys, values = cache.append(layer, _split_heads(key, heads), _split_heads(value, heads), position)
    x = x + block.ls_1(_attend(block.attn, query, keys, values))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _cross_attention_block(block: ResidualAttentionBlock, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
    """ResidualAttentionBlock.forward with k_x = v_x = image embeddings, whose projections are given."""
    width = x.shape[-1]
    query = _projection(block.attn, block.ln_1(x), slice(0, width))
    x = x + block.ls_1(_attend(block.attn, query, keys, values))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _image_keys_values(block: ResidualAttentionBlock, image_embs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    width = image_embs.shape[-1]
    image = block.ln_1_kv(image_embs)
    keys = _projection(block.attn, image, slice(width, 2 * width))
    values = _projection(block.attn, image, slice(2 * width, 3 * width))
    return _split_heads(keys, block.attn.num_heads), _split_heads(values, block.attn.num_heads)


class KVCacheStepper:
    """Cached decoding: per step, one token per row through every block.

    image_embs [N, T, E] are projected to cross-attention keys/values once per image,
    then gathered to the rows (row_image [A] maps each row to its image).
    """

    def __init__(self, model: nn.Module, image_embs: torch.Tensor, row_image: torch.Tensor, capacity: int):
        self.text = model.text
        self.decoder = model.text_decoder
        # Each row's copy of its image's keys/values, laid out [A, H, T, E/H] contiguous: read per
        # row per step, they take SDPA half the time of the [A, T, H, E/H] layout a gather of the
        # heads-split projection leaves, with the same results.
        self.cross_keys_values = [
            tuple(part.contiguous()[row_image] for part in _image_keys_values(block, image_embs))
            for block in self.decoder.cross_attn
        ]
        self.cache = KVCache(len(self.text.transformer.resblocks) + len(self.decoder.resblocks), capacity)
        self.position = 0

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        dtype = self.text.transformer.get_cast_dtype()
        x = self.text.token_embedding(tokens[:, None]).to(dtype)
        x = x + self.text.positional_embedding[self.position].to(dtype)
        layer = 0
        for block in self.text.transformer.resblocks:
            x = _self_attention_block(block, x, self.cache, layer, self.position)
            layer += 1
        for block, cross, (keys, values) in zip(self.decoder.resblocks, self.decoder.cross_attn, self.cross_keys_values):
            x = _self_attention_block(block, x, self.cache, layer, self.position)
            x = _cross_attention_block(cross, x, keys, values)
            layer += 1
        self.position += 1
        return self.decoder.ln_final(x[:, 0]) @ self.decoder.text_projection

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.cache.keep_rows(rows)
        self.cross_keys_values = [(keys[rows], values[rows]) for keys, values in self.cross_keys_values]


class FullRecomputeStepper:
    """Reference decoding: CoCa's text tower and decoder on the whole prefix, every step."""

    def __init__(self, model: nn.Module, image_embs: torch.Tensor, row_image: torch.Tensor):
        self.model = model
        self.image_embs = image_embs[row_image]
        self.prefix = torch.empty(len(row_image), 0, dtype=torch.long, device=image_embs.device)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.prefix = torch.cat([self.prefix, tokens[:, None]], dim=1)
        _, token_embs = self.model.text(self.prefix)
        return self.model.text_decoder(self.image_embs, token_embs)[:, -1]

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.prefix, self.image_embs = self.prefix[rows], self.image_embs[rows]
