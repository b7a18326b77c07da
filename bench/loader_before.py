"""The training loader's decode and render as they were before they rendered from the decoded PIL picture
(frozen at commit 9508bf3), so bench_reader.py measures "before" and "after" side by side in one run.

Before: the original was decoded into a contiguous uint8 [3, H, W] tensor (EXIF transpose copy, convert
copy, numpy copy, transposing copy), turned back into a PIL image for every render (transposing copy,
PIL copy), each view copied out of PIL and transposed into a CHW tensor, and the batch normalised from
contiguous CHW. Same pixels as now (the bench checks it); the error handling of decode.decode_image is
left out (the bench's images are valid).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as pil_ops
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode

from dr_pipeline.core.config import AugmentationConfig
from dr_pipeline.core.records import ViewParams
from dr_pipeline.read.replay import ViewRenderer, dataset_job
from dr_pipeline.read.torch_dataset import ReinforcedTorchDataset
from dr_pipeline.views.augment import _check_crop, _check_image, _erase, _rand_augment
from dr_pipeline.views.decode import _WHITE, _WIDE_GREY_MODES, WEB_IMAGE_FORMATS, ImageRejected, _grey_to_rgb


def decode_image(data: bytes, max_pixels: int) -> torch.Tensor:
    with Image.open(io.BytesIO(data), formats=WEB_IMAGE_FORMATS) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageRejected("image_too_large", f"{width}x{height}")
        image.load()
        pixels = _rgb_array(ImageOps.exif_transpose(image))
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _rgb_array(image: Image.Image) -> np.ndarray:
    if image.mode in _WIDE_GREY_MODES:
        grey = np.asarray(image).astype(np.int64).clip(0, 65535)
        return _grey_to_rgb(((grey * 255 + 32767) // 65535).astype(np.uint8))
    if image.mode == "F":
        grey = np.nan_to_num(np.asarray(image), nan=0.0).clip(0, 255)
        return _grey_to_rgb(np.rint(grey).astype(np.uint8))
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba)
    return np.array(image.convert("RGB"))


def render_view(image: torch.Tensor, params: ViewParams, size: int, cfg: AugmentationConfig) -> torch.Tensor:
    image = _check_image(image)
    picture = Image.fromarray(np.ascontiguousarray(image.cpu().permute(1, 2, 0).numpy()))
    views = torch.empty((1, 3, size, size), dtype=torch.uint8)
    views[0] = _render_pil(picture, params, size, cfg)
    return views[0]


def _render_pil(picture: Image.Image, params: ViewParams, size: int, cfg: AugmentationConfig) -> torch.Tensor:
    _check_crop(params, picture.height, picture.width)
    view = pil_ops.resized_crop(
        picture, *params.crop, [size, size], interpolation=InterpolationMode(cfg.random_resized_crop.interpolation)
    )
    if params.flip:
        view = pil_ops.hflip(view)
    view = _rand_augment(view, params, size, cfg)
    pixels = torch.from_numpy(np.array(view, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return _erase(pixels, params, size, cfg)


class RendererBefore(ViewRenderer):
    """ViewRenderer.render as it was: the tensor original, back to PIL for every view."""

    def render(self, row: dict[str, Any], index: int, size: int | None = None) -> torch.Tensor:
        image = decode_image(row["image"], self.max_image_pixels)
        return render_view(image, row["aug"][index], size or self.view_size, self.augmentation)


class TorchDatasetBefore(ReinforcedTorchDataset):
    """ReinforcedTorchDataset with the renderer and the batch's image assembly as they were."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.renderer = RendererBefore(dataset_job(self.dataset))

    def _images(self, rows: list[dict[str, Any]], views: list[int]) -> torch.Tensor:
        pixels = torch.empty((len(rows), 3, self.image_size, self.image_size), dtype=torch.uint8)
        for target, row, view in zip(pixels, rows, views):
            target.copy_(self.renderer.render(row, view, self.image_size))
        return pixels.float().div_(255).sub_(self.mean).div_(self.std)
