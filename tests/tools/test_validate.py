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
import traceback
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from dr_pipeline.cli import app
from dr_pipeline.dataset.manifest import totals


def _validate(path):
    result = CliRunner().invoke(app, ["validate", str(path)])
    # validate reports problems as lines; an exception escaping it is a bug, shown with its traceback
    assert not isinstance(result.exception, Exception), "".join(traceback.format_exception(result.exception))
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


# ---------------------------------------------------------------------- one damage per check
# Each case damages exactly one property of a copy of a real dataset and returns the lines
# `dr-gen validate` must print (a line may be given by its start when it ends with an error's text).


def _write_json(path, data):
    path.write_text(json.dumps(data))


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    _write_json(path, data)
    return data


def _set_manifest_units(root, units):
    manifest = _manifest(root)
    manifest["units"] = units
    manifest["totals"] = totals(manifest["totals"]["units_planned"], units)
    _write_json(root / "dataset.json", manifest)


def _where(root, index, file="data"):
    unit = _unit(root, index)
    return f"unit {unit['id']}: {unit['files'][file]['path']}"


def _rewrite_column(root, index, column, change):
    """Rewrite one column of a unit's Parquet file from its Python values; returns the keys."""
    def rewrite(table):
        position = table.schema.get_field_index(column)
        field = table.schema.field(position)
        values = table.column(column).to_pylist()
        change(values)
        return table.set_column(position, field, pa.array(values, type=field.type))

    _, _, table = _rewrite_parquet(root, index, rewrite)
    return table.column("key").to_pylist()


