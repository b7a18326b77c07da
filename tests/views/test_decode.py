"""Image decoding: every Pillow mode to RGB uint8, orientation, and rejection of bad or huge images."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from dr_pipeline.views.decode import ImageRejected, decode_image, decode_picture

LIMIT = 10_000_000


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def noise(width: int, height: int) -> Image.Image:
    """Detail that compresses badly, so a cut really removes image data."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares its size and then holds no pixels: decoding it would fail."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def rejection(data: bytes, max_pixels: int = LIMIT) -> ImageRejected:
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, max_pixels)
    assert "\n" not in caught.value.detail
    return caught.value


def pixel(tensor: torch.Tensor, y: int, x: int) -> list[int]:
    return tensor[:, y, x].tolist()


def test_rgb_jpeg_gives_a_contiguous_uint8_chw_cpu_tensor():
    tensor = decode_image(encode(Image.new("RGB", (24, 16), (200, 100, 50)), "JPEG", quality=100), LIMIT)
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 16, 24)
    assert tensor.is_contiguous() and tensor.device.type == "cpu"
    assert all(abs(value - target) <= 2 for value, target in zip(pixel(tensor, 8, 12), (200, 100, 50)))


@pytest.mark.parametrize(
    ("image", "image_format", "expected"),
    [
        (Image.new("L", (3, 2), 77), "PNG", [77, 77, 77]),
        (Image.new("1", (3, 2), 1), "PNG", [255, 255, 255]),
        (Image.new("LA", (3, 2), (0, 255)), "PNG", [0, 0, 0]),  # opaque black stays black
        (Image.new("LA", (3, 2), (0, 0)), "PNG", [255, 255, 255]),  # fully transparent: the white background
        (Image.new("LA", (3, 2), (0, 128)), "PNG", [127, 127, 127]),  # half transparent black over white
        (Image.new("RGBA", (3, 2), (10, 20, 30, 255)), "PNG", [10, 20, 30]),
        (Image.new("RGBA", (3, 2), (10, 20, 30, 0)), "PNG", [255, 255, 255]),
        (Image.new("RGBA", (3, 2), (10, 20, 30, 0)), "WEBP", [255, 255, 255]),
        (Image.new("CMYK", (3, 2), (0, 255, 255, 0)), "JPEG", [255, 0, 0]),
        (Image.new("CMYK", (3, 2), (0, 0, 0, 255)), "TIFF", [0, 0, 0]),
        (Image.new("I;16", (3, 2), 65535), "PNG", [255, 255, 255]),  # scaled, not clipped to 255
        (Image.new("I;16", (3, 2), 257), "PNG", [1, 1, 1]),
        (Image.new("I;16", (3, 2), 32896), "TIFF", [128, 128, 128]),
        (Image.new("I", (3, 2), 65535), "TIFF", [255, 255, 255]),
        (Image.new("I", (3, 2), 100_000), "TIFF", [255, 255, 255]),  # beyond 16 bits: saturates
        (Image.new("F", (3, 2), 127.6), "TIFF", [128, 128, 128]),
        (Image.new("F", (3, 2), -5.0), "TIFF", [0, 0, 0]),
    ],
    ids=lambda value: value.mode if isinstance(value, Image.Image) else str(value),
)
def test_every_mode_becomes_rgb(image, image_format, expected):
    data = encode(image, image_format, **({"quality": 100} if image_format == "JPEG" else {}))
    assert Image.open(io.BytesIO(data)).mode == image.mode  # the mode under test is what the decoder meets
    tensor = decode_image(data, LIMIT)
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.uint8
    assert pixel(tensor, 1, 2) == expected


def test_palette_images_with_and_without_transparency():
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0])
    palette.putpixel((1, 0), 1)
    opaque = decode_image(encode(palette, "PNG"), LIMIT)
    assert [pixel(opaque, 0, 0), pixel(opaque, 0, 1)] == [[255, 0, 0], [0, 255, 0]]
    see_through = decode_image(encode(palette, "PNG", transparency=0), LIMIT)
    assert [pixel(see_through, 0, 0), pixel(see_through, 0, 1)] == [[255, 255, 255], [0, 255, 0]]
    gif = decode_image(encode(palette, "GIF", transparency=1), LIMIT)
    assert [pixel(gif, 0, 0), pixel(gif, 0, 1)] == [[255, 0, 0], [255, 255, 255]]


