"""Token sampling and caption post-processing shared by every captioner.

Reproducibility contract: a caption depends only on (image, seed, sampler). Each row
draws its noise from its own generator seeded with the row's seed (one uniform per
vocabulary entry per step, used or not) and every filter works row by row, so neither
the other rows of a batch nor the batch size change what a row samples.

Tokens are drawn with the Gumbel-max trick, argmax(score + Gumbel noise), which samples
exactly softmax(score) and is robust to rounding: logits move by ~1e-6 in float32 when
the batch shape changes (other matmul kernels), and a pick changes only if the two best
perturbed scores are that close, which happens about once per 1e6 tokens (their gap is
about Exponential(1)). Inverse-CDF sampling with one uniform per step changed ~3 tokens
per 1000 on random weights, where top_p keeps thousands of nearly equal tokens whose CDF
steps are closer than the noise. In bf16 the noise is ~1e-2 and so is the flip rate.
Scores are handled in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Protocol

import torch

from dr_pipeline.config import CaptionPostprocessConfig, SamplerConfig


class TokenStepper(Protocol):
    """A captioning model in the middle of decoding a batch of rows."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per live row ([A] long) and return next-token logits [A, V]."""
        ...

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Forget every live row except `rows` (indices into the live rows, in order)."""
        ...


class RowNoise:
    """One generator per row, seeded with the row's seed. The generators live on the
    decoding device (a [rows, V] draw per step is too large to ship from the CPU), and
    CPU and CUDA generators produce different streams: captions reproduce on the same
    kind of device."""

    def __init__(self, seeds: Sequence[int], device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.device = device

    def draw(self, vocab_size: int) -> torch.Tensor:
        """[rows, vocab_size] float64 uniforms in [0, 1): each row's next draws."""
        return torch.stack(
            [torch.rand(vocab_size, generator=g, dtype=torch.float64, device=self.device) for g in self.generators]
        )

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.generators = [self.generators[row] for row in rows.tolist()]


def choose_tokens(
    logits: torch.Tensor,
    history: torch.Tensor,
    num_generated: int,
    uniforms: torch.Tensor,
    sampler: SamplerConfig,
    stop_tokens: torch.Tensor,
) -> torch.Tensor:
    """One token per row from logits [A, V] and uniforms [A, V], given each row's tokens so
    far [A, T] (start token included, as Hugging Face's repetition penalty sees them).

    Order (as Hugging Face's processors): repetition penalty, min_length, temperature,
    top_k (ties at the k-th score kept), top_p (on the top_k-renormalised distribution),
    then Gumbel-max over the kept tokens.
    """
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
        outside = (probs.cumsum(dim=-1) - probs) >= sampler.top_p  # better tokens already reach top_p
        scores = scores.scatter(1, order, sorted_scores.masked_fill(outside, float("-inf")))
    if not torch.isfinite(scores.max(dim=-1).values).all():
        raise FloatingPointError("the captioner's logits are not finite (overflow at reduced precision?)")
    gumbel = -torch.log(-torch.log(uniforms))
    return (scores + gumbel).argmax(dim=-1)


def sample_tokens(
    stepper: TokenStepper,
    seeds: Sequence[int],
    sampler: SamplerConfig,
    start_token: int,
    stop_tokens: Sequence[int],
    device: torch.device,
) -> list[list[int]]:
    """Decode one row per seed; returns each row's generated tokens, its stop token included.

    At most sampler.max_length tokens are generated per row (the start token not counted);
    no stop token is allowed before sampler.min_length tokens. Finished rows leave the
    batch, so no compute is spent on captions that are done.
    """
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


def postprocess_caption(
    tokens: Sequence[int],
    decode: Callable[[list[int]], str],
    special_tokens: Collection[int],
    postprocess: CaptionPostprocessConfig,
) -> str:
    """Token ids (start and stop tokens included) -> the caption text that is stored.

    The published DataCompDR recipe keeps the text before the first period.
    """
    if postprocess.strip_special_tokens:
        tokens = [token for token in tokens if token not in special_tokens]
    text = decode(list(tokens))
    if postprocess.cut_at_first_period:
        text = text.split(".", 1)[0]
    return text.strip()
