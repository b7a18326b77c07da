"""Safety: no credential in a URL dr-gen records, no pickle in any output, no code run while
loading weights; and RELIABILITY.md names only tests that exist."""

import ast
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from dr_pipeline.cli import app
from dr_pipeline.core.config import TeacherConfig, parse_job
from dr_pipeline.core.errors import ConfigError
from dr_pipeline.read.reader import open_dataset
from teachers import build_teacher
from tests.reliability.test_bad_inputs import CASES

SECRET = "s3cr3t-in-a-url"
REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "section, value",
    [
        ("input", f"https://user:{SECRET}@example.org/shards/{{0..9}}.tar"),
        ("input", f"https://example.org/shards/0.tar?X-Amz-Signature={SECRET}"),
        ("output", f"ftp://user:{SECRET}@example.org/out"),
        ("teacher", f"open_clip:ViT-B-32@https://example.org/w.pt?token={SECRET}"),
    ],
)
def test_credentials_in_a_url_are_refused_without_repeating_them(small_job_dict, section, value):
    data = small_job_dict(["/data/0.tar"], "/tmp/out")
    if section == "teacher":
        data["teachers"] = [{"id": "remote", "spec": value}]
    else:
        data[section] = {**data[section], "url" if section == "output" else "urls": value}
    with pytest.raises(ConfigError) as refused:
        parse_job(data)
    message = str(refused.value)
    assert SECRET not in message and "\n" not in message
    assert "recorded in the dataset" in message and ("storage_options" in message or "environment" in message)


def test_cli_refuses_a_url_with_credentials_in_one_line(small_job_dict, tmp_path):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(json.dumps(small_job_dict(["/data/0.tar"], tmp_path / "out")))
    result = CliRunner().invoke(app, ["run", str(job_file), "--input", f"https://x:{SECRET}@example.org/0.tar"])
    assert result.exit_code == 2 and SECRET not in result.output
    assert "input.storage_options" in result.output and not (tmp_path / "out").exists()


def test_urls_without_credentials_stay_allowed(small_job_dict):
    data = small_job_dict(["s3://bucket/shard-000?.tar", "https://user@example.org/a.tar"], "gs://bucket/out")
    assert parse_job(data).input.url_list == ["s3://bucket/shard-000?.tar", "https://user@example.org/a.tar"]


class _RunsCodeWhenUnpickled:
    """A checkpoint entry that creates a file if anything unpickles it without weights_only."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_weights_are_loaded_without_running_pickled_code(tmp_path):
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "weights.pt"
    torch.save({"state_dict": {}, "payload": _RunsCodeWhenUnpickled(marker)}, checkpoint)
    with pytest.raises(ConfigError, match="cannot load the open_clip model"):
        build_teacher(TeacherConfig(id="unsafe", spec=f"open_clip:dr-tiny-vit-32@{checkpoint}"))
    assert not marker.exists()


def _no_pickle_in(path: Path) -> None:
    """Every output file parses as the format its name says, none of which can hold a pickle."""
    data = path.read_bytes()
    if path.suffix == ".json":
        json.loads(data)
    elif path.suffix == ".jsonl":
        [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    elif path.suffix == ".parquet":
        table = pq.read_table(path)
        assert not any(b"pickle" in key or b"pandas" in key for key in (table.schema.metadata or {}))
    elif path.suffix == ".tar":
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                content = tar.extractfile(member).read()
                if member.name.endswith(".npy"):
                    assert np.load(io.BytesIO(content), allow_pickle=False).dtype != object
                elif member.name.endswith(".json"):
                    json.loads(content)
                else:
                    assert member.name.rsplit(".", 1)[-1] in ("jpg", "png", "webp"), member.name
    else:
        raise AssertionError(f"unexpected output file {path}")


def test_no_pickle_in_any_output_or_manifest(reinforced):
    files = []
    for url in (reinforced.arrow, reinforced.webdataset):
        root = Path(open_dataset(url).location.path)
        files += [p for p in root.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".json", ".jsonl", ".parquet", ".tar"}
    for path in files:
        _no_pickle_in(path)


def _defined_tests(path: Path) -> tuple[set[str], set[str]]:
    """The test functions a test file defines, and its parameter ids: the string constants it holds
    and the names of its module-level helpers without their leading underscore (ids made from them)."""
    tree = ast.parse(path.read_text())
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    strings |= {n.name.strip("_") for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("_")}
    return functions, strings


def test_reliability_table_names_tests_that_exist():
    """Each row of RELIABILITY.md names the test that keeps it true; every reliability test has a row."""
    table = (REPOSITORY / "RELIABILITY.md").read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)::(test_\w+)(?:\[(\w+)\])?`", table)
    assert len(named) > 30
    for file, function, parameter in named:
        functions, strings = _defined_tests(REPOSITORY / file)
        assert function in functions, f"{file}::{function} named in RELIABILITY.md does not exist"
        assert not parameter or parameter in strings, f"{file}::{function}[{parameter}] does not exist"
    assert {parameter for _, function, parameter in named if function == "test_bad_input_outcome"} == set(CASES)
    mentioned = {(file, function) for file, function, _ in named}
    for path in sorted((REPOSITORY / "tests" / "reliability").glob("test_*.py")):
        file = str(path.relative_to(REPOSITORY))
        for function in _defined_tests(path)[0] - {"test_reliability_table_names_tests_that_exist"}:
            assert (file, function) in mentioned, f"{file}::{function} has no row in RELIABILITY.md"