def test_exif_orientation_6_turns_the_image_upright():
    """Orientation 6: the camera was rotated, the stored pixels must turn 90 degrees clockwise."""
    stored = Image.new("RGB", (32, 16), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))  # a red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    tensor = decode_image(encode(stored, "JPEG", quality=95, exif=exif), LIMIT)
    assert tensor.shape == (3, 32, 16)  # height and width swap
    red_corner = pixel(tensor, 2, 13)  # the top-left corner is now top-right
    assert red_corner[0] > 240 and red_corner[2] < 15
    assert pixel(tensor, 29, 2)[2] > 240


def test_picture_is_the_decoded_image_as_an_rgb_pil_image():
    """The loader's form of the decode: EXIF turned, transparency on white, grey broadcast, all RGB."""
    stored = Image.new("RGB", (32, 16), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = decode_picture(encode(stored, "JPEG", quality=95, exif=exif), LIMIT)
    assert turned.mode == "RGB" and turned.size == (16, 32)
    red, blue = turned.getpixel((13, 2)), turned.getpixel((2, 29))
    assert red[0] > 240 and red[2] < 15 and blue[2] > 240
    see_through = decode_picture(encode(Image.new("LA", (3, 2), (0, 128)), "PNG"), LIMIT)
    assert see_through.mode == "RGB" and see_through.getpixel((2, 1)) == (127, 127, 127)
    grey = decode_picture(encode(Image.new("L", (3, 2), 77), "PNG"), LIMIT)
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (77, 77, 77)
    for data in (encode(stored, "JPEG", quality=95, exif=exif), encode(Image.new("I;16", (3, 2), 257), "PNG")):
        np.testing.assert_array_equal(np.asarray(decode_picture(data, LIMIT)),
                                      decode_image(data, LIMIT).permute(1, 2, 0).numpy())


def test_picture_is_checked_as_the_tensor_is():
    with pytest.raises(ImageRejected) as caught:
        decode_picture(encode(Image.new("RGB", (20, 20)), "PNG"), 399)
    assert caught.value.reason == "image_too_large"
    with pytest.raises(ImageRejected) as caught:
        decode_picture(encode(Image.new("RGB", (20, 20)), "JPEG")[:-40], LIMIT)
    assert caught.value.reason == "undecodable_image"


def test_one_pixel_image():
    assert decode_image(encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), LIMIT).tolist() == [[[1]], [[2]], [[3]]]


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "WEBP"])
def test_corrupt_and_truncated_images_are_undecodable(image_format):
    data = encode(noise(64, 64), image_format)
    for broken in (data[: len(data) // 2], data[: len(data) - 40], data[:12] + bytes(len(data) - 12)):
        assert rejection(broken).reason == "undecodable_image"


def test_bytes_that_are_not_an_image_in_a_web_format_are_undecodable():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    for data in (b"", b"hello world", eps):
        rejected = rejection(data)
        assert rejected.reason == "undecodable_image"
        assert rejected.detail.startswith("not an image in a supported format")


def test_too_many_pixels_is_rejected_from_the_header_before_decoding():
    # The file holds no pixel data, so any decode attempt would say undecodable instead.
    rejected = rejection(png_header_only(5000, 4000), max_pixels=19_999_999)
    assert rejected.reason == "image_too_large" and "5000x4000" in rejected.detail
    assert decode_image(encode(Image.new("RGB", (100, 50)), "PNG"), max_pixels=5000).shape == (3, 50, 100)
    assert rejection(encode(Image.new("RGB", (100, 51)), "PNG"), max_pixels=5000).reason == "image_too_large"


def test_huge_declared_size_is_rejected_even_beyond_pillows_own_bomb_limit():
    assert rejection(png_header_only(100_000, 100_000), max_pixels=10**12).reason == "image_too_large"


def test_pillow_globals_are_left_alone():
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    decode_image(encode(Image.new("RGB", (4, 4)), "PNG"), LIMIT)
    rejection(png_header_only(100_000, 100_000))
    rejection(encode(noise(32, 32), "JPEG")[:300])
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


def test_refuses_to_decode_when_truncated_images_were_allowed_elsewhere(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(encode(Image.new("RGB", (4, 4)), "PNG"), LIMIT)


def test_camera_multi_picture_jpeg_decodes_its_first_picture():
    first, second = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 255, 0))
    data = encode(first, "MPO", save_all=True, append_images=[second], quality=100)
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert pixel(decode_image(data, LIMIT), 4, 4)[:2] == [254, 0]
