"""CoCa captioning: our KV-cached decoder against the full-recompute reference and against
the decoder as it was before issue 15 (tests/teachers/captioning_reference.py, frozen), and the
sampling contract (a caption depends only on image, seed and sampler).

A random-weight CoCa almost never samples a stop token; `_stop_biased` rewires one
component of the decoder's output so a stop token becomes likely, giving captions of
mixed lengths (rows leaving the batch) or captions that stop as soon as allowed.

Tokens are compared exactly across computations whose float32 logits differ by ~1e-6
(cached vs recomputed, alone vs in a batch): Gumbel-max sampling makes such differences
matter only about once per million tokens (see teachers/sampling.py).
"""

import pytest
import torch

from tests.teachers import captioning_reference as before

from dr_pipeline.core.config import CaptionerConfig, CaptionPostprocessConfig, SamplerConfig
from dr_pipeline.core.errors import ConfigError
from teachers import build_captioner
from teachers.coca_decoding import FullRecomputeStepper, KVCacheStepper
from teachers import sampling
from teachers.sampling import RowNoise, choose_tokens, postprocess_caption

SPEC = "open_clip:dr-tiny-coca"
SOT, EOT, PAD = 49406, 49407, 0
SEEDS = [[101, 102], [103, 104], [105, 106]]
MIXED_LENGTHS_BIAS = 8.0  # with top_p 0.9 gives this model captions of 3 to 16 tokens


def _images(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, 224, 224), dtype=torch.uint8, generator=generator)


def _stop_biased(stop_token: int, bias: float):
    """A fresh tiny CoCa whose logit for `stop_token` is shifted up by about `bias`."""
    captioner = build_captioner(CaptionerConfig(id="coca", spec=SPEC))
    decoder = captioner.model.text_decoder
    with torch.no_grad():
        decoder.text_projection[0, :] = 0.0
        decoder.text_projection[0, stop_token] = 1.0
        decoder.ln_final.bias[0] = bias
    return captioner


SAMPLERS = [
    (SamplerConfig(top_p=0.9, max_length=16, min_length=2), MIXED_LENGTHS_BIAS),
    (SamplerConfig(top_p=None, top_k=50, max_length=16, min_length=2), 4.0),
    (SamplerConfig(top_p=0.95, top_k=500, temperature=0.8, repetition_penalty=1.3, max_length=16, min_length=2), 6.0),
]
SAMPLER_IDS = ["top_p", "top_k", "top_k+top_p+temperature+penalty"]


@pytest.fixture(scope="module")
def captioner():
    return build_captioner(CaptionerConfig(id="coca", spec=SPEC))


@pytest.fixture(scope="module")
def mixed_lengths_captioner():
    return _stop_biased(EOT, MIXED_LENGTHS_BIAS)


@pytest.mark.parametrize(("sampler", "stop_bias"), SAMPLERS, ids=SAMPLER_IDS)
def test_cached_decoder_emits_the_same_tokens_as_full_recompute(sampler, stop_bias):
    captioner = _stop_biased(EOT, stop_bias)
    images = _images(3)

    cached = captioner.generate(images, SEEDS, sampler, decoding="kv-cache")
    reference = captioner.generate(images, SEEDS, sampler, decoding="full-recompute")

    assert cached == reference
    lengths = {len(tokens) for rows in cached for tokens in rows}
    assert len(lengths) > 2  # rows left the batch at different steps


def test_cached_decoder_matches_full_recompute_up_to_the_context_length(captioner):
    sampler = SamplerConfig(top_p=0.9, max_length=76, min_length=0)  # every position CoCa has
    image = _images(1, seed=6)

    cached = captioner.generate(image, [[1]], sampler, decoding="kv-cache")
    reference = captioner.generate(image, [[1]], sampler, decoding="full-recompute")

    assert cached == reference
    assert len(cached[0][0]) == 76


def test_cached_logits_match_full_recompute_step_by_step(captioner):
    model = captioner.model
    teacher_forced = [SOT, *captioner.tokenizer.encode("a dog runs on the beach with a red ball")]
    with torch.inference_mode():
        _, image_embs = model._encode_image(torch.randn(2, 3, 224, 224))
        row_image = torch.tensor([0, 0, 1])
        cached = KVCacheStepper(model, image_embs, row_image, capacity=len(teacher_forced))
        reference = FullRecomputeStepper(model, image_embs, row_image)
        rows = torch.arange(3)
        for position, token in enumerate(teacher_forced):
            tokens = torch.full((len(rows),), token)
            torch.testing.assert_close(cached.step(tokens), reference.step(tokens), rtol=1e-4, atol=1e-4)
            if position == 3:  # the middle row finishes
                keep = torch.tensor([0, 2])
                cached.keep_rows(keep)
                reference.keep_rows(keep)
                rows = rows[keep]


