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
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dr_pipeline.core.errors import DatasetError, error_line
from dr_pipeline.dataset.manifest import read_manifest, read_unit_stats, totals
from dr_pipeline.dataset.plan import read_plan
from dr_pipeline.read.reader import file_rows, fixed_size_matrix
from dr_pipeline.core.schema import FAILURE_REASONS, KEY_PATTERN, DatasetLayout, from_storage, is_quantized, scale_column
from dr_pipeline.dataset.sidecars import SidecarLayout, base_layout, sidecar_folder
from dr_pipeline.core.storage import Location, redact_url

NORM_TOLERANCE = {"float32": 1e-3, "float16": 4e-3, "bfloat16": 2e-2, "int8": 1e-3}
"""How far from 1 a stored L2 norm may be: the rounding of the storage dtype, with margin (int8's
scale keeps each row's norm, so only float32 rounding remains)."""

KEYS_SHOWN = 3
_BATCH_ROWS = 1024
_HASH_CHUNK = 8 * 1024 * 1024


@dataclass
class ValidationReport:
    problems: list[str]
    units: int = 0
    rows: int = 0
    files: int = 0


@dataclass
class _Rows:
    """Values of a batch of rows, as every check needs them, whichever the file format."""

    keys: list[str]
    heights: np.ndarray
    widths: np.ndarray
    views_per_row: np.ndarray
    crops: np.ndarray  # [sum(views_per_row), 4]: top, left, height, width
    captions: dict[str, list[Any]]
    arrays: dict[str, np.ndarray]  # embeddings [n, rows, D] in the storage dtype, and their scales [n, rows]
    images: list[bytes | None]
    image_sha256: list[str]
    unchecked_keys: list[str] = field(default_factory=list)  # rows too malformed for the value checks


class _UnusableFile(Exception):
    """A data file that cannot be read as the layout says; `lines` say why."""

    def __init__(self, lines: list[str]):
        super().__init__("; ".join(lines))
        self.lines = lines


@dataclass
class _UnitResult:
    problems: list[str] = field(default_factory=list)
    key_hashes: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    keys: list[str] | None = None  # of the data file, in order; None when it could not be read
    rows: int = 0
    files: int = 0


class _RowProblems:
    """Problems of single rows, grouped by message so a bad column is one line, not thousands."""

    def __init__(self) -> None:
        self.keys: dict[str, list[str]] = defaultdict(list)

    def add(self, message: str, key: str) -> None:
        self.keys[message].append(key)

    def lines(self, where: str) -> list[str]:
        lines = []
        for message, keys in self.keys.items():
            shown = ", ".join(keys[:KEYS_SHOWN]) + (", ..." if len(keys) > KEYS_SHOWN else "")
            lines.append(f"{where}: {message} ({len(keys)} row{'s' if len(keys) > 1 else ''}: {shown})")
        return lines


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


