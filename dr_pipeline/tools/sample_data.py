"""Bundled demo and test data: twenty real photographs, captioned, as img2dataset-style shards.

The pictures are the ones scikit-image ships inside its wheel (skimage/data),
so nothing is downloaded. The output is byte-for-byte the same on every call
(fixed tar metadata, no timestamps), so tests can compare bytes and a demo run
is reproducible. One sample has a truncated JPEG and one an empty caption, so
a demo run shows the failure accounting at work.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from dataclasses import dataclass
from functools import cache
from importlib import resources

import fsspec
from PIL import Image

MAX_SIDE = 512
JPEG_QUALITY = 90
CORRUPT_NAME = "gravel"
UNCAPTIONED_NAME = "grass"

# (file in skimage/data, encoding written, true caption)
_PHOTOGRAPHS = (
    (
        "astronaut.png",
        "jpg",
        "An astronaut in an orange spacesuit smiling beside her helmet, with an American flag behind her.",
    ),
    ("brick.png", "jpg", "A grey brick wall seen straight on."),
    ("camera.png", "jpg", "A black and white photo of a man looking through a camera on a tripod in a field."),
    ("chelsea.png", "jpg", "Close-up of a tabby cat's face with green eyes."),
    ("clock_motion.png", "jpg", "A grey, motion-blurred photo of a round clock."),
    ("coffee.png", "jpg", "A cup of coffee on a red saucer with a spoon, on a wooden table."),
    ("coins.png", "jpg", "Rows of old coins on a dark background, in black and white."),
    ("color.png", "png", "A colour wheel: saturated hues around a white centre, on a black background."),
    ("grass.png", "jpg", "A black and white close-up of grass blades."),
    ("gravel.png", "jpg", "A black and white close-up of gravel stones."),
    ("horse.png", "png", "The black silhouette of a horse standing, facing right."),
    ("hubble_deep_field.jpg", "jpg", "A telescope image of deep space full of small, distant galaxies."),
    ("ihc.png", "jpg", "A microscope image of tissue stained brown and blue."),
    ("logo.png", "png", "The scikit-image logo: a snake drawn over green and orange halves of a circle."),
    ("moon.png", "jpg", "A grey close-up of the cratered surface of the moon."),
    ("motorcycle_left.png", "jpg", "A red motorcycle parked in a garage."),
    ("page.png", "png", "A scanned page of printed text titled Region-based segmentation."),
    ("retina.jpg", "jpg", "A colour photograph of the retina at the back of a human eye, with its blood vessels."),
    ("rocket.jpg", "jpg", "A rocket on its launch pad at dusk, lit by floodlights."),
    ("text.png", "jpg", "Handwritten text on a sheet of paper, photographed at an angle."),
)


@dataclass(frozen=True)
class SampleRecord:
    """One demo sample exactly as written: what a reader of the shards must get back."""

    key: str
    caption: str
    url: str
    image: bytes
    image_format: str


@cache
def sample_records() -> tuple[SampleRecord, ...]:
    """All demo samples in key order; built once per process (encoding takes a second)."""
    records = []
    for index, (file_name, image_format, caption) in enumerate(_PHOTOGRAPHS):
        name = file_name.rsplit(".", 1)[0]
        image = _encode(_load_photograph(file_name), image_format)
        if name == CORRUPT_NAME:
            image = image[: len(image) // 2]
        records.append(
            SampleRecord(
                key=f"{index:09d}",
                caption="" if name == UNCAPTIONED_NAME else caption,
                url=f"https://example.org/dr-gen-samples/{name}.{image_format}",
                image=image,
                image_format=image_format,
            )
        )
    return tuple(records)


def write_sample_data(dest: str, num_shards: int = 3, copies: int = 1) -> list[str]:
    """Write the samples as webdataset tars {dest}/00000.tar ... in key order; returns their URLs.

    `copies` > 1 repeats the samples (copy c > 0 under keys prefixed "c<c>-"), a larger
    workload of the same pictures for benchmarks."""
    records = tuple(
        dataclasses.replace(record, key=f"c{copy}-{record.key}" if copy else record.key)
        for copy in range(copies)
        for record in sample_records()
    )
    return write_tar_shards(dest, records, num_shards)


def write_tar_shards(dest: str, records: tuple[SampleRecord, ...], num_shards: int) -> list[str]:
    """The records split in key order over webdataset tars {dest}/00000.tar ...; returns their URLs."""
    if not 1 <= num_shards <= len(records):
        raise ValueError(f"num_shards must be between 1 and {len(records)}, got {num_shards}")
    fs, root = fsspec.core.url_to_fs(dest)
    fs.makedirs(root, exist_ok=True)
    urls = []
    for shard in range(num_shards):
        url = f"{dest.rstrip('/')}/{shard:05d}.tar"
        first, end = shard * len(records) // num_shards, (shard + 1) * len(records) // num_shards
        with fsspec.open(url, "wb") as file:
            file.write(_tar_bytes(records[first:end]))
        urls.append(url)
    return urls


def _load_photograph(file_name: str) -> Image.Image:
    """The photograph at most MAX_SIDE pixels on its longest side, in its own mode (grey stays grey)."""
    with (resources.files("skimage") / "data" / file_name).open("rb") as file, Image.open(file) as image:
        image.load()
    scale = MAX_SIDE / max(image.size)
    if scale >= 1:
        return image
    size = (round(image.width * scale), round(image.height * scale))
    return image.resize(size, Image.Resampling.LANCZOS)


def _encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.convert("L" if image.mode == "L" else "RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _tar_bytes(records: tuple[SampleRecord, ...]) -> bytes:
    """img2dataset's members per sample: <key>.<jpg|png>, <key>.txt, <key>.json."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for record in records:
            meta = {"key": record.key, "url": record.url, "caption": record.caption}
            members = (
                (record.image_format, record.image),
                ("txt", record.caption.encode()),
                ("json", json.dumps(meta).encode()),
            )
            for suffix, data in members:
                info = tarfile.TarInfo(f"{record.key}.{suffix}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
