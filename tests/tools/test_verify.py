"""`dr-gen verify`: recomputed embeddings of replayed views and captions match a good dataset, not a tampered one."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from dr_pipeline.cli import app
from tests.tools.test_validate import _with_embedding


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
    assert report["replay"] == {"views": 6 * 3, "mismatched": []}


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


def _damaged(aug):
    """Three damages of stored view parameters, each too small for the tiny teachers' cosines:
    (row, view, change) for a crop shifted by one pixel, a flipped view and another RandAugment op."""
    crop_row, crop_view = next((r, v) for r, views in enumerate(aug) for v, view in enumerate(views)
                               if view["crop"][1] > 0)
    used = {(crop_row, crop_view)}
    flip_row, flip_view = next((r, v) for r, views in enumerate(aug) for v in range(len(views))
                               if (r, v) not in used and r != crop_row)
    op_row, op_view = next((r, v) for r, views in enumerate(aug) for v, view in enumerate(views)
                           if view["rand_augment"] and r not in (crop_row, flip_row))
    aug[crop_row][crop_view]["crop"][1] -= 1
    aug[flip_row][flip_view]["flip"] = not aug[flip_row][flip_view]["flip"]
    first = aug[op_row][op_view]["rand_augment"][0]
    first["op"] = 1 if first["op"] != 1 else 2  # Equalize or Rotate instead of the sampled op
    return [(crop_row, crop_view), (flip_row, flip_view), (op_row, op_view)]


def test_verify_names_the_views_whose_stored_parameters_changed(reinforced, tmp_path):
    """A 1-px crop shift, a flip and a swapped op in the stored parameters of a real dataset:
    verify's pixel check names each damaged sample and view."""
    root = shutil.copytree(reinforced.arrow, tmp_path / "damaged")
    unit = json.loads((root / "dataset.json").read_text())["units"][0]
    path = root / unit["files"]["data"]["path"]
    table = pq.read_table(path)
    aug = table.column("aug").to_pylist()
    damaged = _damaged(aug)
    index = table.schema.get_field_index("aug")
    pq.write_table(table.set_column(index, table.schema.field(index), pa.array(aug, type=table.schema.field(index).type)), path)
    keys = table.column("key").to_pylist()
    code, out, err = _verify(str(root), "--samples", "18", "--json")
    assert code == 1
    report = json.loads(out)
    expected = [{"key": keys[row], "view": view} for row, view in damaged]
    assert not report["passed"] and sorted(report["replay"]["mismatched"], key=lambda m: (m["key"], m["view"])) == sorted(
        expected, key=lambda m: (m["key"], m["view"]))
    for row, view in damaged:
        assert f"replay: sample {keys[row]} view {view}: " in err
