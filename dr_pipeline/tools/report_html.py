"""`dr-gen inspect --html`: one self-contained page of plots about a dataset.

Everything is inline (SVG drawn here, a few lines of CSS and JavaScript), so the
page opens anywhere, offline, and can be attached to an issue or a mail.
Counts (samples per unit, failures by reason) come from the manifest and cover
the whole dataset; the plots of values read from rows (embedding norms, teacher
agreement, caption lengths, view-caption cosines) use up to `max_rows` samples
from units drawn at random.

Teacher agreement is what distillation depends on: the student learns each
teacher's image-caption similarity matrix over a batch, so two teachers agree
when their matrices are alike. It is shown as the Pearson correlation between
the teachers' similarity matrices (view 0 against the real captions) of the
sampled rows.
"""

from __future__ import annotations

import html
import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from dr_pipeline.read.reader import ReinforcedDataset
from dr_pipeline.tools.show import view_caption_cosines
from dr_pipeline.tools.summary import dataset_summary

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
WIDTH, HEIGHT = 640, 260
_LEGEND_WIDTH = 180
_MARGIN = {"left": 56, "right": 12, "top": 12, "bottom": 44}
_BINS = 30
_MAX_BARS = 60  # more units than this are shown as a histogram of samples per unit


@dataclass
class Plot:
    id: str
    title: str
    note: str
    svg: str


# ---------------------------------------------------------------------- data


def sampled_rows(dataset: ReinforcedDataset, max_rows: int, seed: int = 0) -> list[dict[str, Any]]:
    units = list(dataset.units)
    random.Random(seed).shuffle(units)
    rows: list[dict[str, Any]] = []
    for unit in units:
        for row in dataset.iter_unit(unit):
            rows.append(row)
            if len(rows) >= max_rows:
                return rows
    return rows


def _unit_rows(row_embeddings: np.ndarray) -> np.ndarray:
    return row_embeddings / np.linalg.norm(row_embeddings, axis=-1, keepdims=True)


def teacher_agreement(rows: list[dict[str, Any]], dataset: ReinforcedDataset) -> tuple[list[str], np.ndarray]:
    """Teacher ids and the [T, T] correlation of their view-0 x real-caption similarity matrices."""
    teachers = [t for t in dataset.layout.teachers if t.image_column and t.text_column]
    matrices = []
    for teacher in teachers:
        images = _unit_rows(np.stack([r[teacher.image_column][0] for r in rows]).astype(np.float64))
        captions = _unit_rows(np.stack([r[teacher.text_column][0] for r in rows]).astype(np.float64))
        matrices.append((images @ captions.T).ravel())
    agreement = np.corrcoef(np.stack(matrices)) if len(matrices) > 1 else np.ones((len(matrices), len(matrices)))
    return [t.id for t in teachers], np.atleast_2d(agreement)


# ---------------------------------------------------------------------- SVG


def _ticks(low: float, high: float, count: int = 5) -> list[tuple[float, str]]:
    """Round tick values between low and high, as (value, label) with as many decimals as the step needs."""
    if high <= low:
        return [(low, _label(low))]
    step = 10 ** math.floor(math.log10((high - low) / count))
    for factor in (1, 2, 5, 10):
        if (high - low) / (step * factor) <= count:
            step *= factor
            break
    decimals = max(0, -math.floor(math.log10(step)))
    first = math.ceil(low / step) * step
    values = [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]
    return [(value, f"{value:.{decimals}f}") for value in values]


def _label(value: float) -> str:
    return f"{value:.4g}"