def _rewrite_tar(root, index, change):
    """Rewrite a webdataset unit's members with `change(list of [name, bytes])`; returns the keys."""
    unit = _unit(root, index)
    path = root / unit["files"]["data"]["path"]
    with tarfile.open(path) as tar:
        members = [[info.name, tar.extractfile(info).read()] for info in tar]
    keys = list(dict.fromkeys(name.split(".")[0] for name, _ in members))
    members = change(members, keys)
    rewritten = io.BytesIO()
    with tarfile.open(fileobj=rewritten, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(rewritten.getvalue())
    _refresh(root, unit["id"])
    return keys


def _replace_member(suffix, change):
    """A tar change: member `KEY0.suffix` of the first sample replaced by change(bytes)."""
    def apply(members, keys):
        return [[name, change(data) if name == f"{keys[0]}.{suffix}" else data] for name, data in members]
    return apply


def _plan_hash(root):
    plan = _edit_json(root / "plan.json", lambda p: p.update(config_hash="0" * 16))
    return [f"plan.json: config hash {plan['config_hash']}, dataset.json says {_manifest(root)['config_hash']}"]


def _plan_extra_unit(root):
    _edit_json(root / "plan.json", lambda p: p["units"].append({"id": "00003", "input": p["units"][0]["input"]}))
    return ["plan.json: 4 units, dataset.json says 3 planned"]


def _plan_missing(root):
    (root / "plan.json").unlink()
    return ["plan.json: missing"]


def _unit_not_in_plan(root):
    _edit_json(root / "plan.json", lambda p: p["units"][2].update(id="99999"))
    return [f"unit {_unit(root, 2)['id']}: not in plan.json"]


def _marker_missing(root):
    unit_id = _unit(root, 1)["id"]
    (root / "data" / f"{unit_id}.stats.json").unlink()
    return [f"unit {unit_id}: no stats marker data/{unit_id}.stats.json (unit not committed)"]


def _unit_missing_from_manifest(root):
    units = _manifest(root)["units"]
    _set_manifest_units(root, units[:2])
    return [f"unit {units[2]['id']}: committed but missing from dataset.json (rerun the job to rebuild it)"]


def _status_incomplete(root):
    _edit_json(root / "dataset.json", lambda m: m.update(status="incomplete"))
    return ["dataset.json: status incomplete: 3 of 3 units committed"]


def _columns_differ(root):
    _edit_json(root / "dataset.json", lambda m: m["columns"].update(key="int64"))
    return ["dataset.json: columns differ from the Arrow schema of its layout"]


def _card_dim_differs(root):
    _edit_json(root / "dataset.json", lambda m: m["teachers"][0]["card"].update(embedding_dim=65))
    return ["dataset.json: layout teachers differ from the teacher cards (ids, order or dims)"]


def _failures_by_reason_sum(root):
    units = _manifest(root)["units"]
    index, unit = next((i, u) for i, u in enumerate(units) if u["failures"])
    reason = next(iter(unit["failures_by_reason"]))
    recorded = dict(unit["failures_by_reason"])
    unit["failures_by_reason"][reason] += 1
    _write_json(root / "data" / f"{unit['id']}.stats.json", {**unit, "input": json.loads(
        (root / "data" / f"{unit['id']}.stats.json").read_text())["input"]})
    _set_manifest_units(root, units)
    return [f"unit {unit['id']}: failures_by_reason sums to {unit['failures'] + 1}, failures is {unit['failures']}",
            f"{_where(root, index, 'failures')}: failures by reason {recorded}, the manifest says "
            f"{unit['failures_by_reason']}"]


def _failures_index(root):
    return next(i for i, u in enumerate(_manifest(root)["units"]) if u["failures"])


def _size_differs(root):
    index = _failures_index(root)
    info = _unit(root, index)["files"]["failures"]
    with open(root / info["path"], "ab") as handle:
        handle.write(b"\n")
    return [f"{_where(root, index, 'failures')}: {info['bytes'] + 1} bytes, the manifest says {info['bytes']}"]


def _failures_file(root, index, text):
    unit = _unit(root, index)
    (root / unit["files"]["failures"]["path"]).write_text(text)
    _refresh(root, unit["id"])


def _failures_not_json(root):
    index = _failures_index(root)
    _failures_file(root, index, "not json\n")
    return [f"{_where(root, index, 'failures')}: not JSON lines ("]


def _failure_lacks_detail(root):
    index = _failures_index(root)
    path = root / _unit(root, index)["files"]["failures"]["path"]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    del records[0]["detail"]
    _failures_file(root, index, "".join(json.dumps(r) + "\n" for r in records))
    return [f"{_where(root, index, 'failures')}: a record lacks key, reason or detail"]


def _failure_unknown_reason(root):
    index = _failures_index(root)
    unit = _unit(root, index)
    records = [json.loads(line) for line in (root / unit["files"]["failures"]["path"]).read_text().splitlines()]
    records[0]["reason"] = "exploded"
    _failures_file(root, index, "".join(json.dumps(r) + "\n" for r in records))
    by_reason = dict(sorted(Counter(r["reason"] for r in records).items()))
    return [f"{_where(root, index, 'failures')}: unknown failure reasons exploded",
            f"{_where(root, index, 'failures')}: failures by reason {by_reason}, the manifest says "
            f"{unit['failures_by_reason']}"]


def _not_parquet(root):
    unit = _unit(root, 0)
    (root / unit["files"]["data"]["path"]).write_bytes(b"not a parquet file" * 10)
    _refresh(root, unit["id"])
    return [f"{_where(root, 0)}: not a Parquet file ("]


def _extra_column(root):
    _rewrite_parquet(root, 0, lambda t: t.append_column("extra", pa.array([0] * t.num_rows)))
    return [f"{_where(root, 0)}: column extra: not in the schema"]


def _bad_key(root):
    def change(keys):
        keys[0] = "bad key!"
    _rewrite_column(root, 0, "key", change)
    return [f"{_where(root, 0)}: key does not match the schema's key pattern (1 row: bad key!)"]


def _view_missing(root):
    keys = _rewrite_column(root, 0, "aug", lambda aug: aug[1].pop())
    return [f"{_where(root, 0)}: aug holds 2 views, the layout says 3 (1 row: {keys[1]})"]


def _crop_outside(root):
    width = pq.read_table(root / _unit(root, 0)["files"]["data"]["path"]).column("image_width")[2].as_py()

    def change(aug):
        aug[2][0]["crop"][1] = width  # left edge at the image's right border
    keys = _rewrite_column(root, 0, "aug", change)
    return [f"{_where(root, 0)}: a crop box lies outside the image (1 row: {keys[2]})"]


def _crop_negative(root):
    def change(aug):
        aug[2][1]["crop"][0] = -1  # top edge above the image
    keys = _rewrite_column(root, 0, "aug", change)
    return [f"{_where(root, 0)}: a crop box lies outside the image (1 row: {keys[2]})"]


def _images_missing(root):
    """The manifest says the job kept images; the rows hold none."""
    _edit_json(root / "dataset.json", lambda m: m["config"]["output"].update(keep_images=True))
    lines = []
    for index in range(3):
        keys = pq.read_table(root / _unit(root, index)["files"]["data"]["path"]).column("key").to_pylist()
        lines.append(f"{_where(root, index)}: no image, though the job keeps images "
                     f"({len(keys)} rows: {', '.join(keys[:3])}, ...)")
    return lines


def _caption_missing(root):
    keys = _rewrite_column(root, 0, "captions_tiny_coca", lambda captions: captions[3].pop())
    return [f"{_where(root, 0)}: captions_tiny_coca does not hold 2 captions (1 row: {keys[3]})"]


def _image_bytes_changed(root):
    def change(members, keys):
        name = next(n for n, _ in members if n.startswith(f"{keys[0]}.") and n.rsplit(".", 1)[-1] in ("jpg", "png"))
        return [[n, d + b"\0" if n == name else d] for n, d in members]
    keys = _rewrite_tar(root, 0, change)
    return [f"{_where(root, 0)}: the image bytes do not match image_sha256 (1 row: {keys[0]})"]


def _unexpected_member(root):
    def change(members, keys):
        last = max(i for i, (n, _) in enumerate(members) if n.startswith(f"{keys[0]}."))
        return members[: last + 1] + [[f"{keys[0]}.extra.txt", b"x"]] + members[last + 1 :]
    keys = _rewrite_tar(root, 0, change)
    return [f"{_where(root, 0)}: unexpected member .extra.txt (1 row: {keys[0]})"]


def _json_key_differs(root):
    keys = _rewrite_tar(root, 0, _replace_member("json", lambda d: json.dumps({**json.loads(d), "key": "other"}).encode()))
    return [f"{_where(root, 0)}: json key differs from the member names' key (1 row: {keys[0]})"]


def _json_field_missing(root):
    fields = []

    def drop_url(data):
        value = json.loads(data)
        fields.extend(value)
        del value["url"]
        return json.dumps(value).encode()
    keys = _rewrite_tar(root, 0, _replace_member("json", drop_url))
    return [f"{_where(root, 0)}: member .json does not hold exactly {', '.join(fields)} (1 row: {keys[0]})"]


def _member_undecodable(root):
    keys = _rewrite_tar(root, 0, _replace_member("aug.json", lambda d: b"{not json"))
    return [f"{_where(root, 0)}: member .aug.json cannot be decoded (JSONDecodeError) (1 row: {keys[0]})"]


def _not_a_tar(root):
    unit = _unit(root, 0)
    (root / unit["files"]["data"]["path"]).write_bytes(b"not a tar" * 200)
    _refresh(root, unit["id"])
    return [f"{_where(root, 0)}: not a readable tar ("]


def _corrupt_second_row_group(path):
    """Rewrite the Parquet file in row groups of 2 rows, then zero the first bytes of the second
    row group's first column chunk (a page header), leaving the footer, the schema and the first
    row group intact: the file opens, and fails part way."""
    pq.write_table(pq.read_table(path), path, row_group_size=2)
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + 16] = bytes(16)
    path.write_bytes(bytes(data))


