"""The captioning decoder as it was before issue 15 (commit 9d9e7f0), frozen: the reference the
fast decoder must match token for token (tests/teachers/test_coca_decoding.py) and the "before" of
bench/bench_captioning.py. It sorts the whole vocabulary for top_p at every step, stacks a fresh
[rows, V] draw per step and copies every layer's cache when a row finishes. Do not optimise it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dr_pipeline.core.config import SamplerConfig
from teachers.base import pixels_for_model, precision_context


# The attention helpers of teachers/coca_decoding.py as they were, copied so that optimising the
# current decoder cannot change (or speed up) the reference.


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    rows, length, width = x.shape
    return x.view(rows, length, num_heads, width // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    rows, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(rows, length, heads * head_dim)


def _projection(attn: nn.MultiheadAttention, x: torch.Tensor, part: slice) -> torch.Tensor:
    bias = attn.in_proj_bias[part] if attn.in_proj_bias is not None else None
    return F.linear(x, attn.in_proj_weight[part], bias)


def _attend(attn: nn.MultiheadAttention, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
    out = F.scaled_dot_product_attention(_split_heads(query, attn.num_heads), keys, values)
    return attn.out_proj(_merge_heads(out))


def _cross_attention_block(block, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
    width = x.shape[-1]
    query = _projection(block.attn, block.ln_1(x), slice(0, width))
    x = x + block.ls_1(_attend(block.attn, query, keys, values))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _image_keys_values(block, image_embs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    width = image_embs.shape[-1]
    image = block.ln_1_kv(image_embs)
    keys = _projection(block.attn, image, slice(width, 2 * width))
    values = _projection(block.attn, image, slice(2 * width, 3 * width))
    return _split_heads(keys, block.attn.num_heads), _split_heads(values, block.attn.num_heads)


class RowNoise:
    def __init__(self, seeds: Sequence[int], device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.device = device

    def draw(self, vocab_size: int) -> torch.Tensor:
        return torch.stack(
            [torch.rand(vocab_size, generator=g, dtype=torch.float64, device=self.device) for g in self.generators]
        )

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.generators = [self.generators[row] for row in rows.tolist()]


def choose_tokens(logits, history, num_generated, uniforms, sampler: SamplerConfig, stop_tokens) -> torch.Tensor:
    scores = logits.double()
    if sampler.repetition_penalty != 1.0:
        seen = scores.gather(1, history)
        seen = torch.where(seen < 0, seen * sampler.repetition_penalty, seen / sampler.repetition_penalty)
        scores = scores.scatter(1, history, seen)
    if num_generated < sampler.min_length:
        scores = scores.index_fill(1, stop_tokens, float("-inf"))
    scores = scores / sampler.temperature
    if sampler.top_k is not None and sampler.top_k < scores.shape[-1]:
        kth_best = scores.topk(sampler.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if sampler.top_p is not None:
        sorted_scores, order = scores.sort(dim=-1, descending=True, stable=True)
        probs = sorted_scores.softmax(dim=-1)
        outside = (probs.cumsum(dim=-1) - probs) >= sampler.top_p
        scores = scores.scatter(1, order, sorted_scores.masked_fill(outside, float("-inf")))
    if not torch.isfinite(scores.max(dim=-1).values).all():
        raise FloatingPointError("the captioner's logits are not finite (overflow at reduced precision?)")
    gumbel = -torch.log(-torch.log(uniforms))
    return (scores + gumbel).argmax(dim=-1)


def sample_tokens(stepper, seeds, sampler: SamplerConfig, start_token: int, stop_tokens, device) -> list[list[int]]:
    num_rows = len(seeds)
    noise = RowNoise(seeds, device)
    stops = torch.tensor(list(stop_tokens), device=device)
    generated = torch.full((num_rows, sampler.max_length), -1, dtype=torch.long, device=device)
    live = torch.arange(num_rows, device=device)
    history = torch.full((num_rows, 1), start_token, dtype=torch.long, device=device)
    tokens = history[:, 0]
    for step in range(sampler.max_length):
        logits = stepper.step(tokens)
        tokens = choose_tokens(logits, history, step, noise.draw(logits.shape[-1]), sampler, stops)
        generated[live, step] = tokens
        running = ~torch.isin(tokens, stops)
        if not running.all():
            keep = running.nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            stepper.keep_rows(keep)
            noise.keep_rows(keep)
            live, tokens, history = live[keep], tokens[keep], history[keep]
        history = torch.cat([history, tokens.unsqueeze(1)], dim=1)
    return [[token for token in row if token >= 0] for row in generated.tolist()]


class _KVCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def append(self, keys, values, position):
        if self.keys is None:
            shape = (keys.shape[0], keys.shape[1], self.capacity, keys.shape[3])
            self.keys, self.values = keys.new_empty(shape), values.new_empty(shape)
        self.keys[:, :, position : position + 1] = keys
        self.values[:, :, position : position + 1] = values
        return self.keys[:, :, : position + 1], self.values[:, :, : position + 1]

    def keep_rows(self, rows):
        if self.keys is not None:
            self.keys, self.values = self.keys[rows], self.values[rows]


def _self_attention_block(block, x, cache: _KVCache, position: int):
    width = x.shape[-1]
    query, key, value = _projection(block.attn, block.ln_1(x), slice(None)).split(width, dim=-1)
    heads = block.attn.num_heads
    keys, values = cache.append(_split_heads(key, heads), _split_heads(value, heads), position)
    x = x + block.ls_1(_attend(block.attn, query, keys, values))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


class KVCacheStepper:
    def __init__(self, model: nn.Module, image_embs: torch.Tensor, row_image: torch.Tensor, capacity: int):
        self.text = model.text
        self.decoder = model.text_decoder
        self.cross_keys_values = [
            tuple(part[row_image] for part in _image_keys_values(block, image_embs))
            for block in self.decoder.cross_attn
        ]
        layers = len(self.text.transformer.resblocks) + len(self.decoder.resblocks)
        self.caches = [_KVCache(capacity) for _ in range(layers)]
        self.position = 0

    def step(self, tokens):
        dtype = self.text.transformer.get_cast_dtype()
        x = self.text.token_embedding(tokens[:, None]).to(dtype)
        x = x + self.text.positional_embedding[self.position].to(dtype)
        caches = iter(self.caches)
        for block in self.text.transformer.resblocks:
            x = _self_attention_block(block, x, next(caches), self.position)
        layers = zip(self.decoder.resblocks, self.decoder.cross_attn, self.cross_keys_values)
        for block, cross, (keys, values) in layers:
            x = _self_attention_block(block, x, next(caches), self.position)
            x = _cross_attention_block(cross, x, keys, values)
        self.position += 1
        return self.decoder.ln_final(x[:, 0]) @ self.decoder.text_projection

    def keep_rows(self, rows):
        for cache in self.caches:
            cache.keep_rows(rows)
        self.cross_keys_values = [(keys[rows], values[rows]) for keys, values in self.cross_keys_values]


@torch.inference_mode()
def reference_generate(captioner, images: torch.Tensor, seeds: list[list[int]], sampler: SamplerConfig):
    """OpenClipCaptioner.generate of commit 9d9e7f0 (kv-cache decoding) on `captioner`'s model."""
    card, device = captioner.card, captioner.device
    pixels = pixels_for_model(images, card.input_size, card.mean, card.std, device)
    counts = torch.tensor([len(image_seeds) for image_seeds in seeds], device=device)
    row_image = torch.repeat_interleave(torch.arange(len(seeds), device=device), counts)
    with precision_context(device, captioner.precision):
        _, image_embs = captioner.model._encode_image(pixels)
        stepper = KVCacheStepper(captioner.model, image_embs, row_image, capacity=sampler.max_length)
        flat_seeds = [seed for image_seeds in seeds for seed in image_seeds]
        rows = iter(sample_tokens(stepper, flat_seeds, sampler, captioner.start_token, captioner.stop_tokens, device))
    return [[next(rows) for _ in image_seeds] for image_seeds in seeds]
