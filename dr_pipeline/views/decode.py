"""Decode an input image once, into the uint8 RGB tensor every view is rendered from.

Untrusted bytes, so:
- only web image formats are opened (JPEG incl. camera MPO, PNG, WebP, GIF,
  BMP, TIFF, AVIF): Pillow's EPS plugin, for one, hands its data to Ghostscript;
- the pixel count is checked from the header, before any pixel is decoded;
- the decode is forced to the end, so a truncated file is rejected rather than
  padded with grey (Pillow's LOAD_TRUNCATED_IMAGES must stay False);
- Pillow's own global limits are left alone: its MAX_IMAGE_PIXELS bomb check
  still runs at open, and an image over twice that is rejected as too large
  even when max_pixels would allow it.

The decode rule (part of the dataset contract: the generator, `show`, `verify`,
`--extend` and the reader's replay decode with `decode_image`, the PyTorch dataset's
loader with `decode_picture`, its PIL form, and the export hands consumers the same pixels):
1. the first frame of an animation (GIF, APNG, WebP, MPO) is the image;
2. EXIF orientation is applied (crop boxes are in upright pixels);
3. transparency (an alpha channel, or a palette or colour-key transparency entry)
   is composited on white (255, 255, 255), as img2dataset does when it re-encodes
   downloaded images (DataComp, LAION);
4. 16-bit and 32-bit integer greys are scaled from 0..65535 to 0..255 (rounded);
   float greys are read on Pillow's own 0..255 scale;
5. every other mode (CMYK, YCbCr, LAB, L, 1, P without transparency, ...) goes to
   8-bit RGB by Pillow's `convert("RGB")` (no ICC colour management).
Where the result differs from `Image.open(bytes).convert("RGB")`, what training loaders
do (`differs_from_plain_decode`), the export writes `normalised_png` instead of the original.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from dr_pipeline.core.errors import error_line

Image.init()
WEB_IMAGE_FORMATS = tuple(
    name for name in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF") if name in Image.OPEN
)
_WIDE_GREY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_WHITE = (255, 255, 255, 255)


class ImageRejected(Exception):
    """An image that cannot be used; `reason` is a schema failure_reasons key, `detail` one line."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_image(data: bytes, max_pixels: int) -> torch.Tensor:
    """The upright image as a contiguous uint8 tensor [3, H, W] on the CPU."""
    return torch.from_numpy(np.array(decode_picture(data, max_pixels))).permute(2, 0, 1).contiguous()


def decode_picture(data: bytes, max_pixels: int) -> Image.Image:
    """The upright image as an RGB PIL image: `decode_image`'s pixels in the form the CPU renderer
    works on, so a loader that renders from it copies and transposes nothing (an upright RGB
    JPEG is the decoder's own image, untouched)."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True in this process; "
            "truncated images would decode silently, refusing to decode"
        )
    try:
        with Image.open(io.BytesIO(data), formats=WEB_IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected(
                    "image_too_large", f"{width}x{height} is {width * height} pixels, over the limit of {max_pixels}"
                )
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            return _rgb_picture(image)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as error:
        raise ImageRejected("image_too_large", error_line(error, with_type=True)) from None
    except UnidentifiedImageError:
        raise ImageRejected(
            "undecodable_image", f"not an image in a supported format ({', '.join(WEB_IMAGE_FORMATS)})"
        ) from None
    except MemoryError:
        raise
    except Exception as error:  # Pillow's decoders raise many types on malformed data; all mean "bad bytes"
        raise ImageRejected("undecodable_image", error_line(error, with_type=True)) from None


def differs_from_plain_decode(data: bytes, max_pixels: int) -> bool:
    """Whether a plain loader sees other pixels than `decode_image` gives.

    A plain loader is `Image.open(data).convert("RGB")`, or webdataset's "pilrgba" decode
    then `convert("RGB")` (MobileCLIP's). Cheap for the common case: an RGB or grey image
    without transparency or EXIF rotation is plain from its header alone.
    """
    with Image.open(io.BytesIO(data), formats=WEB_IMAGE_FORMATS) as image:
        if image.mode in ("RGB", "L") and not image.has_transparency_data and _orientation(image) == 1:
            return False
        image.load()
        plain = (np.asarray(image.convert("RGB")), np.asarray(image.convert("RGBA").convert("RGB")))
    pixels = decode_image(data, max_pixels).permute(1, 2, 0).numpy()
    return not all(loaded.shape == pixels.shape and np.array_equal(loaded, pixels) for loaded in plain)


def normalised_png(data: bytes, max_pixels: int) -> bytes:
    """The image as `decode_image` gives it, encoded losslessly as an RGB PNG."""
    buffer = io.BytesIO()
    Image.fromarray(decode_image(data, max_pixels).permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def _orientation(image: Image.Image) -> int:
    return int(image.getexif().get(ExifTags.Base.Orientation, 1))


def _rgb_picture(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB by the decode rule; an RGB image without transparency as it is."""
    if image.mode in _WIDE_GREY_MODES:
        grey = np.asarray(image).astype(np.int64).clip(0, 65535)
        return Image.fromarray(_grey_to_rgb(((grey * 255 + 32767) // 65535).astype(np.uint8)))
    if image.mode == "F":
        grey = np.nan_to_num(np.asarray(image), nan=0.0).clip(0, 255)
        return Image.fromarray(_grey_to_rgb(np.rint(grey).astype(np.uint8)))
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)
