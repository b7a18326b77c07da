"""Captioning throughput: the decoder before issue 15 against the current one, side by side.

Builds a captioner from a spec (default: the tiny random-weight open_clip CoCa, no download),
decodes the same images and seeds with both decoders and prints captions/s and tokens/s of
each, the speedup, and how many captions are identical (all of them, or the bench says so).
"Before" is the frozen copy of the old decoder in tests/teachers/captioning_reference.py (a full
vocabulary sort per step for top_p, a [rows, V] stack of fresh draws per step, one cache
tensor per layer copied when rows finish); "after" is the captioner's own generate. For `hf:`
captioners both run transformers' generate, with the old and the new sampler.

Random weights almost never sample a stop token, so every caption runs to --max-length, and
their nearly flat distributions put thousands of tokens in the top_p nucleus: the worst case
for the sampler.

    python bench/bench_captioning.py                                          # tiny CoCa, CPU
    python bench/bench_captioning.py --spec open_clip:coca_ViT-B-32 --images 4 --repeats 1
    python bench/bench_captioning.py --spec open_clip:coca_ViT-L-14 --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dr_pipeline.core.config import CaptionerConfig, SamplerConfig  # noqa: E402
from teachers import build_captioner  # noqa: E402
from tests.teachers import captioning_reference as before  # noqa: E402


@contextlib.contextmanager
def old_hf_sampler():
    """The hf captioner's generate with the sampler of before issue 15."""
    from teachers import hf_adapter  # noqa: PLC0415

    saved = hf_adapter.choose_tokens, hf_adapter.RowNoise
    hf_adapter.choose_tokens, hf_adapter.RowNoise = before.choose_tokens, before.RowNoise
    try:
        yield
    finally:
        hf_adapter.choose_tokens, hf_adapter.RowNoise = saved


def decode_before(captioner, images, seeds, sampler):
    if captioner.card.kind == "hf":
        with old_hf_sampler():
            return captioner.generate(images, seeds, sampler)
    return before.reference_generate(captioner, images, seeds, sampler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="open_clip:dr-tiny-coca", help="captioner spec (open_clip: or hf:)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--captions", type=int, default=5, help="captions per image")
    parser.add_argument("--max-length", type=int, default=30)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per decoder; the best is reported")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    captioner = build_captioner(CaptionerConfig(id="bench", spec=args.spec), device=args.device, precision=args.precision)
    size = captioner.card.input_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, size, size), dtype=torch.uint8, generator=generator)
    seeds = [[image * args.captions + caption for caption in range(args.captions)] for image in range(args.images)]
    sampler = SamplerConfig(top_p=args.top_p, max_length=args.max_length, min_length=min(5, args.max_length - 1))

    print(f"{args.spec} on {args.device} ({captioner.precision}): {args.images} images x {args.captions} captions, "
          f"max_length {args.max_length}, top_p {args.top_p}, torch threads {torch.get_num_threads()}")
    results = {}
    decoders = {"before": lambda: decode_before(captioner, images, seeds, sampler),
                "after": lambda: captioner.generate(images, seeds, sampler)}
    for _ in range(args.repeats):  # alternate, so both see the same machine load
        for name, decode in decoders.items():
            if name not in results:
                decode_before(captioner, images[:1], seeds[:1], sampler) if name == "before" else \
                    captioner.generate(images[:1], seeds[:1], sampler)  # warm-up
            start = time.perf_counter()
            tokens = decode()
            seconds = time.perf_counter() - start
            if name not in results or seconds < results[name][1]:
                results[name] = ([caption for rows in tokens for caption in rows], seconds)
    for name, (captions, seconds) in results.items():
        count = sum(len(caption) for caption in captions)
        print(f"  {name:>6}: {len(captions)} captions, {count} tokens in {seconds:.3f} s = "
              f"{len(captions) / seconds:,.2f} captions/s, {count / seconds:,.0f} tokens/s")
    (old, old_seconds), (new, new_seconds) = results["before"], results["after"]
    identical = sum(a == b for a, b in zip(old, new))
    print(f"  speedup {old_seconds / new_seconds:.2f}x captions/s; identical captions {identical}/{len(old)}")


if __name__ == "__main__":
    main()
