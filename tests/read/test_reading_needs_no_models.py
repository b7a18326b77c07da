"""Reading, inspecting and validating a dataset import neither torch, torchvision, Ray nor transformers.

A trainer's loader, `dr-gen inspect` and `dr-gen validate` on a machine without the model stack
need only what the records (core/records.py) and the readers need. Each check runs in a fresh
interpreter, whose sys.modules is then looked at.
"""

import json
import subprocess
import sys

import pytest

MODEL_STACK = ("torch", "torchvision", "ray", "transformers", "open_clip")

READ_EVERYTHING = """
import json, sys
from typer.testing import CliRunner

from dr_pipeline import open_dataset
from dr_pipeline.cli import app
from dr_pipeline.core.records import ViewParams
from dr_pipeline.tools.validate import validate_dataset

url = sys.argv[1]
dataset = open_dataset(url)
rows = list(dataset.iter_samples())
assert rows and all(isinstance(view, ViewParams) for row in rows for view in row["aug"])
batches = list(dataset.iter_batches(batch_size=2))
assert sum(len(batch) for batch in batches) == len(rows) == len(dataset)
assert batches[0].views.params(0, 0) == rows[0]["aug"][0]
for unit in dataset.units:
    dataset.failures(unit)
report = validate_dataset(url)
assert not report.problems, report.problems
for command in (["inspect", "--json", url], ["validate", url]):
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in %r)))
""" % (MODEL_STACK,)


@pytest.mark.parametrize("name", ["kept", "from_input", "ipc"])
def test_reading_inspecting_and_validating_import_no_model_library(generated, name):
    done = subprocess.run([sys.executable, "-c", READ_EVERYTHING, generated[name].job.output.url],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []
