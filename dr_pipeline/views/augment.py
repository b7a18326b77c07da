"""The K augmented views of an image: sampled as parameters, rendered from them.

Generation stores only `ViewParams` (core/records.py); trainers, `show` and `verify` replay a
view by calling `render_view` on the decoded original with the stored
parameters. Sampling is a pure function of (run seed, sample key, view index,
image size, config), so any subset of a dataset can be recomputed anywhere.

Two renderers, one reference:
- `render_view` / `render_views` / `render_picture_view` (the CPU renderer, used by
  generation and every replay; the last renders from a decoded PIL picture into a
  channels-last buffer, the training loader's way) run the reference itself: torchvision's functional ops on PIL images,
  the path trainers run (MobileCLIP's loader: `resized_crop` with the stored
  box, then torchvision RandAugment's op mapping on the PIL view). Its views
  equal the reference's pixel for pixel (bench/bench_fidelity.py, README "Fidelity").
- `render_views_tensor` (`resources.render_views_on: accelerator`) runs the same
  ops as torchvision tensor kernels on the image's device; they round unlike
  PIL in a few places (resampling filters, the grey of Color and Contrast), a
  measured bound documented in the README.

Order of operations (fixed): random resized crop, horizontal flip,
RandAugment, random erasing. The parameter distributions follow torchvision's
RandomResizedCrop, RandAugment and RandomErasing, drawn from our own seeded
numpy generator instead of torch's global one.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as pil_ops
import torchvision.transforms.v2.functional as tensor_ops
from PIL import Image
from torchvision.transforms import InterpolationMode

from dr_pipeline.core.config import AugmentationConfig
from dr_pipeline.core.records import RAND_AUGMENT_OPS, ViewParams
from dr_pipeline.core.seeding import derive_seed

# Ops whose magnitude is negated with probability 1/2, as in torchvision's RandAugment.
_SIGNED_OPS = frozenset(
    {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}
)
_UNSIGNED_OPS = frozenset({"Identity", "Posterize", "Solarize", "AutoContrast", "Equalize"})
if set(RAND_AUGMENT_OPS) != _SIGNED_OPS | _UNSIGNED_OPS or len(RAND_AUGMENT_OPS) != 14:
    raise RuntimeError(f"schema rand_augment_ops {RAND_AUGMENT_OPS} do not match the ops this renderer implements")

_ATTEMPTS = 10  # tries before the crop falls back to a centre crop / erasing gives up, as in torchvision


def _float32(value: float) -> float:
    """Magnitudes are stored as float32; keeping them float32-exact in memory makes a view
    rendered at generation identical to one replayed from the stored record."""
    return float(np.float32(value))


@lru_cache(maxsize=64)
def _magnitudes(num_bins: int, magnitude_bin: int, view_size: int) -> tuple[float, ...]:
    """Unsigned magnitude of each op at `magnitude_bin`, in RAND_AUGMENT_OPS order.

    torchvision's RandAugment magnitude space (up to float32 rounding): linear
    ranges from 0 at bin 0 to their maximum at the last bin, translation up to
    150/331 of the view side, Solarize thresholds from 255 down to 0, Posterize
    from 8 bits down to 4.
    """
    fraction = magnitude_bin / (num_bins - 1)
    translate = 150.0 / 331.0 * view_size * fraction
    table = {
        "Identity": 0.0,
        "ShearX": 0.3 * fraction,
        "ShearY": 0.3 * fraction,
        "TranslateX": translate,
        "TranslateY": translate,
        "Rotate": 30.0 * fraction,
        "Brightness": 0.9 * fraction,
        "Color": 0.9 * fraction,
        "Contrast": 0.9 * fraction,
        "Sharpness": 0.9 * fraction,
        "Posterize": float(8 - round(magnitude_bin / ((num_bins - 1) / 4))),
        "Solarize": 255.0 * (1.0 - fraction),
        "AutoContrast": 0.0,
        "Equalize": 0.0,
    }
    return tuple(_float32(table[name]) for name in RAND_AUGMENT_OPS)


def _sample_crop(
    rng: np.random.Generator, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params with our generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
        crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return top, left, crop_height, crop_width
    # Centre crop with the aspect ratio clamped into `ratio`; at least one pixel
    # even when a ratio far from the image's would round a side to 0.
    image_ratio = width / height
    if image_ratio < ratio[0]:
        crop_width, crop_height = width, max(1, int(round(width / ratio[0])))
    elif image_ratio > ratio[1]:
        crop_width, crop_height = max(1, int(round(height * ratio[1]))), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def _sample_rand_augment(
    rng: np.random.Generator, num_ops: int, magnitudes: tuple[float, ...]
) -> tuple[tuple[int, float], ...]:
    ops = []
    for _ in range(num_ops):
        op = int(rng.integers(len(RAND_AUGMENT_OPS)))
        magnitude = magnitudes[op]
        if RAND_AUGMENT_OPS[op] in _SIGNED_OPS and rng.random() < 0.5 and magnitude != 0.0:
            magnitude = -magnitude
        ops.append((op, magnitude))
    return tuple(ops)


def _sample_erase(
    rng: np.random.Generator, view_size: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int] | None:
    """torchvision RandomErasing.get_params with our generator (ratio is height / width);
    None when no attempt fits, where torchvision would return the whole image unchanged."""
    area = view_size * view_size
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(_ATTEMPTS):
        erase_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        erase_height = int(round(math.sqrt(erase_area * aspect_ratio)))
        erase_width = int(round(math.sqrt(erase_area / aspect_ratio)))
        if 0 < erase_height < view_size and 0 < erase_width < view_size:
            top = int(rng.integers(0, view_size - erase_height + 1))
            left = int(rng.integers(0, view_size - erase_width + 1))
            return top, left, erase_height, erase_width
    return None


def sample_view_params(
    seed: int, key: str, index: int, height: int, width: int, cfg: AugmentationConfig
) -> ViewParams:
    """The parameters of view `index` of sample `key`: a pure function of the arguments.

    Draw order: crop attempts, flip gate, RandAugment gate and ops, erasing gate
    and attempts. A gate is drawn whatever its probability, so changing one
    stage's p does not reshuffle the stages drawn before it.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be at least 1x1, got {height}x{width}")
    rng = np.random.Generator(np.random.PCG64(derive_seed(seed, key, "view", index)))
    crop_cfg = cfg.random_resized_crop
    crop = _sample_crop(rng, height, width, crop_cfg.scale, crop_cfg.ratio)
    flip = bool(rng.random() < cfg.horizontal_flip.p)
    rand_augment = None
    if rng.random() < cfg.rand_augment.p:
        ra_cfg = cfg.rand_augment
        magnitudes = _magnitudes(ra_cfg.num_magnitude_bins, ra_cfg.magnitude, crop_cfg.size)
        rand_augment = _sample_rand_augment(rng, ra_cfg.num_ops, magnitudes)
    erase = None
    if rng.random() < cfg.random_erasing.p:
        erase = _sample_erase(rng, crop_cfg.size, cfg.random_erasing.scale, cfg.random_erasing.ratio)
    return ViewParams(crop=crop, flip=flip, rand_augment=rand_augment, erase=erase)


