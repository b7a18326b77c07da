"""The reference a replayed view is judged against: what a trainer renders from stored parameters.

MobileCLIP's training loader (apple/ml-mobileclip, training/dr/transforms.py) replays a
`paug.json` entry on the PIL image its webdataset decoder gives: torchvision's
RandomResizedCrop forward with the stored box (`functional.resized_crop`), the flip,
then torchvision RandAugment's own op application with the stored (op, magnitude)
pairs, then erasing with zeros on the tensor. `reference_view` runs exactly that, with
torchvision's RandAugment op function itself (the loader calls the same one), so it is
independent of our renderers in `augment.py`; bench/bench_fidelity.py and the tests
measure both renderers against it.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.functional as pil_ops
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.autoaugment import _apply_op as torchvision_rand_augment_op

from dr_pipeline.core.config import AugmentationConfig
from dr_pipeline.core.records import RAND_AUGMENT_OPS, ViewParams


def reference_view(picture: Image.Image, params: ViewParams, cfg: AugmentationConfig) -> torch.Tensor:
    """The view as MobileCLIP's loader renders it from `picture` (a PIL RGB image), uint8 [3, S, S]."""
    size = cfg.random_resized_crop.size
    view = pil_ops.resized_crop(
        picture, *params.crop, [size, size], InterpolationMode(cfg.random_resized_crop.interpolation), antialias=True
    )
    if params.flip:
        view = pil_ops.hflip(view)
    for op, magnitude in params.rand_augment or ():
        view = torchvision_rand_augment_op(
            view, RAND_AUGMENT_OPS[op], magnitude, interpolation=InterpolationMode(cfg.rand_augment.interpolation),
            fill=None,
        )
    pixels = torch.from_numpy(np.array(view.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous()
    if params.erase is not None:
        top, left, height, width = params.erase
        pixels[:, top : top + height, left : left + width] = 0
    return pixels


def to_picture(image: torch.Tensor) -> Image.Image:
    """A decoded uint8 [3, H, W] (or [1, H, W]) tensor as the PIL RGB image a loader would hold."""
    return Image.fromarray(np.ascontiguousarray(image.expand(3, -1, -1).permute(1, 2, 0).numpy()))


def view_difference(view: torch.Tensor, reference: torch.Tensor) -> tuple[float, int]:
    """(mean absolute difference, max absolute difference) of two uint8 views, on the 0..255 scale."""
    difference = (view.cpu().int() - reference.cpu().int()).abs()
    return float(difference.float().mean()), int(difference.max())