def _unreadable_row_group(root):
    unit = _unit(root, 0)
    _corrupt_second_row_group(root / unit["files"]["data"]["path"])
    _refresh(root, unit["id"])
    return [f"{_where(root, 0)}: cannot be read to its end ("]


def _manifest_not_json(root):
    (root / "dataset.json").write_text("{")
    return [f"{root}: dataset.json is not valid JSON ("]


def _manifest_schema(root):
    _edit_json(root / "dataset.json", lambda m: m.update(status="finished"))
    return ["dataset.json: status: 'finished' is not one of ['running', 'complete', 'incomplete']"]


def _schema_version(root):
    _edit_json(root / "dataset.json", lambda m: m.update(schema_version="9.0"))
    return ["dataset schema version 9.0 is not supported by this dr-gen (it reads schema 1.x); upgrade dr-gen to read it"]


def _column_missing(root):
    _, _, table = _rewrite_parquet(root, 0, lambda t: t.drop_columns(["image_sha256"]))
    return [f"{_where(root, 0)}: column image_sha256: missing, schema says {table.schema.field('image_sha256').type}"]


def _column_type_differs(root):
    _, _, table = _rewrite_parquet(root, 0, lambda t: t.set_column(
        t.schema.get_field_index("image_width"), "image_width", t.column("image_width").cast(pa.float64())))
    return [f"{_where(root, 0)}: column image_width: double, schema says {table.schema.field('image_width').type}"]


