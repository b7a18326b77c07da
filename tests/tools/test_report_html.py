"""`dr-gen inspect --html`: a self-contained page whose plots headless Chromium renders."""

import html.parser
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dr_pipeline.cli import app
from dr_pipeline.read.reader import open_dataset

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def browser():
    found = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if found is None:
        pytest.skip("no Chromium on this machine; `make test` installs it with apt-get (Debian package chromium)")
    return found


class _Figures(html.parser.HTMLParser):
    """id -> attributes of every <figure>, and the <body>'s attributes."""

    def __init__(self):
        super().__init__()
        self.figures, self.body = {}, {}

    def handle_starttag(self, tag, attrs):
        if tag == "figure":
            self.figures[dict(attrs)["id"]] = dict(attrs)
        elif tag == "body":
            self.body = dict(attrs)


def _headless(browser, tmp_path, *args):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_renders_its_plots_in_chromium(reinforced, tmp_path, browser):
    page = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["inspect", reinforced.arrow, "--html", str(page)])
    assert result.exit_code == 0, result.output
    text = page.read_text()
    assert not re.search(r"""(src|href)\s*=|@import|url\(""", text), "the page must not load anything"

    dom = _headless(browser, tmp_path, "--dump-dom", page.as_uri())
    parsed = _Figures()
    parsed.feed(dom.stdout)
    drawn = {name: int(attrs.get("data-marks-drawn", -1)) for name, attrs in parsed.figures.items()}
    assert set(drawn) == {"samples-per-unit", "failures-by-reason", "embedding-norms", "view-caption-cosine",
                          "teacher-agreement", "caption-lengths"}
    assert drawn["samples-per-unit"] == 3 and drawn["failures-by-reason"] == 2  # one bar per unit, per reason
    assert drawn["teacher-agreement"] == 4  # 2 x 2 teachers
    assert min(drawn.values()) > 0 and parsed.body["data-plots-drawn"] == "6"

    screenshot = tmp_path / "report.png"
    _headless(browser, tmp_path, f"--screenshot={screenshot}", "--window-size=1400,2000", page.as_uri())
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)
    bars = (np.abs(pixels - [31, 119, 180]).sum(axis=2) < 12).sum()  # the first palette colour, opaque bars
    assert bars > 20_000, f"only {bars} pixels of bar colour on the screenshot"


def test_teacher_agreement_is_the_correlation_of_similarity_matrices(reinforced, tmp_path):
    page = tmp_path / "report.html"
    assert CliRunner().invoke(app, ["inspect", reinforced.arrow, "--html", str(page)]).exit_code == 0
    rows = list(open_dataset(reinforced.arrow).iter_samples())
    matrices = []
    for teacher in ("tiny_vit_32", "tiny_vit_16_160"):
        views = np.stack([r[f"image_emb_{teacher}"][0] for r in rows]).astype(np.float64)
        captions = np.stack([r[f"text_emb_{teacher}"][0] for r in rows]).astype(np.float64)
        views /= np.linalg.norm(views, axis=1, keepdims=True)
        captions /= np.linalg.norm(captions, axis=1, keepdims=True)
        matrices.append((views @ captions.T).ravel())
    expected = np.corrcoef(matrices)[0, 1]
    shown = re.search(r"<title>tiny_vit_32 / tiny_vit_16_160: (-?[0-9.]+)</title>", page.read_text())
    assert float(shown.group(1)) == pytest.approx(expected, abs=1e-4)
    failures = re.findall(r"<title>(\w+): (\d+)</title>", page.read_text())
    assert dict(failures)["undecodable_image"] == "1" and dict(failures)["empty_text"] == "1"