def sample_views(seed: int, key: str, height: int, width: int, cfg: AugmentationConfig) -> list[ViewParams]:
    """The cfg.num_views views of one sample, index 0..K-1."""
    return [sample_view_params(seed, key, index, height, width, cfg) for index in range(cfg.num_views)]


def center_view_params(height: int, width: int) -> ViewParams:
    """The largest centred square, unaugmented: the view captioners see."""
    side = min(height, width)
    crop = ((height - side) // 2, (width - side) // 2, side, side)
    return ViewParams(crop=crop, flip=False, rand_augment=None, erase=None)


def _apply_op(view: Any, name: str, magnitude: float, interpolation: InterpolationMode, pixel_scale: float) -> Any:
    """One RandAugment op through torchvision's public functional API, mapped from
    (name, magnitude) as torchvision's RandAugment maps them (so as MobileCLIP's loader
    replays them). `view` is a PIL image (the reference path: torchvision.transforms.functional)
    or a uint8 tensor (torchvision.transforms.v2.functional); pixels moved in from outside
    the view are 0 (fill=None)."""
    ops = pil_ops if isinstance(view, Image.Image) else tensor_ops
    if name == "Identity":
        return view
    if name in ("ShearX", "ShearY"):
        angle = math.degrees(math.atan(magnitude))
        shear = [angle, 0.0] if name == "ShearX" else [0.0, angle]
        return ops.affine(
            view, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=interpolation, center=[0, 0]
        )
    if name in ("TranslateX", "TranslateY"):
        pixels = int(magnitude * pixel_scale)
        translate = [pixels, 0] if name == "TranslateX" else [0, pixels]
        return ops.affine(view, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0], interpolation=interpolation)
    if name == "Rotate":
        return ops.rotate(view, magnitude, interpolation=interpolation)
    if name == "Brightness":
        return ops.adjust_brightness(view, 1.0 + magnitude)
    if name == "Color":
        return ops.adjust_saturation(view, 1.0 + magnitude)
    if name == "Contrast":
        return ops.adjust_contrast(view, 1.0 + magnitude)
    if name == "Sharpness":
        return ops.adjust_sharpness(view, 1.0 + magnitude)
    if name == "Posterize":
        return ops.posterize(view, int(magnitude))
    if name == "Solarize":
        return ops.solarize(view, magnitude)
    if name == "AutoContrast":
        return ops.autocontrast(view)
    return ops.equalize(view)


