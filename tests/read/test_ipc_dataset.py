"""A real run with `output.format: ipc` (Arrow IPC files): the rows of the same job written as
webdataset, read through rows and batches (embedding columns as views of the memory-mapped
files), validated, resumed and exported like any other format."""

import json
import shutil
import traceback

import numpy as np
import pytest
from typer.testing import CliRunner

from dr_pipeline.cli import app
from dr_pipeline.core.config import parse_job
from dr_pipeline.execution.extend import extend_dataset
from dr_pipeline.execution.runner import run_job
from dr_pipeline.read.reader import open_dataset
from dr_pipeline.tools.export import export_datacompdr
from tests.conftest import EXTENSION_TEACHER
from tests.read.conftest import FROM_INPUT
from tests.read.fast_path import assert_batches_equal_rows


def _cli(args):
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert not isinstance(result.exception, Exception), "".join(traceback.format_exception(result.exception))
    return result.exit_code, [line for line in result.stdout.splitlines() if line.strip()]


@pytest.fixture
def ipc_copy(generated, tmp_path):
    return shutil.copytree(generated["ipc"].job.output.url.removeprefix("file://"), tmp_path / "ipc")


def _assert_same_rows(rows, expected):
    """Same columns, same values, same dtypes, row by row."""
    for row, want in zip(rows, expected):
        assert row.keys() == want.keys()
        for name, value in want.items():
            if isinstance(value, np.ndarray):
                assert row[name].dtype == value.dtype and np.array_equal(row[name], value), (want["key"], name)
            else:
                assert row[name] == value, (want["key"], name)


def test_rows_equal_the_same_job_written_as_webdataset(generated):
    ipc, webdataset = generated["ipc"].dataset, generated["from_input"].dataset
    assert ipc.manifest["format"] == "ipc"
    assert [u["files"]["data"]["path"] for u in ipc.units] == [f"data/{u['id']}.arrow" for u in webdataset.units]
    rows, expected = list(ipc.iter_samples()), list(webdataset.iter_samples())
    assert len(rows) == len(expected) == 18
    _assert_same_rows(rows, expected)
    assert assert_batches_equal_rows(ipc) == 18


