"""`dr-gen show`: the grid holds the replayed views, and the printed cosines are those of the stored embeddings."""

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from dr_pipeline.views.augment import render_view
from dr_pipeline.cli import app
from dr_pipeline.views.decode import decode_image
from dr_pipeline.read.reader import open_dataset
from dr_pipeline.tools.show import FONT_ENV, FONT_SIZE, GAP, LINE, TILE, CaptionFonts, GridLayout, bundled_font_paths


def _row(url, key):
    return next(row for row in open_dataset(url).iter_samples() if row["key"] == key)


def _printed_cosines(stdout):
    """teacher -> cosines from the lines `  TEACHER  c0 c1 ...`."""
    lines = stdout.split("real caption's embedding:\n", 1)[1].splitlines()
    return {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines if line.strip()}


def test_show_prints_the_cosines_of_the_stored_embeddings(reinforced, tmp_path):
    key = next(open_dataset(reinforced.arrow).iter_samples())["key"]
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(app, ["show", reinforced.arrow, "--key", key, "--out", str(out)])
    assert result.exit_code == 0, result.output
    row = _row(reinforced.arrow, key)
    printed = _printed_cosines(result.stdout)
    assert set(printed) == {"tiny_vit_32", "tiny_vit_16_160"}
    for teacher, cosines in printed.items():
        views = row[f"image_emb_{teacher}"].astype(np.float64)
        caption = row[f"text_emb_{teacher}"][0].astype(np.float64)
        expected = views @ caption / (np.linalg.norm(views, axis=1) * np.linalg.norm(caption))
        np.testing.assert_allclose(cosines, expected.round(4), atol=1e-12)
    # K=3 views + the original in one row of 4 cells; 2 teacher lines per cell; 1 real + 2 synthetic captions
    assert GridLayout(3, 2, 3).size == (GAP + 4 * (TILE + GAP), GAP + TILE + 3 * LINE + GAP + 3 * LINE + GAP)
    assert Image.open(out).size == (936, 356)


def test_the_grid_shows_the_views_the_teachers_saw(reinforced, tmp_path):
    """Views replayed from the input shards (Arrow run, no images kept) are pixel for pixel the ones
    rendered from the images the webdataset run kept, and the grid holds them."""
    key = next(open_dataset(reinforced.webdataset).iter_samples())["key"]
    grids = {}
    for name in ("arrow", "webdataset"):
        grids[name] = tmp_path / f"{name}.png"
        result = CliRunner().invoke(app, ["show", getattr(reinforced, name), "--key", key, "--out", str(grids[name])])
        assert result.exit_code == 0, result.output
    row = _row(reinforced.webdataset, key)
    cfg = reinforced.arrow_job.augmentation
    pixels = decode_image(row["image"], 10**8)
    picture = np.asarray(Image.open(grids["arrow"]))
    assert np.array_equal(picture, np.asarray(Image.open(grids["webdataset"])))
    for index, params in enumerate(row["aug"]):
        view = render_view(pixels, params, TILE, cfg).permute(1, 2, 0).numpy()
        x, y = GridLayout(3, 2, 3).cell_origin(index + 1)
        inside = slice(2, TILE - 2)  # the coloured frame is 2 pixels wide
        assert np.array_equal(picture[y:y + TILE, x:x + TILE][inside, inside], view[inside, inside])


def test_show_without_key_picks_a_sample_and_refuses_an_unknown_key(reinforced, tmp_path):
    out = tmp_path / "random.png"
    result = CliRunner().invoke(app, ["show", reinforced.arrow, "--seed", "3", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    keys = {row["key"] for row in open_dataset(reinforced.arrow).iter_samples()}
    shown = json.loads(result.stdout)
    assert shown["key"] in keys and out.exists() and shown["png_size"] == [936, 356]
    again = CliRunner().invoke(app, ["show", reinforced.arrow, "--seed", "3", "--out", str(out), "--json"])
    assert json.loads(again.stdout)["key"] == shown["key"]
    missing = CliRunner().invoke(app, ["show", reinforced.arrow, "--key", "nope", "--out", str(out)])
    assert missing.exit_code == 2 and "no sample with key 'nope'" in missing.stderr


def _glyph(font, character):
    mask = font.getmask(character)
    return bytes(mask), mask.size


def _line(fonts, text):
    picture = Image.new("L", (600, 2 * LINE), 255)
    fonts.draw(ImageDraw.Draw(picture), (0, 0), text, 0)
    return np.asarray(picture)


@pytest.mark.parametrize("text", ["日本語の猫と한국어", "кошка на диване", "قطة على الأريكة"])
def test_captions_in_other_scripts_are_drawn_with_the_bundled_fonts_not_as_boxes(text):
    """Each character's glyph, in the font chosen for it, has ink and is not that font's missing-glyph
    box; the drawn line differs from a line of boxes."""
    fonts = CaptionFonts(FONT_SIZE)
    assert fonts.missing(text) == []
    for character in text.replace(" ", ""):
        font = fonts.fonts[fonts.font_index(character)]
        glyph = _glyph(font, character)
        assert any(glyph[0]) and glyph != _glyph(font, "\U0010fffd"), character
    drawn = _line(fonts, text)
    assert (drawn < 128).any() and not np.array_equal(drawn, _line(fonts, "\U0010fffd" * len(text)))


def test_characters_no_font_has_are_named_and_dr_gen_font_comes_first(monkeypatch):
    assert CaptionFonts(FONT_SIZE).missing("a \U00013000 b") == ["\U00013000"]  # Egyptian hieroglyphs
    hebrew = next(path for path in bundled_font_paths() if "Hebrew" in path)
    monkeypatch.setenv(FONT_ENV, hebrew)
    assert CaptionFonts(FONT_SIZE).paths == [hebrew, *bundled_font_paths()]
    monkeypatch.setenv(FONT_ENV, "/nonexistent/font.ttf")  # ignored: the bundled fonts draw
    assert CaptionFonts(FONT_SIZE).paths == bundled_font_paths()
