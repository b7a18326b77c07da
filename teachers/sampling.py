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

Nucleus (top_p) sampling without sorting the vocabulary: the token drawn is the best
perturbed score among the nucleus, so the few best perturbed tokens (torch.topk) are
tested in turn for membership, which needs one O(vocabulary) sum each: a token is in the
nucleus when the probability of the tokens ranked before it is below top_p. Usually the
first one tested is in (the draw lands outside the nucleus with probability 1 - top_p).
Wherever that sum is within NUCLEUS_TOLERANCE of top_p, or perturbed scores tie, the row is
decided by `choose_tokens_by_sort` (the sort-based rule), so the tokens are exactly those the
sorting rule picks.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Protocol

import torch

from dr_pipeline.core.config import CaptionPostprocessConfig, SamplerConfig

NUCLEUS_CANDIDATES = 8
"""Best perturbed tokens tested for nucleus membership before a row falls back to the sort."""
CPU_CHUNK_BYTES = 2 * 1024 * 1024
"""Rows sampled together on a CPU: a choice makes about five float64 [rows, V] passes' worth of
temporaries, and with every row at once (8 MB per array at 20 rows of a 49,408-token vocabulary)
each pass streams from memory; 2 MiB of rows at a time stay in cache, which made sampling about
1.7x faster on the bench's 20 rows. Rows are independent, so the tokens are the same."""
NUCLEUS_TOLERANCE = 1e-9
"""A membership decision is trusted when the probability ranked before a token is this far from
top_p. The sort-based rule and ours sum up to 49k float64 probabilities in different orders:
each sum is within vocabulary x 2**-53 (~6e-12 at 49k tokens) of the exact one."""


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
    kind of device. Draws are written into one buffer allocated at the first draw."""

    def __init__(self, seeds: Sequence[int], device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.device = device
        self.buffer: torch.Tensor | None = None

    def draw(self, vocab_size: int) -> torch.Tensor:
        """[rows, vocab_size] float64 uniforms in [0, 1): each row's next draws (the same
        numbers as torch.rand(vocab_size, generator=row's generator)); valid until the next draw."""
        if self.buffer is None or self.buffer.shape[1] != vocab_size:
            self.buffer = torch.empty(len(self.generators), vocab_size, dtype=torch.float64, device=self.device)
        uniforms = self.buffer[: len(self.generators)]
        for row, generator in zip(uniforms, self.generators):
            row.uniform_(generator=generator)
        return uniforms

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.generators = [self.generators[row] for row in rows.tolist()]


def filtered_scores(
    logits: torch.Tensor, history: torch.Tensor, num_generated: int, sampler: SamplerConfig, stop_tokens: torch.Tensor
) -> torch.Tensor:
    """float64 scores [A, V] after repetition penalty, min_length, temperature and top_k (ties at
    the k-th score kept); filtered tokens are -inf. In Hugging Face's processors' order."""
    scores = logits.double()
    if sampler.repetition_penalty != 1.0:
        seen = scores.gather(1, history)
        seen = torch.where(seen < 0, seen * sampler.repetition_penalty, seen / sampler.repetition_penalty)
        scores = scores.scatter(1, history, seen)
    if num_generated < sampler.min_length:
        scores = scores.index_fill(1, stop_tokens, float("-inf"))
    if sampler.temperature != 1.0:  # dividing by 1.0 is exact: skipping it changes no bit
        scores = scores / sampler.temperature
    if sampler.top_k is not None and sampler.top_k < scores.shape[-1]:
        kth_best = scores.topk(sampler.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    return scores


def gumbel_noise(uniforms: torch.Tensor) -> torch.Tensor:
    """-log(-log(u)), computed in a new tensor."""
    return torch.log(uniforms).neg_().log_().neg_()


def choose_tokens_by_sort(scores: torch.Tensor, gumbel: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus by a stable sort of every row: tokens whose better-ranked tokens (ties in
    index order) hold less than top_p of the probability; then Gumbel-max over them."""
    sorted_scores, order = scores.sort(dim=-1, descending=True, stable=True)
    probs = sorted_scores.softmax(dim=-1)
    outside = (probs.cumsum(dim=-1) - probs) >= top_p  # better tokens already reach top_p
    scores = scores.scatter(1, order, sorted_scores.masked_fill(outside, float("-inf")))
    return (scores + gumbel).argmax(dim=-1)


def _nucleus_by_candidates(
    scores: torch.Tensor, best: torch.Tensor, perturbed: torch.Tensor, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [A], decided [A]): per row the best perturbed token of the nucleus, where the
    first NUCLEUS_CANDIDATES perturbed tokens settle it beyond doubt (see the module docstring).
    A token whose score ties another's is left undecided (the sort orders ties by index)."""
    rows, vocab = scores.shape
    candidates = min(NUCLEUS_CANDIDATES, vocab)
    values, tokens = perturbed.topk(min(candidates + 1, vocab), dim=-1)
    weights = (scores - best).exp_()
    total = weights.sum(dim=-1)
    chosen = tokens[:, 0].clone()
    decided = torch.zeros(rows, dtype=torch.bool, device=scores.device)
    pending = torch.arange(rows, device=scores.device)
    for rank in range(candidates):
        row_scores, row_weights = (scores, weights) if rank == 0 else (scores[pending], weights[pending])
        token = tokens[pending, rank]
        # Arithmetic, not comparisons (several times faster on CPU): sign(score_j - score) is
        # +1 above, 0 for a tie, -1 below (exact: distinct doubles never subtract to zero).
        above = (row_scores - row_scores.gather(1, token[:, None])).sign_()
        balance = above.sum(dim=-1)  # above - below
        above.clamp_(min=0)
        count_above = above.sum(dim=-1)
        unique = vocab - 2 * count_above + balance == 1  # no other token has this score
        mass = torch.linalg.vecdot(above, row_weights) / total[pending]
        inside = (mass < top_p - NUCLEUS_TOLERANCE) & unique
        outside = (mass >= top_p + NUCLEUS_TOLERANCE) & unique
        if rank + 1 < values.shape[1]:  # a tie with the next perturbed score: argmax takes the lower index
            inside &= values[pending, rank] != values[pending, rank + 1]
        chosen[pending[inside]] = token[inside]
        decided[pending[inside]] = True
        pending = pending[outside]
        if pending.numel() == 0:
            break
    return chosen, decided


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

    On a CPU the rows are taken CPU_CHUNK_BYTES at a time (see there); elsewhere all at once.
    """
    rows, vocab = logits.shape
    chunk = max(1, CPU_CHUNK_BYTES // (8 * vocab)) if logits.device.type == "cpu" else rows
    if rows <= chunk:
        return _choose_tokens_of_rows(logits, history, num_generated, uniforms, sampler, stop_tokens)
    return torch.cat([
        _choose_tokens_of_rows(logits[start : start + chunk], history[start : start + chunk], num_generated,
                               uniforms[start : start + chunk], sampler, stop_tokens)
        for start in range(0, rows, chunk)
    ])


def _choose_tokens_of_rows(
    logits: torch.Tensor,
    history: torch.Tensor,
    num_generated: int,
    uniforms: torch.Tensor,
    sampler: SamplerConfig,
    stop_tokens: torch.Tensor,
) -> torch.Tensor:
    scores = filtered_scores(logits, history, num_generated, sampler, stop_tokens)
    best = scores.max(dim=-1, keepdim=True).values  # top_p always keeps the best token
    if not torch.isfinite(best).all():
        raise FloatingPointError("the captioner's logits are not finite (overflow at reduced precision?)")
    perturbed = scores - torch.log(uniforms).neg_().log_()  # scores + gumbel_noise(uniforms), bit for bit
    if sampler.top_p is None:
        return perturbed.argmax(dim=-1)
    tokens, decided = _nucleus_by_candidates(scores, best, perturbed, sampler.top_p)
    if not decided.all():
        rows = (~decided).nonzero().squeeze(1)
        tokens[rows] = choose_tokens_by_sort(scores[rows], gumbel_noise(uniforms[rows]), sampler.top_p)
    return tokens


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
    history = torch.full((num_rows, 1 + sampler.max_length), start_token, dtype=torch.long, device=device)
    tokens = history[:, 0]
    for step in range(sampler.max_length):
        logits = stepper.step(tokens)
        tokens = choose_tokens(logits, history[:, : step + 1], step, noise.draw(logits.shape[-1]), sampler, stops)
        generated[live, step] = tokens
        running = ~torch.isin(tokens, stops)
        if not running.all():
            keep = running.nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            stepper.keep_rows(keep)
            noise.keep_rows(keep)
            live, tokens, history = live[keep], tokens[keep], history[keep]
        history[:, step + 1] = tokens
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
