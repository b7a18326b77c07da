"""`dr-gen inspect`: what a dataset holds, from its manifest plus one sample."""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

import schemas
from dr_pipeline.read.reader import ReinforcedDataset


def dataset_summary(dataset: ReinforcedDataset) -> dict[str, Any]:
    manifest, totals, layout = dataset.manifest, dataset.manifest["totals"], dataset.layout
    samples = totals["samples"]
    return {
        "path": dataset.location.url(),
        "schema_version": manifest["schema_version"],
        "dr_gen_version": manifest["dr_gen_version"],
        "status": manifest["status"],
        "format": manifest["format"],
        "embedding_dtype": layout.embedding_dtype,
        "units": totals["units_done"],
        "units_planned": totals["units_planned"],
        "input_samples": totals["input_samples"],
        "samples": samples,
        "failures": totals["failures"],
        "failures_by_reason": totals["failures_by_reason"],
        "num_augmentations": layout.num_views,
        "num_texts": layout.num_texts,
        "teachers": [
            {
                "id": t["id"],
                "spec": t["spec"],
                "dim": t["card"]["embedding_dim"],
                "input_size": t["card"].get("input_size"),
                "has_image": t["card"].get("has_image", True),
                "has_text": t["card"].get("has_text", True),
            }
            for t in manifest["teachers"]
        ],
        "captioners": [
            {"id": c["id"], "spec": c["spec"], "num_captions": c["num_captions"], "sampler": c["sampler"]}
            for c in manifest["captioners"]
        ],
        "bytes": totals["bytes"],
        "bytes_per_sample": round(totals["bytes"] / samples, 1) if samples else None,
    }


def first_sample(dataset: ReinforcedDataset) -> dict[str, Any] | None:
    """One sample in readable form: metadata, captions, first view's params, embedding shapes."""
    row = next(iter(dataset.iter_samples(view_params=False)), None)
    if row is None:
        return None
    view = row["aug"][0]  # a plain record: the renderer (and torch) is not needed to print it
    op_names = [op["name"] for op in schemas.load_spec()["rand_augment_ops"]]
    readable: dict[str, Any] = {
        "key": row["key"],
        "source_key": row["source_key"],
        "url": row["url"],
        "text": row["text"],
        "image_size": [row["image_height"], row["image_width"]],
        "view_0": {
            "crop": [int(v) for v in view["crop"]],
            "flip": bool(view["flip"]),
            "rand_augment": None
            if view["rand_augment"] is None
            else [[op_names[int(e["op"])], round(float(e["magnitude"]), 4)] for e in view["rand_augment"]],
            "erase": None if view["erase"] is None else [int(v) for v in view["erase"]],
        },
        "captions": {c.id: row[c.column] for c in dataset.layout.captioners},
        "embeddings": {},
    }
    for name, (rows, dim) in dataset.layout.embedding_shapes().items():
        values = np.asarray(row[name], dtype=np.float32)
        readable["embeddings"][name] = {
            "shape": [rows, dim],
            "norm_mean": round(float(np.linalg.norm(values, axis=-1).mean()), 4),
        }
    return readable


def print_summary(summary: dict[str, Any], sample: dict[str, Any] | None, console: Console) -> None:
    console.print(f"[bold]{summary['path']}[/bold]  schema {summary['schema_version']}  "
                  f"({summary['status']}, {summary['format']}, {summary['embedding_dtype']})")
    console.print(
        f"units {summary['units']}/{summary['units_planned']}   input samples {summary['input_samples']}   "
        f"samples {summary['samples']}   failures {summary['failures']}   "
        f"K={summary['num_augmentations']} views   texts per sample {summary['num_texts']}   "
        f"bytes/sample {summary['bytes_per_sample']}"
    )
    teachers = Table("teacher", "spec", "dim", "input", "image", "text", title="Teachers", title_justify="left")
    for t in summary["teachers"]:
        teachers.add_row(t["id"], t["spec"], str(t["dim"]), str(t["input_size"]), str(t["has_image"]),
                         str(t["has_text"]))
    console.print(teachers)
    if summary["captioners"]:
        captioners = Table("captioner", "spec", "S", "sampler", title="Captioners", title_justify="left")
        for c in summary["captioners"]:
            sampler = ", ".join(f"{k}={v}" for k, v in c["sampler"].items() if v is not None)
            captioners.add_row(c["id"], c["spec"], str(c["num_captions"]), sampler)
        console.print(captioners)
    if summary["failures_by_reason"]:
        reasons = Table("failure reason", "count", title="Failures", title_justify="left")
        for reason, count in summary["failures_by_reason"].items():
            reasons.add_row(reason, str(count))
        console.print(reasons)
    if sample:
        console.print(_sample_grid(sample))


def _sample_grid(sample: dict[str, Any]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.title, grid.title_justify = "One sample", "left"
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("key", f"{sample['key']} (source key {sample['source_key']})")
    grid.add_row("url", str(sample["url"]))
    grid.add_row("text", sample["text"])
    grid.add_row("image", "{} x {} (height x width)".format(*sample["image_size"]))
    view = sample["view_0"]
    ops = ", ".join(f"{name} {magnitude:g}" for name, magnitude in view["rand_augment"] or []) or "skipped"
    grid.add_row(
        "view 0",
        f"crop {view['crop']} (top, left, height, width), flip {view['flip']}, RandAugment {ops}, "
        f"erase {view['erase']}",
    )
    for captioner, captions in sample["captions"].items():
        grid.add_row(captioner, "\n".join(f"{i + 1}. {c}" for i, c in enumerate(captions)))
    for column, info in sample["embeddings"].items():
        grid.add_row(column, f"{info['shape']}, mean L2 norm {info['norm_mean']}")
    return grid