ARROW_DAMAGES = [_manifest_not_json, _manifest_schema, _schema_version, _plan_hash, _plan_extra_unit, _plan_missing,
                 _unit_not_in_plan, _marker_missing, _unit_missing_from_manifest, _status_incomplete, _columns_differ,
                 _card_dim_differs, _failures_by_reason_sum, _size_differs, _failures_not_json, _failure_lacks_detail,
                 _failure_unknown_reason, _not_parquet, _unreadable_row_group, _extra_column, _column_missing,
                 _column_type_differs, _bad_key, _view_missing, _crop_outside, _crop_negative, _images_missing,
                 _caption_missing]
WEBDATASET_DAMAGES = [_image_bytes_changed, _unexpected_member, _json_key_differs, _json_field_missing,
                      _member_undecodable, _not_a_tar]


def _assert_reports(root, expected):
    code, lines = _validate(root)
    assert code == 1 and len(lines) == len(expected), lines
    for line, start in zip(sorted(lines), sorted(expected)):
        assert line == start or (start.endswith("(") and line.startswith(start)), (line, start)


@pytest.mark.parametrize("damage", ARROW_DAMAGES, ids=lambda d: d.__name__.strip("_"))
def test_each_check_reports_its_damage_in_arrow(arrow_copy, damage):
    _assert_reports(arrow_copy, damage(arrow_copy))


@pytest.mark.parametrize("damage", WEBDATASET_DAMAGES, ids=lambda d: d.__name__.strip("_"))
def test_each_check_reports_its_damage_in_webdataset(webdataset_copy, damage):
    _assert_reports(webdataset_copy, damage(webdataset_copy))


# ---------------------------------------------------------------------- sidecars (`--extend`)


@pytest.fixture(params=["arrow", "webdataset"])
def extended_copy(request, extended, tmp_path):
    return shutil.copytree(getattr(extended, request.param), tmp_path / request.param)


def _extension(root):
    return _manifest(root)["extensions"][0]["extension"]


def _sidecar(root, index):
    """(unit id, sidecar file path, its stats marker path) of unit `index`'s sidecar."""
    unit = _unit(root, index)
    extension = _extension(root)
    return unit["id"], unit["files"][extension]["path"], f"sidecars/{extension}/{unit['id']}.stats.json"


def _refresh_sidecar(root, index):
    """Record the sidecar file as it now is, in its stats marker and in dataset.json."""
    unit_id, path, marker = _sidecar(root, index)
    data = (root / path).read_bytes()
    recorded = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _edit_json(root / marker, lambda m: m["files"]["data"].update(recorded))
    units = _manifest(root)["units"]
    units[index]["files"][_extension(root)].update(recorded)
    _set_manifest_units(root, units)


def _rewrite_sidecar_parquet(root, index, change):
    """Rewrite unit `index`'s sidecar table with `change(table)`; returns the keys it had."""
    _, path, _ = _sidecar(root, index)
    table = pq.read_table(root / path)
    pq.write_table(change(table), root / path)
    _refresh_sidecar(root, index)
    return table.column("key").to_pylist()