class _Axes:
    """A plot area mapping data coordinates to SVG pixels, with its axes drawn."""

    def __init__(self, x_range: tuple[float, float], y_range: tuple[float, float], x_label: str, y_label: str,
                 legend: Sequence[tuple[str, str]] = ()):
        self.x0, self.x1 = x_range
        self.y0, self.y1 = y_range
        self.legend = legend if len(legend) > 1 else ()
        self.left, self.top = _MARGIN["left"], _MARGIN["top"]
        self.width = WIDTH - _MARGIN["left"] - _MARGIN["right"] - (_LEGEND_WIDTH if self.legend else 0)
        self.height = HEIGHT - _MARGIN["top"] - _MARGIN["bottom"]
        self.parts = [self._frame(x_label, y_label)]

    def x(self, value: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return self.left + (value - self.x0) / span * self.width

    def y(self, value: float) -> float:
        span = (self.y1 - self.y0) or 1.0
        return self.top + self.height - (value - self.y0) / span * self.height

    def _frame(self, x_label: str, y_label: str) -> str:
        bottom = self.top + self.height
        parts = [f'<line class="axis" x1="{self.left}" y1="{bottom}" x2="{self.left + self.width}" y2="{bottom}"/>',
                 f'<line class="axis" x1="{self.left}" y1="{self.top}" x2="{self.left}" y2="{bottom}"/>']
        for tick, label in _ticks(self.y0, self.y1):
            y = self.y(tick)
            parts.append(f'<line class="grid" x1="{self.left}" y1="{y:.1f}" x2="{self.left + self.width}" y2="{y:.1f}"/>'
                         f'<text class="tick" x="{self.left - 4}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
        parts.append(f'<text class="label" x="{self.left + self.width / 2}" y="{HEIGHT - 6}" '
                     f'text-anchor="middle">{html.escape(x_label)}</text>')
        parts.append(f'<text class="label" transform="translate(12 {self.top + self.height / 2}) rotate(-90)" '
                     f'text-anchor="middle">{html.escape(y_label)}</text>')
        return "".join(parts)

    def x_ticks(self) -> None:
        bottom = self.top + self.height
        for tick, label in _ticks(self.x0, self.x1):
            self.parts.append(f'<text class="tick" x="{self.x(tick):.1f}" y="{bottom + 14}" '
                              f'text-anchor="middle">{label}</text>')

    def svg(self) -> str:
        x = self.left + self.width + 12
        items = [
            f'<rect x="{x}" y="{self.top + 4 + 16 * i}" width="10" height="10" fill="{color}"/>'
            f'<text class="tick" x="{x + 14}" y="{self.top + 13 + 16 * i}">{html.escape(name)}</text>'
            for i, (name, color) in enumerate(self.legend)
        ]
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
                f'viewBox="0 0 {WIDTH} {HEIGHT}">{"".join(self.parts + items)}</svg>')


def bar_chart(labels: list[str], values: list[float], x_label: str, y_label: str) -> str:
    axes = _Axes((0, len(labels)), (0, max(values, default=0) * 1.1 or 1), x_label, y_label)
    slot = axes.width / max(len(labels), 1)
    bottom = axes.top + axes.height
    for i, (label, value) in enumerate(zip(labels, values)):
        x, y = axes.left + i * slot + slot * 0.1, axes.y(value)
        axes.parts.append(
            f'<rect class="mark" x="{x:.1f}" y="{y:.1f}" width="{slot * 0.8:.1f}" height="{bottom - y:.1f}" '
            f'fill="{PALETTE[0]}"><title>{html.escape(label)}: {_label(value)}</title></rect>'
        )
        if len(labels) <= 12:
            axes.parts.append(f'<text class="tick" x="{x + slot * 0.4:.1f}" y="{bottom + 14}" '
                              f'text-anchor="middle">{html.escape(label[:18])}</text>')
    return axes.svg()


def histogram(series: dict[str, np.ndarray], x_label: str, y_label: str = "count") -> str:
    """Overlaid histograms of each series on shared bins."""
    values = [np.asarray(v, dtype=np.float64) for v in series.values() if len(v)]
    low = min((float(v.min()) for v in values), default=0.0)
    high = max((float(v.max()) for v in values), default=1.0)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, _BINS + 1)
    counts = {name: np.histogram(np.asarray(v, dtype=np.float64), bins=edges)[0] for name, v in series.items()}
    legend = list(zip(counts, PALETTE))
    axes = _Axes((low, high), (0, max((int(c.max()) for c in counts.values()), default=1) * 1.1 or 1),
                 x_label, y_label, legend)
    axes.x_ticks()
    bottom = axes.top + axes.height
    for (name, bins), color in zip(counts.items(), PALETTE):
        for count, start, end in zip(bins, edges[:-1], edges[1:]):
            if count:
                x, y = axes.x(start), axes.y(count)
                axes.parts.append(
                    f'<rect class="mark" x="{x:.1f}" y="{y:.1f}" width="{axes.x(end) - x:.1f}" '
                    f'height="{bottom - y:.1f}" fill="{color}" fill-opacity="0.55">'
                    f'<title>{html.escape(name)} [{_label(start)}, {_label(end)}): {count}</title></rect>'
                )
    return axes.svg()


def heatmap(labels: list[str], matrix: np.ndarray) -> str:
    """A square matrix of values in [-1, 1], blue for agreement, red for disagreement."""
    size = min(HEIGHT - 40, 60 * max(len(labels), 1))
    cell = size / max(len(labels), 1)
    left, top = 170, 10
    parts = []
    for i, row_label in enumerate(labels):
        parts.append(f'<text class="tick" x="{left - 6}" y="{top + (i + 0.5) * cell + 4:.1f}" '
                     f'text-anchor="end">{html.escape(row_label)}</text>')
        for j, value in enumerate(matrix[i]):
            strength = min(abs(float(value)), 1.0)
            color = f"rgba(31,119,180,{strength:.3f})" if value >= 0 else f"rgba(214,39,40,{strength:.3f})"
            x, y = left + j * cell, top + i * cell
            parts.append(
                f'<rect class="mark" x="{x:.1f}" y="{y:.1f}" width="{cell:.1f}" height="{cell:.1f}" '
                f'fill="{color}" stroke="#999"><title>{html.escape(row_label)} / {html.escape(labels[j])}: '
                f'{value:.4f}</title></rect><text class="value" x="{x + cell / 2:.1f}" y="{y + cell / 2 + 4:.1f}" '
                f'text-anchor="middle" fill="{"white" if strength > 0.6 else "#222"}">{value:.3f}</text>'
            )
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}">{"".join(parts)}</svg>')


