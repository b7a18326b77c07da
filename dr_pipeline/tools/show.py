"""`dr-gen show`: one sample as the teachers saw it, in a picture.

The grid holds the original (with every view's crop box drawn on it) and the K
replayed views, each labelled with its RandAugment ops and, per teacher, the
cosine between that view's stored embedding and the stored embedding of the
real caption. The captions are written under the grid. A low or negative
cosine on a view is the quickest way to spot a crop that lost the subject.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dr_pipeline.core.records import RAND_AUGMENT_OPS, ViewParams
from dr_pipeline.read.reader import ReinforcedDataset
from dr_pipeline.read.replay import ViewRenderer, dataset_job, find_samples, original_images, pick_samples
from dr_pipeline.core.schema import DatasetLayout

TILE = 224  # side of every image cell, in pixels
GAP = 8
LINE = 18  # height of one text line
FONT_SIZE = 13
MAX_COLUMNS = 6
_PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
            "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075")


@dataclass(frozen=True)
class GridLayout:
    """Where everything goes: cells of TILE plus one label line and one line per teacher, captions below."""

    num_views: int
    num_teachers: int
    num_captions: int  # the real caption plus every synthetic caption, one line each

    @property
    def columns(self) -> int:
        return min(self.num_views + 1, MAX_COLUMNS)

    @property
    def rows(self) -> int:
        return math.ceil((self.num_views + 1) / self.columns)

    @property
    def cell_height(self) -> int:
        return TILE + (1 + self.num_teachers) * LINE

    @property
    def size(self) -> tuple[int, int]:
        width = GAP + self.columns * (TILE + GAP)
        height = GAP + self.rows * (self.cell_height + GAP) + self.num_captions * LINE + GAP
        return width, height

    def cell_origin(self, index: int) -> tuple[int, int]:
        """Top-left corner of cell `index` (0 is the original, 1 + k is view k)."""
        row, column = divmod(index, self.columns)
        return GAP + column * (TILE + GAP), GAP + row * (self.cell_height + GAP)


def view_caption_cosines(row: dict[str, Any], layout: DatasetLayout) -> dict[str, np.ndarray]:
    """Per teacher with both towers: cosine of each view's embedding with the real caption's, [K]."""
    cosines = {}
    for teacher in layout.teachers:
        if teacher.image_column and teacher.text_column:
            views = row[teacher.image_column].astype(np.float64)
            caption = row[teacher.text_column][0].astype(np.float64)
            views /= np.linalg.norm(views, axis=1, keepdims=True)
            cosines[teacher.id] = views @ (caption / np.linalg.norm(caption))
    return cosines


def show_sample(dataset: ReinforcedDataset, key: str | None, out_path: str, seed: int | None = None) -> dict[str, Any]:
    """Write the grid of one sample (by key, else random) to `out_path`; returns what it shows."""
    matches = find_samples(dataset, key) if key is not None else pick_samples(dataset, 1, seed)
    sample = matches[0]  # by key: the first in unit order; the others are named in "also_matching"
    sample.row["image"] = original_images(dataset, [sample])[0]
    original, views = ViewRenderer(dataset_job(dataset)).render_all(sample.row)
    cosines = view_caption_cosines(sample.row, dataset.layout)
    captions = [("caption", sample.row["text"])] + [
        (f"{c.id} #{i + 1}", text)
        for c in dataset.layout.captioners
        for i, text in enumerate(sample.row[c.column])
    ]
    picture = render_grid(original, views, sample.row["aug"], cosines, captions)
    font, font_name = caption_font(FONT_SIZE)
    unrenderable = missing_glyphs("".join(text for _, text in captions), font)
    with fsspec.open(out_path, "wb") as handle:
        picture.save(handle, format="PNG")
    return {
        "key": sample.key,
        "source_key": sample.row["source_key"],
        "unit": sample.unit["id"],
        "also_matching": [{"unit": other.unit["id"], "key": other.key, "source_key": other.row["source_key"]}
                          for other in matches[1:]],
        "image_size": [int(original.shape[1]), int(original.shape[2])],
        "captions": [{"source": source, "text": text} for source, text in captions],
        "cosines": {teacher: [float(c) for c in values] for teacher, values in cosines.items()},
        "out": out_path,
        "png_size": list(picture.size),
        "font": font_name,
        "missing_glyphs": unrenderable,  # drawn as boxes: the font has no glyph for them
    }


FONT_ENV = "DR_GEN_FONT"
# Wide-coverage fonts where Linux distributions put them (fonts-noto-cjk: Latin, Greek, Cyrillic, CJK;
# DejaVu: Latin, Greek, Cyrillic, Hebrew, Arabic); the first present draws the PNG's text.
SYSTEM_FONTS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
)


def caption_font(size: int) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, str]:
    """The font the PNG's text is drawn with, and its name: $DR_GEN_FONT, else the first of
    SYSTEM_FONTS present, else Pillow's own (Latin only)."""
    for path in (os.environ.get(FONT_ENV), *SYSTEM_FONTS):
        if path and os.path.isfile(path):
            return ImageFont.truetype(path, size), path
    return ImageFont.load_default(size=size), "Pillow's default font"


