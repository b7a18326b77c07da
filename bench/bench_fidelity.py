"""Fidelity of our view renderers against the reference trainers run (dr_pipeline/views/fidelity.py).

(image, view) pairs: the DataCompDR-12M job's sampler (K views per image) over the bundled
photographs and synthetic hard cases (flat greys, pure colours, gradients, tiny, very wide and
very tall images), plus a sweep of every RandAugment op at magnitude bins 0..30, both signs,
on a few of them. For each renderer (the CPU one, augment.render_views; the accelerator one,
augment.render_views_tensor, on CPU torch) it prints the distribution of the per-view mean
absolute difference and max pixel difference against the reference, the worst ops, and
whether the goal holds (every view <= 0.5 mean abs diff, p99 of max pixel diff <= 2).

    PYTHONPATH=. python bench/bench_fidelity.py            # >= 2000 pairs
    PYTHONPATH=. python bench/bench_fidelity.py --views 8  # quicker
    PYTHONPATH=. python bench/bench_fidelity.py --device cuda  # the accelerator renderer on a GPU
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import yaml

from dr_pipeline.core.records import RAND_AUGMENT_OPS, ViewParams
from dr_pipeline.views.augment import render_views, render_views_tensor, sample_views
from dr_pipeline.core.config import AugmentationConfig
from dr_pipeline.views.decode import ImageRejected, decode_image
from dr_pipeline.views.fidelity import reference_view, to_picture, view_difference
from dr_pipeline.tools.sample_data import sample_records

MEAN_ABS_GOAL = 0.5
P99_MAX_GOAL = 2
MAGNITUDE_BINS = (0, 3, 9, 15, 22, 30)
SIGNED_OPS = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}


def datacompdr_augmentation(num_views: int) -> AugmentationConfig:
    with open("jobs/datacompdr-12m.yaml") as file:
        section = yaml.safe_load(file)["augmentation"]
    return AugmentationConfig.model_validate({**section, "num_views": num_views})


def synthetic_images() -> dict[str, torch.Tensor]:
    """Hard cases: flat areas (Contrast and Color rounding), saturated colours, smooth ramps,
    images smaller than a view, extreme aspect ratios."""
    images = {}
    for level in (0, 1, 127, 128, 254, 255):
        images[f"grey-{level}"] = torch.full((3, 64, 96), level, dtype=torch.uint8)
    for name, rgb in {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}.items():
        images[name] = torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand(3, 80, 120).contiguous()
    ramp = torch.linspace(0, 255, 256).round().to(torch.uint8)
    images["gradient-horizontal"] = ramp.view(1, 1, 256).expand(3, 200, 256).contiguous()
    images["gradient-vertical-colour"] = torch.stack(
        [ramp.view(256, 1).expand(256, 180), ramp.flip(0).view(256, 1).expand(256, 180), torch.full((256, 180), 90, dtype=torch.uint8)]
    )
    generator = torch.Generator().manual_seed(0)
    images["tiny-1x1"] = torch.tensor([200, 30, 90], dtype=torch.uint8).view(3, 1, 1)
    images["tiny-3x5-noise"] = torch.randint(0, 256, (3, 3, 5), dtype=torch.uint8, generator=generator)
    images["tiny-12x9-noise"] = torch.randint(0, 256, (3, 12, 9), dtype=torch.uint8, generator=generator)
    images["wide-20x2000"] = (ramp.repeat(8)[:2000].view(1, 1, 2000) ^ torch.arange(20, dtype=torch.uint8).view(1, 20, 1)).expand(3, 20, 2000).contiguous()
    images["tall-1500x16"] = torch.randint(0, 256, (3, 1500, 16), dtype=torch.uint8, generator=generator)
    return images


def photographs() -> dict[str, torch.Tensor]:
    images = {}
    for record in sample_records():
        try:
            images[record.url.rsplit("/", 1)[1]] = decode_image(record.image, 10**8)
        except ImageRejected:
            continue  # the bundled truncated JPEG
    return images


@dataclass
class Pair:
    image: str
    params: ViewParams


def op_sweep(image: str, height: int, width: int, cfg: AugmentationConfig) -> list[Pair]:
    """Every op at every magnitude bin in MAGNITUDE_BINS, both signs, on one crop of `image`."""
    base = sample_views(1, image, height, width, cfg)[0]
    pairs = []
    for bin_ in MAGNITUDE_BINS:
        fraction = bin_ / (cfg.rand_augment.num_magnitude_bins - 1)
        table = {
            "Identity": 0.0, "ShearX": 0.3 * fraction, "ShearY": 0.3 * fraction,
            "TranslateX": 150 / 331 * cfg.random_resized_crop.size * fraction,
            "TranslateY": 150 / 331 * cfg.random_resized_crop.size * fraction,
            "Rotate": 30 * fraction, "Brightness": 0.9 * fraction, "Color": 0.9 * fraction,
            "Contrast": 0.9 * fraction, "Sharpness": 0.9 * fraction,
            "Posterize": float(8 - round(bin_ / ((cfg.rand_augment.num_magnitude_bins - 1) / 4))),
            "Solarize": 255.0 * (1 - fraction), "AutoContrast": 0.0, "Equalize": 0.0,
        }
        for op, name in enumerate(RAND_AUGMENT_OPS):
            for sign in (1.0, -1.0) if name in SIGNED_OPS else (1.0,):
                magnitude = float(np.float32(sign * table[name]))
                pairs.append(Pair(image, ViewParams(base.crop, False, ((op, magnitude),), None)))
    return pairs


def summarise(name: str, means: np.ndarray, maxima: np.ndarray) -> bool:
    ok = bool(means.max() <= MEAN_ABS_GOAL and np.percentile(maxima, 99) <= P99_MAX_GOAL)
    print(
        f"{name:<26} views {len(means):>5}  mean abs diff: mean {means.mean():.4f} p99 {np.percentile(means, 99):.4f} "
        f"max {means.max():.4f} | max pixel diff: mean {maxima.mean():.2f} p99 {np.percentile(maxima, 99):.1f} "
        f"max {maxima.max()}  goal {'met' if ok else 'NOT met'}"
    )
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--views", type=int, default=48, help="views sampled per image (job sampler)")
    parser.add_argument("--sweep-images", type=int, default=4, help="images the op x magnitude sweep runs on")
    parser.add_argument("--device", default="cpu", help="device of the accelerator renderer, e.g. cuda")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = datacompdr_augmentation(args.views)
    images = {**photographs(), **synthetic_images()}
    pairs = [
        Pair(name, params)
        for name, image in images.items()
        for params in sample_views(0, name, image.shape[1], image.shape[2], cfg)
    ]
    sweep_images = ["chelsea.jpg", "grey-128", "gradient-vertical-colour", "color.png", "tiny-3x5-noise"][: args.sweep_images]
    for name in sweep_images:
        pairs += op_sweep(name, images[name].shape[1], images[name].shape[2], cfg)
    device = torch.device(args.device)

    def on_device(image: torch.Tensor, params: list[ViewParams], size: int, cfg: AugmentationConfig) -> torch.Tensor:
        return render_views_tensor(image.to(device), params, size, cfg).cpu()

    renderers = {"cpu (render_views)": render_views, f"accelerator (tensor, {device.type})": on_device}
    results = {name: ([], [], []) for name in renderers}
    size = cfg.random_resized_crop.size
    pictures = {name: to_picture(image) for name, image in images.items()}
    for pair in pairs:
        reference = reference_view(pictures[pair.image], pair.params, cfg)
        for name, render in renderers.items():
            view = render(images[pair.image], [pair.params], size, cfg)[0]
            mean, maximum = view_difference(view, reference)
            ops = tuple(RAND_AUGMENT_OPS[op] for op, _ in pair.params.rand_augment or ()) or ("crop only",)
            results[name][0].append(mean)
            results[name][1].append(maximum)
            results[name][2].append((mean, maximum, ops, pair.image))
    print(f"{len(pairs)} (image, view) pairs over {len(images)} images ({len(photographs())} photographs); "
          f"DataCompDR-12M augmentation, view {size}px, torch {torch.__version__}")
    for name in renderers:
        summarise(name, np.array(results[name][0]), np.array(results[name][1]))
        by_op: dict[str, list[float]] = defaultdict(list)
        for mean, maximum, ops, _ in results[name][2]:
            for op in ops:
                by_op[op].append(mean)
        worst = sorted(by_op.items(), key=lambda item: -max(item[1]))[:4]
        print("    worst ops (max mean abs diff of views using them): "
              + ", ".join(f"{op} {max(values):.3f}" for op, values in worst))
        worst_view = max(results[name][2])
        print(f"    worst view: {worst_view[3]} ops {worst_view[2]} mean {worst_view[0]:.3f} max {worst_view[1]}")
    speed(images, cfg, renderers)


def speed(images: dict[str, torch.Tensor], cfg: AugmentationConfig, renderers: dict) -> None:
    """Rendering cost as in a unit task: all K views of each photograph in one call, one thread."""
    photos = [image for name, image in images.items() if "." in name]
    size = cfg.random_resized_crop.size
    seconds = {}
    for name, render in renderers.items():
        start = time.perf_counter()
        views = 0
        for index, image in enumerate(photos):
            params = sample_views(9, str(index), image.shape[1], image.shape[2], cfg)
            views += len(render(image, params, size, cfg))
        seconds[name] = (time.perf_counter() - start) / views
    cpu, tensor = seconds.values()
    print(f"render speed, {cfg.num_views} views per call over {len(photos)} photographs: "
          + ", ".join(f"{name} {1000 * value:.2f} ms/view" for name, value in seconds.items())
          + f"; cpu / accelerator-on-cpu time {cpu / tensor:.2f}")


if __name__ == "__main__":
    main()
