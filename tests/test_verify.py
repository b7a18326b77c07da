"""`dr-gen verify`: recomputed embeddings of replayed views and captions match a good dataset, not a tampered one."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
from typer.testing import CliRunner

from dr_pipeline.cli import app
from test_validate import _with_embedding


def _verify(*args):
    result = CliRunner().invoke(app, ["verify", *args])
    return result.exit_code, result.stdout, result.stderr


def test_verify_passes_on_the_dataset_as_written(reinforced):
    code, out, err = _verify(reinforced.arrow, "--samples", "6", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["passed"] and len(report["samples"]) == len(set(report["samples"])) == 6
    for teacher in report["teachers"]:
        assert teacher["image"]["count"] == 6 * 3 and teacher["text"]["count"] == 6 * 3  # K views; 1 + S texts
        assert teacher["min"] > 0.9999 and teacher["card_differences"] == []


def test_verify_fails_on_swapped_embeddings(reinforced, tmp_path):
    root = shutil.copytree(reinforced.arrow, tmp_path / "tampered")
    manifest = json.loads((root / "dataset.json").read_text())
    unit = manifest["units"][0]
    path = root / unit["files"]["data"]["path"]
    table = pq.read_table(path)
    swapped = _with_embedding(table, "image_emb_tiny_vit_16_160", lambda values: values[[1, 0, *range(2, len(values))]])
    pq.write_table(swapped, path)
    code, out, err = _verify(str(root), "--samples", "18")
    assert code == 1
    keys = table.column("key").to_pylist()[:2]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tiny_vit_16_160: min cosine ")
    assert "below 0.99" in lines[0] and any(f"(sample {key})" in lines[0] for key in keys)
    assert "tiny_vit_32 " in out and np.isfinite(float(lines[0].split()[3]))