def _check_image(image: torch.Tensor) -> torch.Tensor:
    """The decoded original as uint8 [3, H, W]; a single-channel image is broadcast to RGB."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected a uint8 image [3, H, W] or [1, H, W], got {image.dtype} {list(image.shape)}")
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def _check_crop(params: ViewParams, height: int, width: int) -> None:
    top, left, crop_height, crop_width = params.crop
    if top + crop_height > height or left + crop_width > width:
        raise ValueError(
            f"crop {params.crop} does not fit the {height}x{width} image: "
            "parameters replayed on another image or decode orientation?"
        )


def render_view(image: torch.Tensor, params: ViewParams, size: int, cfg: AugmentationConfig) -> torch.Tensor:
    """The view `params` of the original `image` (uint8 [3, H, W]) as uint8 [3, size, size],
    rendered on the CPU by the reference PIL path.

    Pixel quantities of the parameters (translation, erasing box) are in pixels of
    the configured view size; rendered at another `size` they are scaled to it, so
    the picture is the same view at another resolution.
    """
    return render_views(image, [params], size, cfg)[0]


def render_views(
    image: torch.Tensor, params: Sequence[ViewParams], size: int, cfg: AugmentationConfig
) -> torch.Tensor:
    """Every view of one decoded image, uint8 [len(params), 3, size, size] on the CPU, rendered
    by the reference PIL path (the image is converted to PIL once for all its views)."""
    image = _check_image(image)
    picture = Image.fromarray(np.ascontiguousarray(image.cpu().permute(1, 2, 0).numpy()))
    views = np.empty((len(params), size, size, 3), dtype=np.uint8)
    for target, view_params in zip(views, params):
        render_picture_view(picture, view_params, size, cfg, out=target)
    return torch.from_numpy(views).permute(0, 3, 1, 2).contiguous()


def render_picture_view(
    picture: Image.Image, params: ViewParams, size: int, cfg: AugmentationConfig, out: np.ndarray | None = None
) -> np.ndarray:
    """The view `params` of a decoded RGB picture (`decode.decode_picture`) as uint8 [size, size, 3],
    written into `out` when given: the reference PIL path in PIL's own channels-last layout, so a
    loader rendering into its batch buffer transposes nothing per view. The pixels of `render_view`:
    torchvision's RandomResizedCrop, RandomHorizontalFlip and RandAugment on the PIL image given these
    parameters, then erasing on the uint8 result, as on a tensor."""
    if picture.mode != "RGB":
        raise ValueError(f"expected an RGB picture, got mode {picture.mode}")
    _check_crop(params, picture.height, picture.width)
    view = pil_ops.resized_crop(
        picture, *params.crop, [size, size], interpolation=InterpolationMode(cfg.random_resized_crop.interpolation)
    )
    if params.flip:
        view = pil_ops.hflip(view)
    view = _rand_augment(view, params, size, cfg)
    if out is None:
        out = np.empty((size, size, 3), dtype=np.uint8)
    out[...] = np.asarray(view)
    box = _erase_box(params, size, cfg)
    if box is not None:
        top, left, height, width = box
        out[top : top + height, left : left + width] = 0
    return out


def render_views_tensor(
    image: torch.Tensor, params: Sequence[ViewParams], size: int, cfg: AugmentationConfig
) -> torch.Tensor:
    """The same views rendered with torchvision's tensor kernels on the image's device
    (`render_views_on: accelerator`): within the README's measured bound of the reference."""
    image = _check_image(image)
    views = torch.empty((len(params), 3, size, size), dtype=torch.uint8, device=image.device)
    for index, view_params in enumerate(params):
        views[index] = _render_tensor(image, view_params, size, cfg)
    return views


def _render_tensor(image: torch.Tensor, params: ViewParams, size: int, cfg: AugmentationConfig) -> torch.Tensor:
    _check_crop(params, image.shape[1], image.shape[2])
    view = tensor_ops.resized_crop(
        image,
        *params.crop,
        [size, size],
        interpolation=InterpolationMode(cfg.random_resized_crop.interpolation),
        antialias=True,
    )
    if params.crop[2:] == (size, size):
        # Nothing was resampled, so `view` is a slice of the caller's image: own it.
        view = view.clone(memory_format=torch.contiguous_format)
    if params.flip:
        view = tensor_ops.hflip(view)
    return _erase(_rand_augment(view, params, size, cfg), params, size, cfg)


def _rand_augment(view: Any, params: ViewParams, size: int, cfg: AugmentationConfig) -> Any:
    pixel_scale = size / cfg.random_resized_crop.size
    interpolation = InterpolationMode(cfg.rand_augment.interpolation)
    for op, magnitude in params.rand_augment or ():
        view = _apply_op(view, RAND_AUGMENT_OPS[op], magnitude, interpolation, pixel_scale)
    return view


def _erase_box(params: ViewParams, size: int, cfg: AugmentationConfig) -> tuple[int, int, int, int] | None:
    """The erasing box (top, left, height, width) in pixels of a view rendered at `size`."""
    if params.erase is None:
        return None
    pixel_scale = size / cfg.random_resized_crop.size
    top, left, height, width = (int(round(v * pixel_scale)) for v in params.erase)
    return top, left, height, width


def _erase(view: torch.Tensor, params: ViewParams, size: int, cfg: AugmentationConfig) -> torch.Tensor:
    box = _erase_box(params, size, cfg)
    if box is not None:
        top, left, height, width = box
        view[:, top : top + height, left : left + width] = 0
    return view
