"""`dr-gen validate` on an intact dataset and on copies corrupted one way at a time.

Most corruptions are followed by `_refresh`, which records the changed file's new
size and checksum in its stats marker and in dataset.json as a careless editor
would, so that only the content problem itself is left to find.
"""

import hashlib
import io
import json
import shutil
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from dr_pipeline.cli import app
from dr_pipeline.manifest import totals


def _validate(path):
    result = CliRunner().invoke(app, ["validate", str(path)])
    return result.exit_code, [line for line in result.stdout.splitlines() if line.strip()]


@pytest.fixture
def arrow_copy(reinforced, tmp_path):
    return shutil.copytree(reinforced.arrow, tmp_path / "arrow")


@pytest.fixture
def webdataset_copy(reinforced, tmp_path):
    return shutil.copytree(reinforced.webdataset, tmp_path / "wds")


def _manifest(root):
    return json.loads((root / "dataset.json").read_text())


def _unit(root, index):
    return _manifest(root)["units"][index]


def _refresh(root, unit_id):
    """Record the unit's files as they now are, in its stats marker and in dataset.json."""
    marker_path = root / "data" / f"{unit_id}.stats.json"
    marker = json.loads(marker_path.read_text())
    for info in marker["files"].values():
        data = (root / info["path"]).read_bytes()
        info.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    marker_path.write_text(json.dumps(marker))
    manifest = _manifest(root)
    manifest["units"] = [{**marker, "input": u["input"]} if u["id"] == unit_id else u for u in manifest["units"]]
    manifest["totals"] = totals(manifest["totals"]["units_planned"], manifest["units"])
    (root / "dataset.json").write_text(json.dumps(manifest))


def _rewrite_parquet(root, index, change):
    unit = _unit(root, index)
    path = root / unit["files"]["data"]["path"]
    table = pq.read_table(path)
    pq.write_table(change(table), path)
    _refresh(root, unit["id"])
    return unit["id"], unit["files"]["data"]["path"], table


def _with_embedding(table, column, change):
    """The table with `change(values)` applied to the [N, rows, D] values of an embedding column."""
    array = table.column(column).combine_chunks()
    rows, dim = array.type.list_size, array.type.value_type.list_size
    values = np.asarray(array.flatten().flatten().to_numpy(zero_copy_only=False)).reshape(len(array), rows, dim)
    values = change(values.copy())
    inner = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim)
    rebuilt = pa.FixedSizeListArray.from_arrays(inner, rows).cast(array.type)
    return table.set_column(table.schema.get_field_index(column), table.schema.field(column), rebuilt)


def test_intact_datasets_pass(reinforced):
    for url in (reinforced.arrow, reinforced.webdataset):
        code, lines = _validate(url)
        assert (code, lines) == (0, ["intact: 3 units, 18 samples, 6 files checked"])


def test_a_flipped_byte_is_a_checksum_problem(arrow_copy):
    unit = _unit(arrow_copy, 0)
    path = arrow_copy / unit["files"]["data"]["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    code, lines = _validate(arrow_copy)
    assert code == 1
    assert f"unit {unit['id']}: {unit['files']['data']['path']}: sha256 differs from the manifest " \
           "(the file changed or is corrupt)" in lines


def test_a_dropped_row_is_a_count_problem(arrow_copy):
    unit_id, path, table = _rewrite_parquet(arrow_copy, 0, lambda t: t.slice(0, t.num_rows - 1))
    assert _validate(arrow_copy) == (1, [f"unit {unit_id}: {path}: {table.num_rows - 1} rows, "
                                         f"the manifest says {table.num_rows} samples"])


def test_a_key_repeated_in_another_unit(arrow_copy):
    first = pq.read_table(arrow_copy / _unit(arrow_copy, 0)["files"]["data"]["path"]).column("key")[0].as_py()

    def take_first_key(table):
        keys = table.column("key").to_pylist()
        return table.set_column(0, "key", pa.array([first] + keys[1:], type=pa.string()))

    _rewrite_parquet(arrow_copy, 1, take_first_key)
    units = f"{_unit(arrow_copy, 0)['id']}, {_unit(arrow_copy, 1)['id']}"
    assert _validate(arrow_copy) == (1, [f"key {first}: 2 samples share it (units {units})"])


def test_nan_and_a_norm_off_one_are_reported_with_their_keys(arrow_copy):
    def corrupt(values):
        values[2, 1, 5] = np.nan
        values[4] *= 1.5
        return values

    unit_id, path, table = _rewrite_parquet(
        arrow_copy, 2, lambda t: _with_embedding(t, "image_emb_tiny_vit_32", corrupt))
    keys = table.column("key").to_pylist()
    code, lines = _validate(arrow_copy)
    assert code == 1 and lines == [
        f"unit {unit_id}: {path}: image_emb_tiny_vit_32 has NaN or inf (1 row: {keys[2]})",
        f"unit {unit_id}: {path}: image_emb_tiny_vit_32 has an L2 norm off 1 by more than 0.004 "
        f"(its card says normalized) (1 row: {keys[4]})",
    ]


def test_a_wrong_count_in_the_manifest(arrow_copy):
    manifest = _manifest(arrow_copy)
    unit = manifest["units"][1]
    unit["samples"] += 1
    (arrow_copy / "dataset.json").write_text(json.dumps(manifest))
    code, lines = _validate(arrow_copy)
    where = f"unit {unit['id']}"
    assert code == 1 and sorted(lines) == sorted([
        "dataset.json: totals.samples is 18, the units sum to 19",
        f"{where}: dataset.json entry differs from data/{unit['id']}.stats.json",
        f"{where}: input_samples {unit['input_samples']} != samples {unit['samples']} + failures {unit['failures']}",
        f"{where}: {unit['files']['data']['path']}: {unit['samples'] - 1} rows, the manifest says "
        f"{unit['samples']} samples",
    ])


def test_failures_must_match_the_failures_file(arrow_copy):
    unit = next(u for u in _manifest(arrow_copy)["units"] if u["failures"])
    path = arrow_copy / unit["files"]["failures"]["path"]
    records = path.read_text().splitlines()
    path.write_text("\n".join(records[1:]) + ("\n" if records[1:] else ""))
    _refresh(arrow_copy, unit["id"])
    code, lines = _validate(arrow_copy)
    where = f"unit {unit['id']}: {unit['files']['failures']['path']}"
    remaining = {}
    for record in records[1:]:
        reason = json.loads(record)["reason"]
        remaining[reason] = remaining.get(reason, 0) + 1
    assert code == 1 and lines == [
        f"{where}: {len(records) - 1} records, the manifest says {unit['failures']} failures",
        f"{where}: failures by reason {remaining}, the manifest says {unit['failures_by_reason']}",
    ]


def test_a_missing_data_file(arrow_copy):
    unit = _unit(arrow_copy, 2)
    (arrow_copy / unit["files"]["data"]["path"]).unlink()
    assert _validate(arrow_copy) == (1, [f"unit {unit['id']}: {unit['files']['data']['path']}: missing"])


def test_webdataset_members_are_checked_for_dtype_shape_and_presence(webdataset_copy):
    unit = _unit(webdataset_copy, 0)
    path = webdataset_copy / unit["files"]["data"]["path"]
    with tarfile.open(path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar]
    keys = list(dict.fromkeys(info.name.split(".")[0] for info, _ in members))
    rewritten = io.BytesIO()
    with tarfile.open(fileobj=rewritten, mode="w") as tar:
        for info, data in members:
            if info.name == f"{keys[0]}.image_emb.tiny_vit_32.npy":
                buffer = io.BytesIO()
                np.save(buffer, np.load(io.BytesIO(data)).astype(np.float32))
                data = buffer.getvalue()
            if info.name == f"{keys[1]}.captions.tiny_coca.json":
                continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(rewritten.getvalue())
    _refresh(webdataset_copy, unit["id"])
    code, lines = _validate(webdataset_copy)
    where = f"unit {unit['id']}: {unit['files']['data']['path']}"
    assert code == 1 and lines == [
        f"{where}: member .image_emb.tiny_vit_32.npy is float32 [3, 64], the schema says float16 [3, 64] "
        f"(1 row: {keys[0]})",
        f"{where}: member .captions.tiny_coca.json missing (1 row: {keys[1]})",
    ]


def test_a_folder_without_a_manifest(tmp_path):
    code, lines = _validate(tmp_path)
    assert code == 1 and len(lines) == 1 and "no dataset.json here" in lines[0]