def _mapped_ranges(path):
    """(start, end) of this process's memory mappings of the file at `path`."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == str(path):
                start, end = (int(address, 16) for address in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def test_batched_embeddings_are_views_of_the_mapped_file(generated):
    dataset = generated["ipc"].dataset
    unit = dataset.units[0]
    path = dataset.location.join(unit["files"]["data"]["path"])
    batches = dataset.iter_unit_batches(unit, batch_size=4)
    batch = next(batches)
    ranges = _mapped_ranges(path)
    assert ranges, "the unit's file is not memory-mapped"
    for name, array in batch.arrays.items():
        address = array.__array_interface__["data"][0]
        assert any(start <= address and address + array.nbytes <= end for start, end in ranges), name
    batches.close()
    kept = batch.arrays[next(iter(batch.arrays))]
    assert np.isfinite(kept.astype(np.float32)).all()  # the mapping outlives the reader's close


def test_validate_is_clean_and_reports_a_truncated_file(ipc_copy):
    assert _cli(["validate", ipc_copy]) == (0, ["intact: 3 units, 18 samples, 6 files checked"])
    unit = json.loads((ipc_copy / "dataset.json").read_text())["units"][1]
    data = ipc_copy / unit["files"]["data"]["path"]
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    code, lines = _cli(["validate", ipc_copy])
    where = f"unit {unit['id']}: {unit['files']['data']['path']}"
    assert code == 1
    assert f"{where}: {data.stat().st_size} bytes, the manifest says {unit['files']['data']['bytes']}" in lines
    assert any(line.startswith(f"{where}: not an Arrow IPC file (") for line in lines), lines


def test_a_rerun_skips_the_committed_units_and_rewrites_nothing(generated, ipc_copy):
    job = generated["ipc"].job
    job = job.model_copy(update={"output": job.output.model_copy(update={"url": str(ipc_copy)})})
    files = {path: path.read_bytes() for path in (ipc_copy / "data").iterdir()}
    summary = run_job(job)
    assert (summary.units_skipped, summary.units_done, summary.units_failed) == (3, 0, [])
    assert {path: path.read_bytes() for path in (ipc_copy / "data").iterdir()} == files


def test_export_equals_the_webdataset_runs_export(generated, tmp_path):
    code, lines = _cli(["export", generated["ipc"].job.output.url, tmp_path / "ipc", "--format", "datacompdr"])
    assert code == 0, lines
    export_datacompdr(open_dataset(generated["from_input"].job.output.url), str(tmp_path / "webdataset"))
    names = sorted(p.name for p in (tmp_path / "webdataset").iterdir())
    assert sorted(p.name for p in (tmp_path / "ipc").iterdir()) == names and len(names) == 5
    for name in names:
        if name != "config.json":
            assert (tmp_path / "ipc" / name).read_bytes() == (tmp_path / "webdataset" / name).read_bytes(), name
    ipc, webdataset = (json.loads((tmp_path / name / "config.json").read_text()) for name in ("ipc", "webdataset"))
    assert ipc["source"].pop("config_hash") == generated["ipc"].dataset.manifest["config_hash"]
    webdataset["source"].pop("config_hash")  # output.format is part of the config
    assert ipc == webdataset


def test_extend_writes_ipc_sidecars_whose_rows_equal_the_webdataset_extension(
    generated, sample_shards, small_job_dict, tmp_path
):
    """--extend of an ipc dataset (a third teacher): its sidecars are Arrow IPC files, and its rows,
    new teacher included, equal those of the same extension of the job written as webdataset;
    validate, verify and show take the extended ipc dataset like any other."""
    extended = {}
    for name, output_format in (("ipc", "ipc"), ("from_input", "webdataset")):
        out = shutil.copytree(generated[name].job.output.url.removeprefix("file://"), tmp_path / name)
        job = small_job_dict(sample_shards, out, output={"format": output_format, "embedding_dtype": "bfloat16"},
                             **FROM_INPUT)
        job["teachers"] = [*job["teachers"], EXTENSION_TEACHER]
        extend_dataset(parse_job(job))
        extended[name] = open_dataset(str(out))
    ipc, webdataset = extended["ipc"], extended["from_input"]

    (extension,) = ipc.manifest["extensions"]
    sidecars = sorted(unit["files"][extension["extension"]]["path"] for unit in ipc.units)
    assert sidecars == [f"sidecars/{extension['extension']}/{unit}.arrow" for unit in ("00000", "00001", "00002")]
    assert all((tmp_path / "ipc" / path).is_file() for path in sidecars)
    rows, expected = list(ipc.iter_samples()), list(webdataset.iter_samples())
    assert len(rows) == len(expected) == 18
    assert any(EXTENSION_TEACHER["id"] in name for name in expected[0]), list(expected[0])  # the new teacher's columns
    _assert_same_rows(rows, expected)
    assert assert_batches_equal_rows(ipc) == 18

    assert _cli(["validate", tmp_path / "ipc"])[0] == 0
    code, lines = _cli(["verify", tmp_path / "ipc", "--samples", "4", "--json"])
    assert code == 0, lines
    report = json.loads("\n".join(lines))
    (added,) = [check for check in report["teachers"] if check["teacher"] == EXTENSION_TEACHER["id"]]
    assert report["passed"] and added["min"] >= report["threshold"] and added["image"]["count"] > 0
    assert report["replay"]["views"] > 0 and report["replay"]["mismatched"] == []
    png = tmp_path / "grid.png"
    code, lines = _cli(["show", tmp_path / "ipc", "--key", rows[0]["key"], "--out", png])
    assert code == 0 and png.stat().st_size > 0, lines