def _rewrite_sidecar_tar(root, index, change):
    """Rewrite unit `index`'s sidecar members with `change(list of [name, bytes], keys)`; returns the keys."""
    _, path, _ = _sidecar(root, index)
    with tarfile.open(root / path) as tar:
        members = [[info.name, tar.extractfile(info).read()] for info in tar]
    keys = list(dict.fromkeys(name.split(".")[0] for name, _ in members))
    rewritten = io.BytesIO()
    with tarfile.open(fileobj=rewritten, mode="w") as tar:
        for name, data in change(members, keys):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (root / path).write_bytes(rewritten.getvalue())
    _refresh_sidecar(root, index)
    return keys


def _change_sidecar_rows(root, index, arrow_change, suffix, member_change):
    """One damage to the values of a sidecar column, in whichever format the dataset has:
    `arrow_change(table)`, or `member_change(bytes)` of the first sample's member `.suffix`."""
    if _manifest(root)["format"] == "arrow":
        return _rewrite_sidecar_parquet(root, index, arrow_change)

    def change(members, keys):
        return [[name, member_change(data) if name == f"{keys[0]}.{suffix}" else data] for name, data in members]
    return _rewrite_sidecar_tar(root, index, change)


def _npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _sidecar_marker_missing(root):
    unit_id, _, marker = _sidecar(root, 1)
    (root / marker).unlink()
    return [f"unit {unit_id}: extension {_extension(root)} has no stats marker for it (not committed)"]


def _sidecar_entry_differs(root):
    unit_id, _, marker = _sidecar(root, 1)
    _edit_json(root / marker, lambda m: m["files"]["data"].update(sha256="0" * 64))
    return [f"unit {unit_id}: dataset.json entry of extension {_extension(root)} differs from its marker"]


def _sidecar_not_listed(root):
    unit_id = _unit(root, 1)["id"]
    extension = _extension(root)
    units = _manifest(root)["units"]
    units[1]["files"].pop(extension)
    _set_manifest_units(root, units)
    return [f"unit {unit_id}: no file of extension {extension}",
            f"unit {unit_id}: dataset.json entry of extension {extension} differs from its marker"]


def _sidecar_file_missing(root):
    unit_id, path, _ = _sidecar(root, 2)
    (root / path).unlink()
    return [f"unit {unit_id}: {path}: missing"]


def _sidecar_keys_differ(root):
    unit_id, path, _ = _sidecar(root, 0)
    rows = _unit(root, 0)["samples"]
    if _manifest(root)["format"] == "arrow":
        _rewrite_sidecar_parquet(root, 0, lambda t: t.take(list(reversed(range(t.num_rows)))))
    else:
        _rewrite_sidecar_tar(root, 0, lambda members, keys: [m for m in members if not m[0].startswith(f"{keys[-1]}.")])
        return [f"unit {unit_id}: {path}: its keys differ from the unit's data file from row {rows - 1} on "
                f"({rows - 1} rows, the data file has {rows})"]
    return [f"unit {unit_id}: {path}: its keys differ from the unit's data file from row 0 on "
            f"({rows} rows, the data file has {rows})"]


def _sidecar_captions(root):
    def drop_caption(table):
        position = table.schema.get_field_index("captions_coca_extra")
        values = table.column(position).to_pylist()
        values[0] = []
        return table.set_column(position, table.schema.field(position), pa.array(values, table.schema.field(position).type))

    keys = _change_sidecar_rows(root, 0, drop_caption, "captions.coca_extra.json", lambda data: b"[]")
    return [f"{_where(root, 0, _extension(root))}: captions_coca_extra does not hold 1 captions (1 row: {keys[0]})"]


def _sidecar_nan(root):
    def nan(values):
        values[0, 1, 2] = np.nan
        return values

    keys = _change_sidecar_rows(root, 0, lambda t: _with_embedding(t, "image_emb_tiny_extra", nan),
                                "image_emb.tiny_extra.npy", lambda data: _npy(nan(np.load(io.BytesIO(data))[None].copy())[0]))
    return [f"{_where(root, 0, _extension(root))}: image_emb_tiny_extra has NaN or inf (1 row: {keys[0]})"]


