"""Our renderers against the reference trainers run (dr_pipeline/views/fidelity.py: torchvision's PIL
path, as MobileCLIP's loader replays paug.json), on a small fixed set of hard cases: every op at
low and high magnitudes of both signs, flat greys, pure colours, a ramp, tiny and very wide images.
bench/bench_fidelity.py measures the same over >= 2000 views (README "Fidelity")."""

import numpy as np
import pytest
import torch

from dr_pipeline.core.records import RAND_AUGMENT_OPS, ViewParams
from dr_pipeline.views.augment import render_views, render_views_tensor, sample_views
from dr_pipeline.core.config import AugmentationConfig
from dr_pipeline.views.decode import decode_image
from dr_pipeline.views.fidelity import reference_view, to_picture, view_difference
from dr_pipeline.tools.sample_data import sample_records

CPU_MEAN_ABS_BOUND = 0.5  # the goal; the CPU renderer is exact (0) with this torchvision
CPU_P99_MAX_BOUND = 2
# The accelerator renderer (torchvision tensor kernels), measured by bench_fidelity.py: the worst view
# of 2280 was 4.2 mean abs diff (Equalize after a nearest-neighbour shear), 99% of views <= 1.0.
ACCELERATOR_VIEW_MEAN_ABS_BOUND = 5.0
ACCELERATOR_SET_MEAN_ABS_BOUND = 0.5
SIZE = 64
CFG = AugmentationConfig.model_validate(
    {"num_views": 6, "random_resized_crop": {"size": SIZE}, "rand_augment": {"num_ops": 2, "magnitude": 9}}
)
SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}


def _images() -> dict[str, torch.Tensor]:
    ramp = torch.linspace(0, 255, 96).round().to(torch.uint8)
    photo = next(r for r in sample_records() if r.url.endswith("chelsea.jpg"))
    return {
        "photo": decode_image(photo.image, 10**8),
        "grey": torch.full((3, 40, 60), 128, dtype=torch.uint8),
        "red": torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1).expand(3, 30, 30).contiguous(),
        "ramp": torch.stack([ramp.view(1, 96).expand(70, 96), ramp.flip(0).view(1, 96).expand(70, 96),
                             torch.full((70, 96), 90, dtype=torch.uint8)]),
        "tiny": torch.randint(0, 256, (3, 3, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
        "wide": ramp.repeat(21)[:2000].view(1, 1, 2000).expand(3, 12, 2000).contiguous(),
    }


def _magnitude(name: str, fraction: float) -> float:
    linear = {"ShearX": 0.3, "ShearY": 0.3, "TranslateX": 150 / 331 * SIZE, "TranslateY": 150 / 331 * SIZE,
              "Rotate": 30.0, "Brightness": 0.9, "Color": 0.9, "Contrast": 0.9, "Sharpness": 0.9}
    if name == "Posterize":
        return float(8 - round(fraction * 4))
    if name == "Solarize":
        return float(np.float32(255 * (1 - fraction)))
    return float(np.float32(linear.get(name, 0.0) * fraction))


def _fixed_set() -> list[tuple[str, ViewParams]]:
    """Per image: the job sampler's views, and every op alone at bins 9 and 30 of 31, both signs."""
    pairs = []
    for name, image in _images().items():
        views = sample_views(3, name, image.shape[1], image.shape[2], CFG)
        pairs += [(name, view) for view in views]
        for op, op_name in enumerate(RAND_AUGMENT_OPS):
            for fraction in (9 / 30, 1.0):
                for sign in (1.0, -1.0) if op_name in SIGNED else (1.0,):
                    pairs.append((name, ViewParams(views[0].crop, False, ((op, sign * _magnitude(op_name, fraction)),), None)))
    return pairs


@pytest.fixture(scope="module")
def differences():
    images = _images()
    pictures = {name: to_picture(image) for name, image in images.items()}
    result = {"cpu": [], "accelerator": []}
    for name, params in _fixed_set():
        reference = reference_view(pictures[name], params, CFG)
        result["cpu"].append(view_difference(render_views(images[name], [params], SIZE, CFG)[0], reference))
        result["accelerator"].append(view_difference(render_views_tensor(images[name], [params], SIZE, CFG)[0], reference))
    return {renderer: np.array(values) for renderer, values in result.items()}


def test_the_fixed_set_covers_every_op_and_the_hard_cases():
    pairs = _fixed_set()
    used = {RAND_AUGMENT_OPS[op] for _, params in pairs for op, _ in params.rand_augment or ()}
    assert used == set(RAND_AUGMENT_OPS) and len(pairs) >= 300
    assert {name for name, _ in pairs} == set(_images())


def test_cpu_renderer_equals_the_reference(differences):
    means, maxima = differences["cpu"][:, 0], differences["cpu"][:, 1]
    assert means.max() <= CPU_MEAN_ABS_BOUND and np.percentile(maxima, 99) <= CPU_P99_MAX_BOUND
    assert maxima.max() == 0  # the same PIL ops: pixel for pixel


def test_accelerator_renderer_stays_within_its_documented_bound(differences):
    means = differences["accelerator"][:, 0]
    assert means.max() <= ACCELERATOR_VIEW_MEAN_ABS_BOUND and means.mean() <= ACCELERATOR_SET_MEAN_ABS_BOUND
    assert differences["accelerator"][:, 1].max() > 0  # it is another kernel: the bound is not vacuous here
