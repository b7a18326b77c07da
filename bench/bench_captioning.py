"""Captioning throughput: KV-cached decoding against the full-recompute reference.

Builds a captioner from a spec (default: a random-weight open_clip CoCa, no download),
decodes one batch with each decoder and prints generated tokens per second and the
speedup. For open_clip CoCa the cached decoder is ours (teachers/coca_decoding.py); for
`hf:` captioners it is transformers' generate with the model's own cache, against generate
without it, both sampling with our seeded sampler. Random weights almost never sample a stop
token, so every caption runs to --max-length: the worst case for the full-recompute
decoder, whose cost per step grows with the prefix. Both decoders should emit identical
captions (their float32 logits differ by ~1e-6, which Gumbel-max sampling absorbs; see
teachers/sampling.py). On CPU a tiny model's time goes mostly to sampling over the
vocabulary, not to the decoder.

    python bench/bench_captioning.py                                      # tiny CoCa, CPU
    python bench/bench_captioning.py --spec open_clip:coca_ViT-B-32 --device cuda --precision bf16
    python bench/bench_captioning.py --spec hf:/path/to/model_folder      # e.g. BLIP, GIT
"""

from __future__ import annotations

import argparse
import time

import torch

from dr_pipeline.config import CaptionerConfig, SamplerConfig
from teachers import build_captioner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="open_clip:dr-tiny-coca", help="captioner spec (open_clip: or hf:)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--captions", type=int, default=5, help="captions per image")
    parser.add_argument("--max-length", type=int, default=30)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per decoder; the best is reported")
    args = parser.parse_args()

    captioner = build_captioner(CaptionerConfig(id="bench", spec=args.spec), device=args.device, precision=args.precision)
    size = captioner.card.input_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, size, size), dtype=torch.uint8, generator=generator)
    seeds = [[image * args.captions + caption for caption in range(args.captions)] for image in range(args.images)]
    sampler = SamplerConfig(top_p=args.top_p, max_length=args.max_length, min_length=min(5, args.max_length - 1))

    print(
        f"{args.spec} on {args.device} ({captioner.precision}): {args.images} images x {args.captions} captions, "
        f"max_length {args.max_length}, torch threads {torch.get_num_threads()}"
    )
    results = {}
    for decoding in ("kv-cache", "full-recompute"):
        captioner.generate(images[:1], seeds[:1], sampler, decoding=decoding)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            tokens = captioner.generate(images, seeds, sampler, decoding=decoding)
            best = min(best, time.perf_counter() - start)
        captions = [caption for rows in tokens for caption in rows]
        count = sum(len(caption) for caption in captions)
        results[decoding] = (captions, count / best)
        print(f"  {decoding:>14}: {count} tokens in {best:.3f} s = {count / best:,.0f} tokens/s")

    (cached, cached_rate), (reference, reference_rate) = results["kv-cache"], results["full-recompute"]
    identical = sum(a == b for a, b in zip(cached, reference))
    print(f"  speedup {cached_rate / reference_rate:.2f}x; identical captions {identical}/{len(cached)}")


if __name__ == "__main__":
    main()
