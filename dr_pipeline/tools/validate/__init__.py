"""`dr-gen validate`: is every committed unit what dataset.json and schema v1 say it is?

Each problem is one line, `WHERE: WHAT`; a problem shared by many rows of a
unit is one line naming how many rows and the first few keys. Checked:
- dataset.json: its JSON Schema, status complete, totals equal to the sum of
  the units, `columns` equal to the layout's Arrow schema, every unit entry
  equal to its stats marker, and the plan it was built from;
- every unit: each recorded file exists with its size and sha256;
  input_samples = samples + failures; the failures file holds exactly the
  recorded failures, by reason;
- every data file: its Arrow schema (Parquet), or its member names, npy dtypes
  and shapes (webdataset), as the layout says; as many rows as recorded; keys
  of the schema's key pattern; K views whose crops lie inside the image; S
  captions per captioner; finite embeddings, of L2 norm 1 where the teacher's
  card says normalized; kept images matching their sha256;
- every sidecar file of an extension (`--extend`): its Arrow schema or members
  as the extension's layout says, the keys of the unit's data file in the same
  order, S captions per added captioner, finite embeddings of the right shape
  and norm;
- keys unique across the whole dataset (kept as 8-byte hashes, so a billion
  keys fit in memory; the units of a colliding hash are read again to name it).

One module per concern: manifest (dataset.json, plan.json, markers), files (sizes and
checksums), failures (counts and failures files), rows (data files: the format module's
own checks, dataset/formats, then the values), sidecars, keys (across units).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from dr_pipeline.core.errors import DatasetError
from dr_pipeline.core.storage import Location
from dr_pipeline.dataset.manifest import read_manifest
from dr_pipeline.tools.validate.common import CheckedDataset, UnitResult
from dr_pipeline.tools.validate.failures import count_problems, failures_problems
from dr_pipeline.tools.validate.files import file_problem
from dr_pipeline.tools.validate.keys import duplicate_key_problems
from dr_pipeline.tools.validate.manifest import manifest_problems
from dr_pipeline.tools.validate.rows import check_data
from dr_pipeline.tools.validate.sidecars import sidecar_problems


@dataclass
class ValidationReport:
    problems: list[str]
    units: int = 0
    rows: int = 0
    files: int = 0


class DatasetValidator:
    """Checks one dataset folder whose manifest passed its JSON Schema; `run` returns every problem found."""

    def __init__(self, out: Location, manifest: dict[str, Any], workers: int = 4):
        self.dataset = CheckedDataset(out, manifest)
        self.workers = workers

    def run(self) -> ValidationReport:
        report = ValidationReport(manifest_problems(self.dataset))
        units = self.dataset.manifest["units"]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            results = list(pool.map(self._check_unit, units))
        for result in results:
            report.problems += result.problems
            report.rows += result.rows
            report.files += result.files
        report.units = len(units)
        report.problems += duplicate_key_problems(self.dataset, units, [r.key_hashes for r in results])
        return report

    def _check_unit(self, unit: dict[str, Any]) -> UnitResult:
        dataset = self.dataset
        where = f"unit {unit['id']}"
        result = UnitResult(problems=count_problems(unit))
        intact = {name: file_problem(dataset.out, info) for name, info in unit["files"].items()}
        for name, problem in intact.items():
            if problem:
                result.problems.append(f"{where}: {unit['files'][name]['path']}: {problem}")
        result.files = len(intact)
        if intact["failures"] != "missing":
            result.problems += failures_problems(dataset.out, unit)
        if intact["data"] != "missing":
            check_data(dataset, unit, result)
        for sidecar in dataset.sidecars:
            if sidecar.extension not in unit["files"]:
                result.problems.append(f"{where}: no file of extension {sidecar.extension}")
            elif intact[sidecar.extension] != "missing" and result.keys is not None:
                path = unit["files"][sidecar.extension]["path"]
                result.problems += sidecar_problems(dataset, f"{where}: {path}", path, sidecar, result.keys)
        return result


def validate_dataset(url: str, storage_options: dict[str, Any] | None = None, workers: int = 4) -> ValidationReport:
    """Every problem of the dataset at `url`; a manifest that cannot be read is the one problem."""
    try:
        out, manifest = read_manifest(url, storage_options)
    except DatasetError as error:
        return ValidationReport([str(error)])
    return DatasetValidator(out, manifest, workers).run()