def missing_glyphs(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> list[str]:
    """The characters of `text` the font has no glyph for (drawn as its empty box): those whose
    bitmap equals the one of a private-use code point no font maps."""
    def bitmap(character: str) -> bytes:
        mask = font.getmask(character)
        return bytes(mask) + bytes(str(mask.size), "ascii")

    missing_box = bitmap("\U0010fffd")
    return sorted({c for c in text if not c.isspace() and c.isprintable() and bitmap(c) == missing_box})


def _to_pil(pixels: torch.Tensor) -> Image.Image:
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())


def _fit(text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """The text cut with an ellipsis so it fits `width` pixels on one line."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _view_label(index: int, params: ViewParams) -> str:
    parts = [f"view {index}"]
    if params.flip:
        parts.append("flip")
    for op, magnitude in params.rand_augment or ():
        parts.append(f"{RAND_AUGMENT_OPS[op]} {magnitude:.3g}" if magnitude else RAND_AUGMENT_OPS[op])
    if params.erase is not None:
        parts.append("erase")
    return ", ".join(parts)


def render_grid(
    original: torch.Tensor,
    views: torch.Tensor,
    params: list[ViewParams],
    cosines: dict[str, np.ndarray],
    captions: list[tuple[str, str]],
) -> Image.Image:
    """The picture: original with crop boxes, then the views with their labels and cosines, then captions."""
    layout = GridLayout(num_views=len(views), num_teachers=len(cosines), num_captions=len(captions))
    font, _ = caption_font(FONT_SIZE)
    picture = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(picture)

    thumbnail = _to_pil(original)
    thumbnail.thumbnail((TILE, TILE), Image.Resampling.BICUBIC)
    x, y = layout.cell_origin(0)
    picture.paste(thumbnail, (x, y))
    scale = thumbnail.width / original.shape[2]
    for index, view in enumerate(params):
        top, left, height, width = view.crop
        box = [x + left * scale, y + top * scale, x + (left + width) * scale - 1, y + (top + height) * scale - 1]
        draw.rectangle(box, outline=_PALETTE[index % len(_PALETTE)], width=2)
    draw.text((x, y + TILE), _fit(f"original {original.shape[1]}x{original.shape[2]}", font, TILE), "black", font)

    for index, view in enumerate(views):
        x, y = layout.cell_origin(index + 1)
        tile = _to_pil(view)
        if tile.size != (TILE, TILE):
            tile = tile.resize((TILE, TILE), Image.Resampling.BICUBIC)
        picture.paste(tile, (x, y))
        draw.rectangle([x, y, x + TILE - 1, y + TILE - 1], outline=_PALETTE[index % len(_PALETTE)], width=2)
        draw.text((x, y + TILE), _fit(_view_label(index, params[index]), font, TILE), "black", font)
        for line, (teacher, values) in enumerate(cosines.items(), start=1):
            text = _fit(f"{teacher}  {values[index]:.4f}", font, TILE)
            draw.text((x, y + TILE + line * LINE), text, "dimgray", font)

    y = GAP + layout.rows * (layout.cell_height + GAP)
    text_width = layout.size[0] - 2 * GAP
    for line, (source, text) in enumerate(captions):
        draw.text((GAP, y + line * LINE), _fit(f"{source}: {text}", font, text_width), "black", font)
    return picture