# ---------------------------------------------------------------------- page


def report_plots(dataset: ReinforcedDataset, rows: list[dict[str, Any]]) -> list[Plot]:
    manifest, layout = dataset.manifest, dataset.layout
    units = manifest["units"]
    plots = []
    counts = [u["samples"] for u in units]
    if len(units) <= _MAX_BARS:
        svg = bar_chart([u["id"] for u in units], counts, "unit", "samples")
    else:
        svg = histogram({"units": np.array(counts)}, "samples in a unit", "units")
    plots.append(Plot("samples-per-unit", "Samples per unit", f"{len(units)} committed units (manifest)", svg))
    reasons = manifest["totals"]["failures_by_reason"]
    plots.append(Plot("failures-by-reason", "Failures by reason",
                      f"{manifest['totals']['failures']} of {manifest['totals']['input_samples']} input samples "
                      "(manifest)", bar_chart(list(reasons), list(reasons.values()), "reason", "samples")))
    sampled = f"{len(rows)} of {len(dataset)} samples"
    norms = {name: np.linalg.norm(np.concatenate([r[name] for r in rows]), axis=-1)
             for name in layout.embedding_shapes()} if rows else {}
    plots.append(Plot("embedding-norms", "Embedding L2 norms",
                      f"every view and text embedding of {sampled}; normalised teachers sit at 1",
                      histogram(norms, "L2 norm", "embeddings")))
    per_row = [view_caption_cosines(row, layout) for row in rows]
    cosines = {teacher: np.concatenate([c[teacher] for c in per_row]) for teacher in per_row[0]} if rows else {}
    plots.append(Plot("view-caption-cosine", "Cosine of each view with its real caption",
                      f"per teacher, K views of {sampled}", histogram(cosines, "cosine", "views")))
    if rows and len(cosines) >= 1:
        labels, agreement = teacher_agreement(rows, dataset)
        plots.append(Plot("teacher-agreement", "Agreement between teachers",
                          f"Pearson correlation of the teachers' image-caption similarity matrices "
                          f"(view 0 x real captions) over {sampled}", heatmap(labels, agreement)))
    lengths = {"real": np.array([len(r["text"].split()) for r in rows])}
    for captioner in layout.captioners:
        lengths[captioner.id] = np.array([len(c.split()) for r in rows for c in r[captioner.column]])
    plots.append(Plot("caption-lengths", "Caption lengths", f"words per caption, {sampled}",
                      histogram(lengths, "words", "captions")))
    return plots


_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } .summary td { padding: 2px 12px 2px 0; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; border: 1px solid #ddd; padding: 8px; }
figcaption { font-weight: 600; } figcaption small { font-weight: 400; color: #666; display: block; }
.axis { stroke: #444; } .grid { stroke: #eee; } .tick { font-size: 11px; fill: #444; } .value { font-size: 11px; }
.label { font-size: 12px; fill: #222; }
"""

# Marks each figure with how many of its marks the browser laid out with a non-empty box,
# so a headless browser (the test) can tell that the plots rendered.
_SELF_CHECK = """
window.addEventListener("load", () => {
  let complete = 0;
  for (const figure of document.querySelectorAll("figure")) {
    const drawn = [...figure.querySelectorAll(".mark")].filter(m => {
      const box = m.getBBox(); return box.width > 0 && box.height > 0; }).length;
    figure.dataset.marksDrawn = drawn;
    if (drawn > 0) complete += 1;
  }
  document.body.dataset.plotsDrawn = complete;
});
"""


def render_report(dataset: ReinforcedDataset, max_rows: int = 5000, seed: int = 0) -> str:
    """The whole page as one HTML string."""
    summary = dataset_summary(dataset)
    rows = sampled_rows(dataset, max_rows, seed)
    plots = report_plots(dataset, rows)
    facts = [
        ("dataset", summary["path"]), ("schema", summary["schema_version"]), ("status", summary["status"]),
        ("format", f"{summary['format']}, {summary['embedding_dtype']}"),
        ("units", f"{summary['units']} of {summary['units_planned']}"),
        ("samples", f"{summary['samples']} ({summary['failures']} failures of {summary['input_samples']} input)"),
        ("views per sample", summary["num_augmentations"]), ("texts per sample", summary["num_texts"]),
        ("teachers", ", ".join(f"{t['id']} ({t['spec']}, {t['dim']}-d)" for t in summary["teachers"])),
        ("captioners", ", ".join(f"{c['id']} ({c['spec']}, S={c['num_captions']})" for c in summary["captioners"])
         or "none"),
    ]
    table = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    figures = "".join(
        f'<figure id="{p.id}"><figcaption>{html.escape(p.title)}<small>{html.escape(p.note)}</small></figcaption>'
        f"{p.svg}</figure>"
        for p in plots
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>dr-gen report: {html.escape(summary['path'])}</title><style>{_STYLE}</style></head>"
        f'<body><h1>dr-gen dataset report</h1><table class="summary">{table}</table>'
        f'<div class="plots">{figures}</div><script>{_SELF_CHECK}</script></body></html>\n'
    )