def test_same_seeds_give_the_same_captions(captioner):
    sampler = SamplerConfig(max_length=10, min_length=2)
    postprocess = CaptionPostprocessConfig()
    images = _images(2, seed=1)

    first = captioner.caption(images, SEEDS[:2], sampler, postprocess)
    second = captioner.caption(images, SEEDS[:2], sampler, postprocess)

    assert first == second
    assert [len(captions) for captions in first] == [2, 2]


def test_a_caption_does_not_depend_on_the_rest_of_the_batch(mixed_lengths_captioner):
    sampler = SamplerConfig(max_length=16, min_length=2)
    images = _images(3, seed=2)
    seeds = [[11, 12], [7], [13, 14]]

    in_batch = mixed_lengths_captioner.generate(images, seeds, sampler)

    for index, image_seeds in enumerate(seeds):
        for seed, batched in zip(image_seeds, in_batch[index]):
            assert mixed_lengths_captioner.generate(images[index : index + 1], [[seed]], sampler) == [[batched]]
    lengths = sorted(len(tokens) for rows in in_batch for tokens in rows)
    assert lengths[0] < lengths[-1]  # rows stopped at different steps, so the batch shrank


def test_different_seeds_give_different_captions(captioner):
    sampler = SamplerConfig(temperature=1.0, top_p=0.9, max_length=8, min_length=2)

    captions = captioner.generate(_images(1, seed=3), [[1, 2, 3, 4, 5]], sampler)[0]

    assert len({tuple(tokens) for tokens in captions}) == 5


def test_captions_run_to_max_length_when_nothing_stops_them(captioner):
    sampler = SamplerConfig(max_length=9, min_length=2)

    rows = captioner.generate(_images(2, seed=4), SEEDS[:2], sampler)

    assert all(len(tokens) == 9 and EOT not in tokens and PAD not in tokens for image in rows for tokens in image)


@pytest.mark.parametrize("stop_token", [EOT, PAD], ids=["end_of_text", "pad"])
def test_stop_tokens_wait_for_min_length(stop_token):
    forced = _stop_biased(stop_token, bias=40.0)
    sampler = SamplerConfig(max_length=12, min_length=4)
    images = _images(2, seed=5)

    rows = forced.generate(images, SEEDS[:2], sampler)
    captions = forced.caption(images, SEEDS[:2], sampler, CaptionPostprocessConfig(cut_at_first_period=False))

    for image_rows, image_captions in zip(rows, captions):
        for tokens, caption in zip(image_rows, image_captions):
            assert len(tokens) == 5 and tokens[-1] == stop_token
            assert not {SOT, EOT, PAD} & set(tokens[:-1])
            assert caption == forced.tokenizer.decode(tokens[:-1]).strip()


def test_max_length_beyond_the_context_is_refused(captioner):
    with pytest.raises(ConfigError, match="max_length 80 exceeds the context length 76"):
        captioner.generate(_images(1), [[1]], SamplerConfig(max_length=80))


def test_postprocess_keeps_the_text_before_the_first_period(captioner):
    tokenizer = captioner.tokenizer
    tokens = [SOT, *tokenizer.encode("A dog on a beach. With friends"), EOT]
    special = {SOT, EOT, PAD}

    def text(strip: bool, cut: bool) -> str:
        config = CaptionPostprocessConfig(strip_special_tokens=strip, cut_at_first_period=cut)
        return postprocess_caption(tokens, tokenizer.decode, special, config)

    assert text(strip=True, cut=True) == "a dog on a beach"
    assert text(strip=True, cut=False) == "a dog on a beach . with friends"
    assert text(strip=False, cut=False) == "<start_of_text>a dog on a beach . with friends <end_of_text>"


def test_captioner_card(captioner):
    card = captioner.card.to_dict()
    assert card["decoding"] == "kv-cache"
    assert card["context_length"] == 76 and card["input_size"] == 224
    assert card["weights"].startswith("random-init:")


# Sampling rules on hand-made logits over a 4-token vocabulary, checked by frequency.

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
NO_STOPS = torch.tensor([], dtype=torch.long)
DRAWS = 40_000  # frequencies within 0.01 of their probability (4 standard deviations)