class DatasetValidator:
    """Checks one dataset folder whose manifest passed its JSON Schema; `run` returns every problem found."""

    def __init__(self, out: Location, manifest: dict[str, Any], workers: int = 4):
        self.out = out
        self.manifest = manifest
        self.workers = workers
        self.full_layout = DatasetLayout.from_dict(manifest["layout"])
        self.sidecars = [SidecarLayout.from_dict(entry) for entry in manifest.get("extensions", [])]
        self.layout = base_layout(self.full_layout, self.sidecars)  # what the units' data files hold
        self.keep_images = manifest["config"]["output"].get("keep_images", False)
        self.normalized = {
            column: entry["card"].get("normalized", True)
            for entry, teacher in zip(manifest["teachers"], self.full_layout.teachers)
            for column in (teacher.image_column, teacher.text_column)
            if column
        }

    def run(self) -> ValidationReport:
        report = ValidationReport(self._manifest_problems())
        units = self.manifest["units"]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            results = list(pool.map(self._check_unit, units))
        for result in results:
            report.problems += result.problems
            report.rows += result.rows
            report.files += result.files
        report.units = len(units)
        report.problems += self._duplicate_key_problems(units, [r.key_hashes for r in results])
        return report

    # ------------------------------------------------------------------ dataset.json

    def _manifest_problems(self) -> list[str]:
        manifest, layout, problems = self.manifest, self.full_layout, []
        units = manifest["units"]
        recorded = manifest["totals"]
        if manifest["status"] != "complete":
            problems.append(
                f"dataset.json: status {manifest['status']}: {len(units)} of {recorded['units_planned']} units committed"
            )
        summed = totals(recorded["units_planned"], units)
        for name, value in summed.items():
            if recorded[name] != value:
                problems.append(f"dataset.json: totals.{name} is {recorded[name]}, the units sum to {value}")
        expected_columns = {f.name: str(f.type) for f in layout.arrow_schema()}
        if manifest.get("columns", expected_columns) != expected_columns:
            problems.append("dataset.json: columns differ from the Arrow schema of its layout")
        card_dims = [(t["id"], t["card"]["embedding_dim"]) for t in manifest["teachers"]]
        if card_dims != [(t.id, t.dim) for t in layout.teachers]:
            problems.append("dataset.json: layout teachers differ from the teacher cards (ids, order or dims)")
        plan = read_plan(self.out)
        if plan is None:
            problems.append("plan.json: missing")
            return problems
        config_hash, planned, _ = plan
        extensions = manifest.get("extensions", [])
        planned_hash = extensions[0]["extends"] if extensions else manifest["config_hash"]
        if config_hash != planned_hash:  # the plan is the base run's; extensions keep it
            problems.append(f"plan.json: config hash {config_hash}, dataset.json says {planned_hash}")
        if len(planned) != recorded["units_planned"]:
            problems.append(f"plan.json: {len(planned)} units, dataset.json says {recorded['units_planned']} planned")
        markers = read_unit_stats(self.out, planned)
        sidecar_markers = {s.extension: read_unit_stats(self.out, planned, sidecar_folder(s.extension)) for s in self.sidecars}
        planned_by_id = {u.id: u for u in planned}
        listed = {u["id"] for u in units}
        for unit in units:
            where = f"unit {unit['id']}"
            if unit["id"] not in planned_by_id:
                problems.append(f"{where}: not in plan.json")
                continue
            marker = planned_by_id[unit["id"]].stats_file
            own_files = {name: info for name, info in unit["files"].items() if name not in sidecar_markers}
            if unit["id"] not in markers:
                problems.append(f"{where}: no stats marker {marker} (unit not committed)")
            elif {**markers[unit["id"]], "input": redact_url(markers[unit["id"]]["input"])} != {**unit, "files": own_files}:
                problems.append(f"{where}: dataset.json entry differs from {marker}")
            for extension, committed in sidecar_markers.items():
                sidecar_marker = committed.get(unit["id"])
                if sidecar_marker is None:
                    problems.append(f"{where}: extension {extension} has no stats marker for it (not committed)")
                elif sidecar_marker["files"]["data"] != unit["files"].get(extension):
                    problems.append(f"{where}: dataset.json entry of extension {extension} differs from its marker")
        for unit_id in sorted(set(markers) - listed):
            problems.append(f"unit {unit_id}: committed but missing from dataset.json (rerun the job to rebuild it)")
        return problems

    # ------------------------------------------------------------------ one unit

    def _check_unit(self, unit: dict[str, Any]) -> _UnitResult:
        where = f"unit {unit['id']}"
        result = _UnitResult()
        if unit["input_samples"] != unit["samples"] + unit["failures"]:
            result.problems.append(
                f"{where}: input_samples {unit['input_samples']} != samples {unit['samples']} "
                f"+ failures {unit['failures']}"
            )
        if sum(unit["failures_by_reason"].values()) != unit["failures"]:
            result.problems.append(
                f"{where}: failures_by_reason sums to {sum(unit['failures_by_reason'].values())}, "
                f"failures is {unit['failures']}"
            )
        intact = {name: self._file_problem(info) for name, info in unit["files"].items()}
        for name, problem in intact.items():
            if problem:
                result.problems.append(f"{where}: {unit['files'][name]['path']}: {problem}")
        result.files = len(intact)
        if intact["failures"] != "missing":
            result.problems += self._failures_problems(unit)
        if intact["data"] != "missing":
            self._check_data(unit, result)
        for sidecar in self.sidecars:
            if sidecar.extension not in unit["files"]:
                result.problems.append(f"{where}: no file of extension {sidecar.extension}")
            elif intact[sidecar.extension] != "missing" and result.keys is not None:
                path = unit["files"][sidecar.extension]["path"]
                result.problems += self._sidecar_problems(f"{where}: {path}", path, sidecar, result.keys)
        return result

    def _file_problem(self, info: dict[str, Any]) -> str | None:
        """Why a recorded file is not as recorded (None when it is); checksum only when the size agrees."""
        path = self.out.join(info["path"])
        if not self.out.exists(info["path"]):  # asked of the store, not of a cached listing
            return "missing"
        size = self.out.fs.size(path)
        if size != info["bytes"]:
            return f"{size} bytes, the manifest says {info['bytes']}"
        digest = hashlib.sha256()
        with self.out.fs.open(path, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != info["sha256"]:
            return "sha256 differs from the manifest (the file changed or is corrupt)"
        return None

    def _failures_problems(self, unit: dict[str, Any]) -> list[str]:
        where = f"unit {unit['id']}: {unit['files']['failures']['path']}"
        try:
            text = self.out.read_bytes(unit["files"]["failures"]["path"]).decode()
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except (UnicodeDecodeError, ValueError) as error:
            return [f"{where}: not JSON lines ({error})"]
        problems = []
        if any(not isinstance(r, dict) or not {"key", "reason", "detail"} <= r.keys() for r in records):
            problems.append(f"{where}: a record lacks key, reason or detail")
            return problems
        unknown = sorted({r["reason"] for r in records} - FAILURE_REASONS.keys())
        if unknown:
            problems.append(f"{where}: unknown failure reasons {', '.join(unknown)}")
        if len(records) != unit["failures"]:
            problems.append(f"{where}: {len(records)} records, the manifest says {unit['failures']} failures")
        by_reason = dict(sorted(Counter(r["reason"] for r in records).items()))
        if by_reason != unit["failures_by_reason"]:
            problems.append(f"{where}: failures by reason {by_reason}, the manifest says {unit['failures_by_reason']}")
        return problems

    def _check_data(self, unit: dict[str, Any], result: _UnitResult) -> None:
        path = unit["files"]["data"]["path"]
        where = f"unit {unit['id']}: {path}"
        row_problems = _RowProblems()
        keys: list[str] = []
        try:
            with self.out.fs.open(self.out.join(path), "rb") as handle:
                for rows in self._row_batches(handle, row_problems):
                    keys += rows.keys + rows.unchecked_keys
                    self._check_rows(rows, row_problems)
        except _UnusableFile as unusable:
            result.problems += [f"{where}: {line}" for line in unusable.lines]
        else:
            result.keys = keys
            if len(keys) != unit["samples"]:
                result.problems.append(f"{where}: {len(keys)} rows, the manifest says {unit['samples']} samples")
        result.rows = len(keys)
        result.key_hashes = np.array([key_hash(k) for k in keys], dtype=np.uint64)
        result.problems += row_problems.lines(where)

    def _row_batches(self, handle: BinaryIO, row_problems: _RowProblems) -> Iterator[_Rows]:
        if self.manifest["format"] == "arrow":
            return _parquet_rows(handle, self.layout)
        return _tar_rows(handle, self.layout, self.keep_images, row_problems)

    def _check_rows(self, rows: _Rows, problems: _RowProblems) -> None:
        layout = self.layout
        for key in rows.keys:
            if not KEY_PATTERN.match(key):
                problems.add("key does not match the schema's key pattern", key)
        for key, views in zip(rows.keys, rows.views_per_row):
            if views != layout.num_views:
                problems.add(f"aug holds {views} views, the layout says {layout.num_views}", key)
        view_row = np.repeat(np.arange(len(rows.keys)), rows.views_per_row)
        top, left, height, width = rows.crops.T
        outside = (top < 0) | (left < 0) | (height < 1) | (width < 1)
        outside |= (top + height > rows.heights[view_row]) | (left + width > rows.widths[view_row])
        for index in np.unique(view_row[outside]):
            problems.add("a crop box lies outside the image", rows.keys[index])
        for captioner in layout.captioners:
            for key, captions in zip(rows.keys, rows.captions[captioner.column]):
                if captions is None or len(captions) != captioner.num_captions:
                    problems.add(f"{captioner.column} does not hold {captioner.num_captions} captions", key)
        tolerance = NORM_TOLERANCE[layout.embedding_dtype]
        scales = layout.scale_columns()
        for column in layout.embedding_shapes():
            scale = rows.arrays[scales[column]] if column in scales else None
            values = from_storage(rows.arrays[column], layout.embedding_dtype, scale)
            finite = np.isfinite(values).all(axis=(1, 2))
            for index in np.flatnonzero(~finite):
                problems.add(f"{column} has NaN or inf", rows.keys[index])
            if self.normalized[column]:
                with np.errstate(invalid="ignore", over="ignore"):
                    off = np.abs(np.linalg.norm(values, axis=2) - 1).max(axis=1) > tolerance
                for index in np.flatnonzero(off & finite):
                    problems.add(f"{column} has an L2 norm off 1 by more than {tolerance} (its card says normalized)",
                                 rows.keys[index])
        for key, image, digest in zip(rows.keys, rows.images, rows.image_sha256):
            if image is None and self.keep_images:
                problems.add("no image, though the job keeps images", key)
            elif image is not None and hashlib.sha256(image).hexdigest() != digest:
                problems.add("the image bytes do not match image_sha256", key)

    def _sidecar_problems(self, where: str, path: str, sidecar: SidecarLayout, keys: list[str]) -> list[str]:
        """A sidecar file against its extension's layout and the keys of the unit's data file."""
        if self.manifest["format"] == "arrow":
            try:
                with self.out.fs.open(self.out.join(path), "rb") as handle:
                    schema = pq.ParquetFile(handle).schema_arrow
            except (pa.ArrowException, OSError) as error:
                return [f"{where}: not a Parquet file ({error_line(error)})"]
            if not schema.equals(sidecar.arrow_schema()):
                return [f"{where}: its Arrow schema differs from extension {sidecar.extension}'s layout"]
        names = set(self.full_layout.stored_arrays())
        row_problems, sidecar_keys = _RowProblems(), []
        tolerance = NORM_TOLERANCE[sidecar.embedding_dtype]
        try:
            for row in file_rows(self.out, path, self.manifest["format"], sidecar.webdataset_members(), names):
                key = row["key"]
                sidecar_keys.append(key)
                for column in sidecar.columns:
                    value = row[column.name]
                    if column.role == "captions":
                        if value is None or len(value) != column.rows:
                            row_problems.add(f"{column.name} does not hold {column.rows} captions", key)
                        continue
                    if np.shape(value) != (column.rows, column.dim):
                        row_problems.add(f"{column.name} is {list(np.shape(value))}, "
                                         f"the extension says {[column.rows, column.dim]}", key)
                        continue
                    scale = row.get(scale_column(column.name)) if is_quantized(sidecar.embedding_dtype) else None
                    values = from_storage(value, sidecar.embedding_dtype, scale)
                    if not np.isfinite(values).all():
                        row_problems.add(f"{column.name} has NaN or inf", key)
                    elif self.normalized[column.name] and np.abs(np.linalg.norm(values, axis=1) - 1).max() > tolerance:
                        row_problems.add(f"{column.name} has an L2 norm off 1 by more than {tolerance} "
                                         "(its card says normalized)", key)
        except (pa.ArrowException, OSError, tarfile.TarError, KeyError, ValueError) as error:
            return [f"{where}: cannot be read as extension {sidecar.extension}'s layout says ({error_line(error)})"]
        problems = row_problems.lines(where)
        if sidecar_keys != keys:
            first = next((i for i, (a, b) in enumerate(zip(sidecar_keys, keys)) if a != b), min(len(keys), len(sidecar_keys)))
            problems.append(f"{where}: its keys differ from the unit's data file from row {first} on "
                            f"({len(sidecar_keys)} rows, the data file has {len(keys)})")
        return problems

    # ------------------------------------------------------------------ across units

    def _duplicate_key_problems(self, units: list[dict[str, Any]], hashes: list[np.ndarray]) -> list[str]:
        if not hashes or not sum(len(h) for h in hashes):
            return []
        everything = np.concatenate(hashes)
        owner = np.repeat(np.arange(len(units)), [len(h) for h in hashes])
        order = np.argsort(everything, kind="stable")
        ordered = everything[order]
        repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
        if not len(repeated):
            return []
        involved = sorted(set(owner[np.isin(everything, repeated)].tolist()))
        places: dict[str, list[str]] = defaultdict(list)
        wanted = set(repeated.tolist())
        for index in involved:
            with self.out.fs.open(self.out.join(units[index]["files"]["data"]["path"]), "rb") as handle:
                for rows in self._row_batches(handle, _RowProblems()):
                    for key in rows.keys + rows.unchecked_keys:
                        if key_hash(key) in wanted:
                            places[key].append(units[index]["id"])
        problems = []
        for key, unit_ids in sorted(places.items()):
            if len(unit_ids) > 1:
                names = sorted(set(unit_ids))
                where = f"units {', '.join(names)}" if len(names) > 1 else f"unit {names[0]}"
                problems.append(f"key {key}: {len(unit_ids)} samples share it ({where})")
        return problems


def validate_dataset(url: str, storage_options: dict[str, Any] | None = None, workers: int = 4) -> ValidationReport:
    """Every problem of the dataset at `url`; a manifest that cannot be read is the one problem."""
    try:
        out, manifest = read_manifest(url, storage_options)
    except DatasetError as error:
        return ValidationReport([str(error)])
    return DatasetValidator(out, manifest, workers).run()


# ---------------------------------------------------------------------- reading data files


def _parquet_rows(handle: BinaryIO, layout: DatasetLayout) -> Iterator[_Rows]:
    try:
        parquet = pq.ParquetFile(handle)
    except (pa.ArrowException, OSError) as error:
        raise _UnusableFile([f"not a Parquet file ({error_line(error)})"]) from None
    expected = layout.arrow_schema()
    actual = parquet.schema_arrow
    differences = [
        f"column {f.name}: {actual.field(f.name).type if f.name in actual.names else 'missing'}, schema says {f.type}"
        for f in expected
        if f.name not in actual.names or not actual.field(f.name).type.equals(f.type)
    ]
    differences += [f"column {name}: not in the schema" for name in actual.names if name not in expected.names]
    if differences:
        raise _UnusableFile(differences)
    try:
        for batch in parquet.iter_batches(batch_size=_BATCH_ROWS):
            aug = batch.column("aug")
            yield _Rows(
                keys=batch.column("key").to_pylist(),
                heights=batch.column("image_height").to_numpy(zero_copy_only=False),
                widths=batch.column("image_width").to_numpy(zero_copy_only=False),
                views_per_row=pc.list_value_length(aug).to_numpy(zero_copy_only=False),
                crops=aug.flatten().field("crop").flatten().to_numpy(zero_copy_only=False).reshape(-1, 4),
                captions={c.column: batch.column(c.column).to_pylist() for c in layout.captioners},
                arrays={name: fixed_size_matrix(batch.column(name)) for name in layout.stored_arrays()},
                images=batch.column("image").to_pylist(),
                image_sha256=batch.column("image_sha256").to_pylist(),
            )
    except (pa.ArrowException, OSError) as error:
        raise _UnusableFile([f"cannot be read to its end ({error_line(error)})"]) from None


def _tar_rows(
    handle: BinaryIO,
    layout: DatasetLayout,
    keep_images: bool,
    problems: _RowProblems,
) -> Iterator[_Rows]:
    """Samples of a webdataset unit, member by member; a sample whose members are wrong is
    reported and left out of the value checks."""
    members = layout.webdataset_members(keep_images)
    batch: list[dict[str, Any]] = []
    try:
        with tarfile.open(fileobj=handle, mode="r|") as tar:
            key, raw = None, {}
            for info in tar:
                name_key, _, suffix = info.name.partition(".")
                if name_key != key and raw:
                    batch.append(_tar_sample(key, raw, members, layout, problems))
                    raw = {}
                key = name_key
                raw[suffix] = tar.extractfile(info).read() if info.isreg() else b""
                if len(batch) >= _BATCH_ROWS:
                    yield _rows_from_samples(batch, layout)
                    batch = []
            if raw:
                batch.append(_tar_sample(key, raw, members, layout, problems))
    except tarfile.TarError as error:
        raise _UnusableFile([f"not a readable tar ({error_line(error)})"]) from None
    if batch:
        yield _rows_from_samples(batch, layout)


def _tar_sample(
    key: str, raw: dict[str, bytes], members: list[dict[str, Any]], layout: DatasetLayout, problems: _RowProblems
) -> dict[str, Any]:
    """One sample's values; {"key", "bad": True} when a member is missing, extra or malformed."""
    row: dict[str, Any] = {"key": key, "bad": False, "image": None}
    arrays = layout.stored_arrays()
    expected = set()
    for member in members:
        suffix = member["suffix"]
        if member["encoding"] == "bytes":
            if "image_format" not in row:  # the json member is bad (reported): the image member cannot be named
                expected.update(set(raw) - {m["suffix"] for m in members})
                continue
            suffix = row["image_format"]
        expected.add(suffix)
        if suffix not in raw:
            problems.add(f"member .{member['suffix']} missing", key)
            row["bad"] = True
            continue
        data = raw[suffix]
        try:
            if member["encoding"] == "npy":
                array = np.load(io.BytesIO(data), allow_pickle=False)
                name = member["fields"][0]
                want = arrays[name]
                if (array.dtype, array.shape) != want:
                    problems.add(f"member .{suffix} is {array.dtype} {list(array.shape)}, "
                                 f"the schema says {want[0]} {list(want[1])}", key)
                    row["bad"] = True
                row[name] = array
            elif member["encoding"] == "json":
                value = json.loads(data)
                if len(member["fields"]) == 1:
                    value = {member["fields"][0]: value}
                elif not isinstance(value, dict) or set(value) != set(member["fields"]):
                    problems.add(f"member .{suffix} does not hold exactly {', '.join(member['fields'])}", key)
                    row["bad"] = True
                    continue
                row.update(value)
            else:
                row["image"] = data
        except ValueError as error:
            problems.add(f"member .{suffix} cannot be decoded ({type(error).__name__})", key)
            row["bad"] = True
    for suffix in sorted(set(raw) - expected):
        problems.add(f"unexpected member .{suffix}", key)
    if not row["bad"] and row.get("key") != key:
        problems.add("json key differs from the member names' key", key)
    return row


def _rows_from_samples(samples: list[dict[str, Any]], layout: DatasetLayout) -> _Rows:
    good = [s for s in samples if not s["bad"]]
    crops = [view["crop"] for s in good for view in s["aug"]]
    return _Rows(
        keys=[s["key"] for s in good],
        heights=np.array([s["image_height"] for s in good], dtype=np.int64),
        widths=np.array([s["image_width"] for s in good], dtype=np.int64),
        views_per_row=np.array([len(s["aug"]) for s in good], dtype=np.int64),
        crops=np.array(crops, dtype=np.int64).reshape(-1, 4),
        captions={c.column: [s[c.column] for s in good] for c in layout.captioners},
        arrays={
            name: np.stack([s[name] for s in good]) if good else np.empty((0, *shape), dtype)
            for name, (dtype, shape) in layout.stored_arrays().items()
        },
        images=[s["image"] for s in good],
        image_sha256=[s["image_sha256"] for s in good],
        unchecked_keys=[s["key"] for s in samples if s["bad"]],
    )
