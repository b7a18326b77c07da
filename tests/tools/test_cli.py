"""The command line: bad input is one line on stderr with exit code 2, before Ray or any model starts."""

import json

import pytest
import ray
from typer.testing import CliRunner

from dr_pipeline.cli import app


def _run(args):
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.stdout, result.stderr


def _write_job(tmp_path, data):
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"teachers": [{"id": "t", "spec": "nosuchkind:model"}]}, "nosuchkind"),
        ({"teachers": [{"id": "t", "spec": "open_clip:NoSuchModel-99"}]}, "NoSuchModel-99"),
        ({"input": {"urls": "/nonexistent/dir/{00000..00003}.tar"}}, "/nonexistent/dir"),
        ({"augmentation": {"num_views": -1}}, "augmentation.num_views"),
        ({"shards": 3}, "shards: unknown key"),
    ],
)
def test_bad_job_fails_with_one_line_before_any_work(tmp_path, sample_shards, small_job_dict, change, message):
    data = small_job_dict(sample_shards, tmp_path / "out")
    data.update(change)
    code, out, err = _run(["run", _write_job(tmp_path, data)])
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("error:")
    assert not ray.is_initialized()
    assert not (tmp_path / "out" / "data").exists()


def test_unwritable_output_fails_before_any_work(tmp_path, sample_shards, small_job_dict):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = _run(["run", _write_job(tmp_path, small_job_dict(sample_shards, blocker / "out"))])
    assert code == 2 and "is not writable" in err and not ray.is_initialized()


def test_inspect_refuses_what_is_not_a_dataset(tmp_path):
    code, _, err = _run(["inspect", str(tmp_path)])
    assert code == 2 and "no dataset.json" in err
    (tmp_path / "dataset.json").write_text(json.dumps({"schema_version": "9.0"}))
    code, _, err = _run(["inspect", str(tmp_path)])
    assert code == 2 and "schema version 9.0 is not supported" in err


def test_teachers_lists_kinds_with_examples():
    code, out, _ = _run(["teachers"])
    assert code == 0 and "example: open_clip:ViT-L-14/datacomp_xl_s13b_b90k" in out
    # each kind starts a line; the order is that of registration, which other tests' imports change
    assert {"hf", "st", "python"} <= {line.split("  (teacher")[0] for line in out.splitlines() if "  (teacher" in line}