def _sidecar_norm(root):
    def longer(values):
        values[0] *= 1.5
        return values

    keys = _change_sidecar_rows(root, 0, lambda t: _with_embedding(t, "image_emb_tiny_extra", longer),
                                "image_emb.tiny_extra.npy", lambda data: _npy(longer(np.load(io.BytesIO(data))[None].copy())[0]))
    return [f"{_where(root, 0, _extension(root))}: image_emb_tiny_extra has an L2 norm off 1 by more than 0.004 "
            f"(its card says normalized) (1 row: {keys[0]})"]


def _sidecar_not_parquet(root):
    _, path, _ = _sidecar(root, 0)
    (root / path).write_bytes(b"not a parquet file" * 10)
    _refresh_sidecar(root, 0)
    return [f"{_where(root, 0, _extension(root))}: not a Parquet file ("]


def _sidecar_schema_differs(root):
    _rewrite_sidecar_parquet(root, 0, lambda t: t.append_column("extra", pa.array([0] * t.num_rows)))
    return [f"{_where(root, 0, _extension(root))}: its Arrow schema differs from extension {_extension(root)}'s layout"]


def _sidecar_unreadable_row_group(root):
    _, path, _ = _sidecar(root, 0)
    _corrupt_second_row_group(root / path)
    _refresh_sidecar(root, 0)
    return [f"{_where(root, 0, _extension(root))}: cannot be read as extension {_extension(root)}'s layout says ("]


def _sidecar_shape(root):
    keys = _rewrite_sidecar_tar(root, 0, lambda members, keys: [
        [name, _npy(np.load(io.BytesIO(data))[:2]) if name == f"{keys[0]}.image_emb.tiny_extra.npy" else data]
        for name, data in members])
    return [f"{_where(root, 0, _extension(root))}: image_emb_tiny_extra is [2, 64], the extension says [3, 64] "
            f"(1 row: {keys[0]})"]


def _sidecar_member_missing(root):
    _rewrite_sidecar_tar(root, 0, lambda members, keys: [
        m for m in members if m[0] != f"{keys[0]}.image_emb.tiny_extra.npy"])
    return [f"{_where(root, 0, _extension(root))}: cannot be read as extension {_extension(root)}'s layout says ("]


SIDECAR_DAMAGES = [_sidecar_marker_missing, _sidecar_entry_differs, _sidecar_not_listed, _sidecar_file_missing,
                   _sidecar_keys_differ, _sidecar_captions, _sidecar_nan, _sidecar_norm]
ARROW_SIDECAR_DAMAGES = [_sidecar_not_parquet, _sidecar_schema_differs, _sidecar_unreadable_row_group]
WEBDATASET_SIDECAR_DAMAGES = [_sidecar_shape, _sidecar_member_missing]


def test_extended_datasets_pass(extended):
    for root in (extended.arrow, extended.webdataset):
        code, lines = _validate(root)
        assert (code, lines) == (0, ["intact: 3 units, 18 samples, 9 files checked"])


@pytest.mark.parametrize("damage", SIDECAR_DAMAGES, ids=lambda d: d.__name__.strip("_"))
def test_each_sidecar_check_reports_its_damage(extended_copy, damage):
    _assert_reports(extended_copy, damage(extended_copy))


@pytest.mark.parametrize("damage", ARROW_SIDECAR_DAMAGES, ids=lambda d: d.__name__.strip("_"))
def test_each_sidecar_check_reports_its_damage_in_arrow(extended, tmp_path, damage):
    root = shutil.copytree(extended.arrow, tmp_path / "arrow")
    _assert_reports(root, damage(root))


@pytest.mark.parametrize("damage", WEBDATASET_SIDECAR_DAMAGES, ids=lambda d: d.__name__.strip("_"))
def test_each_sidecar_check_reports_its_damage_in_webdataset(extended, tmp_path, damage):
    root = shutil.copytree(extended.webdataset, tmp_path / "wds")
    _assert_reports(root, damage(root))