def _frequencies(logits=None, history=(0,), num_generated=10, stops=NO_STOPS, **sampler) -> torch.Tensor:
    sampler = SamplerConfig(**{"top_p": None, "max_length": 20, "min_length": 0, **sampler})
    logits = (PROBS.log() if logits is None else torch.tensor(logits)).expand(DRAWS, -1)
    uniforms = torch.rand(DRAWS, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    history = torch.tensor([history]).expand(DRAWS, -1)
    tokens = choose_tokens(logits, history, num_generated, uniforms, sampler, stops)
    return torch.bincount(tokens, minlength=4) / DRAWS


def _assert_frequencies(frequencies: torch.Tensor, expected) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(frequencies.double(), expected / expected.sum(), rtol=0, atol=0.01)
    assert torch.equal(frequencies == 0, expected == 0)  # filtered tokens are never drawn


def test_gumbel_max_draws_from_the_softmax():
    _assert_frequencies(_frequencies(), PROBS)


def test_top_p_keeps_the_smallest_set_reaching_p():
    _assert_frequencies(_frequencies(top_p=0.7), [0.5, 0.3, 0, 0])  # 0.5 + 0.3 reaches 0.7
    _assert_frequencies(_frequencies(top_p=0.5), [1, 0, 0, 0])


def test_temperature_then_top_k():
    _assert_frequencies(_frequencies(top_k=1), [1, 0, 0, 0])
    _assert_frequencies(_frequencies(top_k=2, temperature=0.5), [0.5**2, 0.3**2, 0, 0])  # T=0.5 squares odds


def test_min_length_forbids_stop_tokens():
    stops = torch.tensor([0])
    _assert_frequencies(_frequencies(stops=stops, num_generated=2, min_length=3), [0, 0.3, 0.15, 0.05])
    _assert_frequencies(_frequencies(stops=stops, num_generated=3, min_length=3), PROBS)


def test_repetition_penalty_divides_positive_and_multiplies_negative_scores():
    logits = [2.0, 1.5, -1.0, -1.2]
    penalised = torch.tensor([1.0, 0.75, -2.0, -1.2]).softmax(0)  # tokens 0, 1, 2 seen, penalty 2
    _assert_frequencies(_frequencies(logits, history=(0, 1, 2), repetition_penalty=2.0), penalised)


def test_non_finite_logits_are_reported():
    with pytest.raises(FloatingPointError, match="not finite"):
        _frequencies([0.0, float("nan"), 0.0, 0.0])


def test_each_row_draws_from_its_own_generator():
    alone = RowNoise([5], torch.device("cpu"))
    together = RowNoise([3, 5, 8], torch.device("cpu"))
    first_alone, first_together = alone.draw(6), together.draw(6)
    assert torch.equal(first_together[1], first_alone[0])
    assert not torch.equal(first_together[0], first_together[1])

    together.keep_rows(torch.tensor([1, 2]))  # row 3 finished; row 5 continues its own stream
    assert torch.equal(together.draw(6)[0], alone.draw(6)[0])


# The decoder before issue 15 (a full sort per step) against the current one, token for token.


@pytest.mark.parametrize(("sampler", "stop_bias"), SAMPLERS, ids=SAMPLER_IDS)
def test_the_same_tokens_as_the_decoder_before_issue_15(sampler, stop_bias):
    captioner = _stop_biased(EOT, stop_bias)
    images = _images(3, seed=7)

    assert captioner.generate(images, SEEDS, sampler) == before.reference_generate(captioner, images, SEEDS, sampler)


def test_the_same_tokens_as_before_on_random_weights_running_to_max_length(captioner):
    sampler = SamplerConfig(top_p=0.9, max_length=30, min_length=5)  # the bench's sampler: thousands in the nucleus
    images = _images(2, seed=8)
    seeds = [[image * 3 + caption for caption in range(3)] for image in range(2)]

    new = captioner.generate(images, seeds, sampler)

    assert new == before.reference_generate(captioner, images, seeds, sampler)
    assert all(len(tokens) == 30 for rows in new for tokens in rows)


def test_the_same_tokens_as_before_on_a_random_weight_coca_vit_b_32():
    coca = build_captioner(CaptionerConfig(id="coca", spec="open_clip:coca_ViT-B-32"))
    sampler = SamplerConfig(top_p=0.9, max_length=8, min_length=2)
    images = _images(1, seed=9)

    assert coca.generate(images, SEEDS[:1], sampler) == before.reference_generate(coca, images, SEEDS[:1], sampler)


before_sort = sampling.choose_tokens_by_sort


def _hard_logits(rows: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Rows that the sort-free nucleus must get right: peaked, flat, nearly flat, quantised to
    many exact ties, one dominant token, and a few -inf tokens."""
    scale = torch.tensor([8.0, 0.01, 1.0, 3.0])[torch.arange(rows) % 4, None]
    logits = torch.randn(rows, vocab, generator=generator) * scale
    logits[1::5] = (logits[1::5] * 4).round() / 4  # many tokens share each score
    logits[2::7, 3] = 40.0
    logits[3::6, :5] = float("-inf")
    return logits


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("top_k", [None, 3, 200])
def test_sort_free_nucleus_picks_what_the_sort_picks(top_p, top_k, monkeypatch):
    generator = torch.Generator().manual_seed(int(top_p * 1000) + (top_k or 0))
    rows, vocab = 300, 1000
    logits = _hard_logits(rows, vocab, generator)
    uniforms = torch.rand(rows, vocab, generator=generator, dtype=torch.float64)
    history = torch.randint(0, vocab, (rows, 4), generator=generator)
    sampler = SamplerConfig(top_p=top_p, top_k=top_k, temperature=0.7, repetition_penalty=1.2, min_length=0)
    by_sort = []
    monkeypatch.setattr(sampling, "choose_tokens_by_sort",
                        lambda *args: by_sort.append(len(args[0])) or before_sort(*args))

    tokens = choose_tokens(logits, history, 3, uniforms, sampler, NO_STOPS)

    assert torch.equal(tokens, before.choose_tokens(logits, history, 3, uniforms, sampler, NO_STOPS))
    assert sum(by_sort) < rows  # most rows were decided without sorting


def test_rows_sampled_in_cache_sized_chunks_pick_what_all_rows_at_once_pick(monkeypatch):
    generator = torch.Generator().manual_seed(11)
    rows, vocab = 12, 49408  # a CPU chunk holds 5 rows of CoCa's vocabulary
    logits = torch.randn(rows, vocab, generator=generator)
    uniforms = torch.rand(rows, vocab, generator=generator, dtype=torch.float64)
    history = torch.randint(0, vocab, (rows, 3), generator=generator)
    sampler = SamplerConfig(top_p=0.9, repetition_penalty=1.2, min_length=0)
    chunks = []
    chunk_rows = sampling._choose_tokens_of_rows
    monkeypatch.setattr(sampling, "_choose_tokens_of_rows", lambda *args: chunks.append(len(args[0])) or chunk_rows(*args))

    chunked = choose_tokens(logits, history, 3, uniforms, sampler, NO_STOPS)
    monkeypatch.setattr(sampling, "CPU_CHUNK_BYTES", rows * vocab * 8)
    at_once = choose_tokens(logits, history, 3, uniforms, sampler, NO_STOPS)

    assert chunks == [5, 5, 2, 12]
    assert torch.equal(chunked, at_once)
    assert torch.equal(chunked, before.choose_tokens(logits, history, 3, uniforms, sampler, NO_STOPS))


def test_the_sort_decides_rows_whose_nucleus_boundary_is_too_close_to_call():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 1.0, 0.0, -1.0]])  # row 0: four equal scores
    uniforms = torch.rand(2, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sampler = SamplerConfig(top_p=0.5, min_length=0)  # row 0: exactly half the mass before the third token
    history = torch.zeros(2, 1, dtype=torch.long)

    tokens, decided = sampling._nucleus_by_candidates(
        logits.double(), logits.double().max(-1, keepdim=True).values, logits.double() - torch.log(-torch.log(uniforms)),
        sampler.top_p)

    assert decided.tolist() == [False, True]
    assert torch.equal(choose_tokens(logits, history, 0, uniforms, sampler, NO_STOPS),
                       before.choose_tokens(logits, history, 0, uniforms, sampler, NO_STOPS))


def test_row_noise_draws_what_the_old_row_noise_drew():
    cpu = torch.device("cpu")
    new, old = RowNoise([5, 9, 2], cpu), before.RowNoise([5, 9, 2], cpu)
    assert torch.equal(new.draw(7), old.draw(7))
    keep = torch.tensor([0, 2])
    new.keep_rows(keep)
    old.keep_rows(keep)
    assert torch.equal(new.draw(7), old.draw(7))
