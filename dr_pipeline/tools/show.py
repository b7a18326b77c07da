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
import unicodedata
from dataclasses import dataclass
from importlib.resources import files
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
    fonts = CaptionFonts(FONT_SIZE)
    caption_text = "".join(text for _, text in captions)
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
        "fonts": fonts.used(caption_text),  # the files of the fonts that drew the captions
        "missing_glyphs": fonts.missing(caption_text),  # drawn as boxes: no font has a glyph for them
    }


FONT_ENV = "DR_GEN_FONT"
# Bundled by dependencies (SIL Open Font License): Noto Sans CJK (Latin, Greek, Cyrillic, Chinese,
# Japanese, Korean), then Noto Sans and its faces for the scripts it lacks (Arabic, Hebrew, the Indic
# scripts, Thai, Khmer, ...), Noto Sans Symbols and Noto Emoji last.
CJK_FONT_PACKAGE, CJK_FONT_FILE = "noto_cjk_sans_otc", "NotoSansCJK-Regular.ttc"
SCRIPT_FONTS_PACKAGE = "manimgx_fonts"
_LAST_RESORT = ("NotoSansSymbols", "NotoEmoji")


def bundled_font_paths() -> list[str]:
    """The bundled fonts' files, in the order they are tried for a character."""
    scripts = [path for path in files(SCRIPT_FONTS_PACKAGE).iterdir()
               if path.name.endswith(".ttf") and "Italic" not in path.name]
    scripts.sort(key=lambda path: (path.name.startswith(_LAST_RESORT), not path.name.startswith("NotoSans["),
                                   path.name))
    return [str(files(CJK_FONT_PACKAGE) / CJK_FONT_FILE), *map(str, scripts)]


class CaptionFonts:
    """The PNG's text, drawn character by character in the first font that has a glyph for it:
    $DR_GEN_FONT when set, then the bundled fonts. Characters no font has are drawn as the first
    font's empty box and listed by `missing`."""

    def __init__(self, size: int) -> None:
        chosen = os.environ.get(FONT_ENV)
        paths = ([chosen] if chosen and os.path.isfile(chosen) else []) + bundled_font_paths()
        self.fonts = [ImageFont.truetype(path, size) for path in paths]
        self.paths = paths
        self._missing_boxes = [_bitmap(font, "\U0010fffd") for font in self.fonts]  # a code point no font maps
        self._font_of: dict[str, int | None] = {}

    def font_index(self, character: str) -> int | None:
        """Which font draws `character` (None: no font has it; whitespace: the first)."""
        if character not in self._font_of:
            if character.isspace() or not character.isprintable():
                self._font_of[character] = 0
            else:
                self._font_of[character] = next(
                    (i for i, (font, box) in enumerate(zip(self.fonts, self._missing_boxes))
                     if _bitmap(font, character) != box), None)
        return self._font_of[character]

    def runs(self, text: str) -> list[tuple[ImageFont.FreeTypeFont, str]]:
        """`text` cut into runs of one font each (whitespace and missing characters join the run
        before them), so each run is laid out (and shaped, e.g. Arabic) as a whole."""
        runs: list[tuple[int, str]] = []
        for character in text:
            index = self.font_index(character)
            if runs and (index is None or index == runs[-1][0] or character.isspace() or _is_mark(character)):
                runs[-1] = (runs[-1][0], runs[-1][1] + character)
            else:
                runs.append((index or 0, character))
        return [(self.fonts[index], run) for index, run in runs]

    def length(self, text: str) -> float:
        return sum(font.getlength(run) for font, run in self.runs(text))

    def draw(self, draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill: str) -> None:
        """`text` from `xy` (top left, as ImageDraw.text), every run on the first font's baseline."""
        x, y = xy
        baseline = y + self.fonts[0].getmetrics()[0]
        for font, run in self.runs(text):
            draw.text((x, baseline), run, fill, font, anchor="ls")
            x += font.getlength(run)

    def missing(self, text: str) -> list[str]:
        """The characters of `text` no font has a glyph for (drawn as boxes); combining marks go
        with the character before them and are not judged alone."""
        return sorted({c for c in text if not _is_mark(c) and self.font_index(c) is None})

    def used(self, text: str) -> list[str]:
        """The file names of the fonts that draw `text`."""
        return sorted({os.path.basename(self.paths[self.font_index(c) or 0]) for c in text if not c.isspace()})


def _is_mark(character: str) -> bool:
    """A combining mark (e.g. a Devanagari vowel sign): drawn in its base character's font."""
    return unicodedata.category(character).startswith("M")


def _bitmap(font: ImageFont.FreeTypeFont, character: str) -> bytes:
    mask = font.getmask(character)
    return bytes(mask) + bytes(str(mask.size), "ascii")


def _to_pil(pixels: torch.Tensor) -> Image.Image:
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())


def _fit(text: str, fonts: CaptionFonts, width: int) -> str:
    """The text cut with an ellipsis so it fits `width` pixels on one line."""
    if fonts.length(text) <= width:
        return text
    while text and fonts.length(text + "…") > width:
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
    fonts = CaptionFonts(FONT_SIZE)
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
    fonts.draw(draw, (x, y + TILE), _fit(f"original {original.shape[1]}x{original.shape[2]}", fonts, TILE), "black")

    for index, view in enumerate(views):
        x, y = layout.cell_origin(index + 1)
        tile = _to_pil(view)
        if tile.size != (TILE, TILE):
            tile = tile.resize((TILE, TILE), Image.Resampling.BICUBIC)
        picture.paste(tile, (x, y))
        draw.rectangle([x, y, x + TILE - 1, y + TILE - 1], outline=_PALETTE[index % len(_PALETTE)], width=2)
        fonts.draw(draw, (x, y + TILE), _fit(_view_label(index, params[index]), fonts, TILE), "black")
        for line, (teacher, values) in enumerate(cosines.items(), start=1):
            text = _fit(f"{teacher}  {values[index]:.4f}", fonts, TILE)
            fonts.draw(draw, (x, y + TILE + line * LINE), text, "dimgray")

    y = GAP + layout.rows * (layout.cell_height + GAP)
    text_width = layout.size[0] - 2 * GAP
    for line, (source, text) in enumerate(captions):
        fonts.draw(draw, (GAP, y + line * LINE), _fit(f"{source}: {text}", fonts, text_width), "black")
    return picture
