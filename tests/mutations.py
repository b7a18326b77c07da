"""Mutation check: break one guarded behaviour at a time and show that a named test fails.

Each mutation is a named edit of one source file (exact old text -> new text). It is applied
to a temporary copy of the repository (never the working tree), then the mutation's tests run
there (PYTHONPATH = the copy) and must fail. An edit whose old text is not found exactly once
stops the script: keep this list in step with the code it mutates. A mutation that survives
is a missing test.

    python tests/mutations.py                  # every mutation (long: one pytest run each)
    python tests/mutations.py --only NAME ...  # some of them (--skip NAME ... to leave some out)
    python tests/mutations.py --list           # names, files and tests
    python tests/mutations.py --datasets DIR   # keep the reused datasets in DIR across invocations

Mutations marked `datasets_reused` change only code that reads datasets (validate, verify,
replay): their runs share the `reinforced` datasets through DR_GEN_TEST_DATASETS, built once
by the first of them, instead of regenerating them each time. The table printed at the end
(mutation, test that caught it) is the one in RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
COPY_IGNORED = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "out", "sample_data", "*.egg-info")


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    datasets_reused: bool = False


def _validate(name: str, file: str, old: str, new: str, test: str) -> Mutation:
    """A mutation of dr-gen validate (a module of dr_pipeline/tools/validate/, or the format module
    its check belongs to), caught by one test of tests/tools/test_validate.py."""
    path = (file if "/" in file else f"dr_pipeline/dataset/formats/{file}" if file in ("parquet.py", "webdataset.py")
            else f"dr_pipeline/tools/validate/{file}")
    return Mutation(f"validate: {name}", path, old, new, (f"tests/tools/test_validate.py::{test}",), True)


ARROW = "test_each_check_reports_its_damage_in_arrow"
WEBDATASET = "test_each_check_reports_its_damage_in_webdataset"
SIDECAR = "test_each_sidecar_check_reports_its_damage"

MUTATIONS: tuple[Mutation, ...] = (
    Mutation("unit task retries disabled", "dr_pipeline/execution/unit_tasks.py",
             "ray.remote(num_cpus=1, max_retries=2, retry_exceptions=[OSError])",
             "ray.remote(num_cpus=1, max_retries=0, retry_exceptions=[OSError])",
             ("tests/reliability/test_faults.py::test_a_unit_task_that_fails_transiently_twice_is_retried_and_committed",)),
    Mutation("committed units redone on resume", "dr_pipeline/dataset/sink.py",
             "return [u for u in units if u.id not in committed]", "return list(units)",
             ("tests/execution/test_pipeline.py::test_rerun_skips_committed_units_and_refuses_another_config",)),
    Mutation("stale temp files not removed", "dr_pipeline/core/storage.py",
             "            retrying(lambda: self.fs.rm(leftover))\n", "            pass\n",
             ("tests/execution/test_pipeline.py::test_killed_run_resumes_to_the_same_dataset",)),
    Mutation("failures file written empty", "dr_pipeline/dataset/sink.py",
             "self.out.write_bytes_atomic(failures_bytes(failures), self.failures_file(unit.id))",
             'self.out.write_bytes_atomic(b"", self.failures_file(unit.id))',
             ("tests/execution/test_pipeline.py::test_every_input_sample_is_accounted_for",)),
    Mutation("caption seeds not per key", "dr_pipeline/generate/model_worker.py",
             'derive_seed(run_seed, key, f"caption/{captioner_id}", j)',
             'derive_seed(run_seed, "", f"caption/{captioner_id}", j)',
             ("tests/core/test_seeding.py",)),
    Mutation("re-read original not sha256-checked", "dr_pipeline/read/replay.py",
             'if hashlib.sha256(data).hexdigest() != row["image_sha256"]:', "if False:",
             ("tests/read/test_torch_dataset.py::test_changed_input_image_is_a_clear_error",)),
    Mutation("replay resamples parameters instead of using the stored ones", "dr_pipeline/read/replay.py",
             'return pixels, render_views(pixels, row["aug"], self.view_size, self.augmentation)',
             "from dr_pipeline.views.augment import sample_views  # the tests' run seed is 7\n"
             '        fresh = sample_views(7, row["key"], int(pixels.shape[1]), int(pixels.shape[2]), self.augmentation)\n'
             "        return pixels, render_views(pixels, fresh, self.view_size, self.augmentation)",
             ("tests/tools/test_verify.py::test_verify_names_the_views_whose_stored_parameters_changed",), True),
    Mutation("verify: cosine comparison always passes", "dr_pipeline/tools/verify.py",
             "return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))",
             "return np.ones(len(a))",
             ("tests/tools/test_verify.py::test_verify_fails_on_swapped_embeddings",), True),
    Mutation("verify: pixel comparison always passes", "dr_pipeline/tools/verify.py",
             "if not torch.equal(stored_views[index], fresh_views[index])]", "if False]",
             ("tests/tools/test_verify.py::test_verify_names_the_views_whose_stored_parameters_changed",), True),
    _validate("dataset.json not JSON", "dr_pipeline/dataset/manifest.py",
              'raise DatasetError(f"{redact_url(url)}: {MANIFEST_FILE} is not valid JSON ({error})") from None',
              "raise", f"{ARROW}[manifest_not_json]"),
    _validate("dataset.json JSON Schema", "dr_pipeline/core/schema.py",
              'jsonschema.validate(manifest, schemas.load_spec(name="manifest.schema.json"))', "pass", f"{ARROW}[manifest_schema]"),
    _validate("schema version", "dr_pipeline/core/schema.py", 'check_schema_version(manifest.get("schema_version", "?"))', "pass",
              f"{ARROW}[schema_version]"),
    _validate("status", "manifest.py", 'if manifest["status"] != "complete":', "if False:", f"{ARROW}[status_incomplete]"),
    _validate("totals", "manifest.py", "if recorded[name] != value:", "if False:", "test_a_wrong_count_in_the_manifest"),
    _validate("columns", "manifest.py", 'if manifest.get("columns", expected_columns) != expected_columns:', "if False:",
              f"{ARROW}[columns_differ]"),
    _validate("teacher cards", "manifest.py", "if card_dims != [(t.id, t.dim) for t in layout.teachers]:", "if False:",
              f"{ARROW}[card_dim_differs]"),
    _validate("plan missing", "manifest.py", 'problems.append("plan.json: missing")', "pass", f"{ARROW}[plan_missing]"),
    _validate("plan config hash", "manifest.py", "if config_hash != planned_hash:", "if False:", f"{ARROW}[plan_hash]"),
    _validate("plan unit count", "manifest.py", 'if len(planned) != recorded["units_planned"]:', "if False:",
              f"{ARROW}[plan_extra_unit]"),
    _validate("unit not in plan", "manifest.py", 'problems.append(f"{where}: not in plan.json")', "pass", f"{ARROW}[unit_not_in_plan]"),
    _validate("stats marker missing", "manifest.py", 'problems.append(f"{where}: no stats marker {marker} (unit not committed)")',
              "pass", f"{ARROW}[marker_missing]"),
    _validate("manifest entry differs from marker", "manifest.py",
              'problems.append(f"{where}: dataset.json entry differs from {marker}")', "pass",
              "test_a_wrong_count_in_the_manifest"),
    _validate("committed unit missing from manifest", "manifest.py",
              'problems.append(f"unit {unit_id}: committed but missing from dataset.json (rerun the job to rebuild it)")',
              "pass", f"{ARROW}[unit_missing_from_manifest]"),
    _validate("input = samples + failures", "failures.py", 'if unit["input_samples"] != unit["samples"] + unit["failures"]:',
              "if False:", "test_a_wrong_count_in_the_manifest"),
    _validate("failures_by_reason sum", "failures.py", 'if sum(unit["failures_by_reason"].values()) != unit["failures"]:',
              "if False:", f"{ARROW}[failures_by_reason_sum]"),
    _validate("file missing", "files.py", 'return "missing"', "return None", "test_a_missing_data_file"),
    _validate("file size", "files.py", 'if size != info["bytes"]:', "if False:", f"{ARROW}[size_differs]"),
    _validate("file sha256", "files.py", 'if digest.hexdigest() != info["sha256"]:', "if False:",
              "test_a_flipped_byte_is_a_checksum_problem"),
    _validate("failures not JSON lines", "failures.py", 'return [f"{where}: not JSON lines ({error})"]', "return []",
              f"{ARROW}[failures_not_json]"),
    _validate("failure record fields", "failures.py", 'problems.append(f"{where}: a record lacks key, reason or detail")', "pass",
              f"{ARROW}[failure_lacks_detail]"),
    _validate("unknown failure reason", "failures.py", "if unknown:", "if False:", f"{ARROW}[failure_unknown_reason]"),
    _validate("failure record count", "failures.py", 'if len(records) != unit["failures"]:', "if False:",
              "test_failures_must_match_the_failures_file"),
    _validate("failures by reason", "failures.py", 'if by_reason != unit["failures_by_reason"]:', "if False:",
              "test_failures_must_match_the_failures_file"),
    _validate("row count", "rows.py", 'if len(keys) != unit["samples"]:', "if False:", "test_a_dropped_row_is_a_count_problem"),
    _validate("key pattern", "rows.py", "if not KEY_PATTERN.match(key):", "if False:", f"{ARROW}[bad_key]"),
    _validate("views per row", "rows.py", "if views != layout.num_views:", "if False:", f"{ARROW}[view_missing]"),
    _validate("crop before the image", "rows.py", "outside = (top < 0) | (left < 0) | (height < 1) | (width < 1)",
              "outside = np.zeros(len(top), dtype=bool)", f"{ARROW}[crop_negative]"),
    _validate("crop beyond the image", "rows.py",
              "outside |= (top + height > rows.heights[view_row]) | (left + width > rows.widths[view_row])",
              "pass", f"{ARROW}[crop_outside]"),
    _validate("captions per row", "rows.py", "if captions is None or len(captions) != captioner.num_captions:", "if False:",
              f"{ARROW}[caption_missing]"),
    _validate("NaN embedding", "rows.py", "for index in np.flatnonzero(~finite):", "for index in []:",
              "test_nan_and_a_norm_off_one_are_reported_with_their_keys"),
    _validate("embedding norm", "rows.py", "for index in np.flatnonzero(off & finite):", "for index in []:",
              "test_nan_and_a_norm_off_one_are_reported_with_their_keys"),
    _validate("kept image missing", "rows.py", "if image is None and dataset.keep_images:", "if False:", f"{ARROW}[images_missing]"),
    _validate("kept image sha256", "rows.py", "elif image is not None and hashlib.sha256(image).hexdigest() != digest:",
              "elif False:", f"{WEBDATASET}[image_bytes_changed]"),
    _validate("not a Parquet file", "parquet.py", 'raise UnusableFile([f"not a Parquet file ({error_line(error)})"]) from None',
              "raise UnusableFile([]) from None", f"{ARROW}[not_parquet]"),
    _validate("Parquet columns", "parquet.py", "        if differences:\n            raise UnusableFile(differences)",
              "        if False:\n            raise UnusableFile(differences)", f"{ARROW}[extra_column]"),
    _validate("not a tar", "webdataset.py", 'raise UnusableFile([f"not a readable tar ({error_line(error)})"]) from None',
              "raise UnusableFile([]) from None", f"{WEBDATASET}[not_a_tar]"),
    _validate("tar member missing", "webdataset.py", """report(f"member .{member['suffix']} missing", key)""", "pass",
              "test_webdataset_members_are_checked_for_dtype_shape_and_presence"),
    _validate("npy dtype and shape", "webdataset.py", "if (value.dtype, value.shape) != want:", "if False:",
              "test_webdataset_members_are_checked_for_dtype_shape_and_presence"),
    _validate("json member fields", "webdataset.py", """report(f"member .{suffix} does not hold exactly {', '.join(member['fields'])}", key)""",
              "pass", f"{WEBDATASET}[json_field_missing]"),
    _validate("member not decodable", "webdataset.py", 'report(f"member .{suffix} cannot be decoded ({type(error).__name__})", key)',
              "pass", f"{WEBDATASET}[member_undecodable]"),
    _validate("unexpected member", "webdataset.py", "for suffix in sorted(set(raw) - expected):", "for suffix in []:",
              f"{WEBDATASET}[unexpected_member]"),
    _validate("json key", "webdataset.py", 'if not row["bad"] and row.get("key") != key:', "if False:", f"{WEBDATASET}[json_key_differs]"),
    _validate("Parquet row group unreadable", "dr_pipeline/dataset/formats/arrow_batches.py",
              'raise UnusableFile([f"cannot be read to its end ({error_line(error)})"]) from None', "return",
              f"{ARROW}[unreadable_row_group]"),
    _validate("sidecar stats marker missing", "manifest.py",
              'problems.append(f"{where}: extension {extension} has no stats marker for it (not committed)")',
              "pass", f"{SIDECAR}[arrow-sidecar_marker_missing]"),
    _validate("sidecar manifest entry differs from marker", "manifest.py",
              'elif sidecar_marker["files"]["data"] != unit["files"].get(extension):', "elif False:",
              f"{SIDECAR}[arrow-sidecar_entry_differs]"),
    _validate("sidecar file not listed", "__init__.py",
              'result.problems.append(f"{where}: no file of extension {sidecar.extension}")',
              "pass", f"{SIDECAR}[arrow-sidecar_not_listed]"),
    _validate("sidecar not a Parquet file", "parquet.py", "return self._open(handle).schema_arrow", "return None",
              f"{SIDECAR}_in_arrow[sidecar_not_parquet]"),
    _validate("sidecar Arrow schema", "sidecars.py",
              "if schema is not None and not schema.equals(sidecar.arrow_schema()):", "if False:",
              f"{SIDECAR}_in_arrow[sidecar_schema_differs]"),
    _validate("sidecar captions per row", "sidecars.py",
              "if value is None or len(value) != column.rows:", "if False:",
              f"{SIDECAR}[arrow-sidecar_captions]"),
    _validate("sidecar embedding shape", "sidecars.py",
              "if np.shape(value) != (column.rows, column.dim):", "if False:",
              f"{SIDECAR}_in_webdataset[sidecar_shape]"),
    _validate("sidecar NaN embedding", "sidecars.py",
              "if not np.isfinite(values).all():", "if False:", f"{SIDECAR}[arrow-sidecar_nan]"),
    _validate("sidecar embedding norm", "sidecars.py",
              "elif dataset.normalized[column.name] and np.abs(np.linalg.norm(values, axis=1) - 1).max() > tolerance:",
              "elif False:", f"{SIDECAR}[arrow-sidecar_norm]"),
    _validate("sidecar unreadable", "sidecars.py",
              """return [f"{where}: cannot be read as extension {sidecar.extension}'s layout says ({error_line(error)})"]""",
              "return []", f"{SIDECAR}_in_arrow[sidecar_unreadable_row_group]"),
    _validate("sidecar keys align with the data file", "sidecars.py",
              "if sidecar_keys != keys:", "if False:",
              f"{SIDECAR}[arrow-sidecar_keys_differ]"),
    _validate("keys unique across units", "keys.py", "repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])",
              "repeated = ordered[:0]", "test_a_key_repeated_in_another_unit"),
    Mutation("ipc: local files read whole instead of memory-mapped", "dr_pipeline/dataset/formats/ipc.py",
             "if isinstance(handle, LocalFileOpener):", "if False:",
             ("tests/read/test_ipc_dataset.py::test_batched_embeddings_are_views_of_the_mapped_file",)),
    Mutation("ipc: record batches as the pipeline's batches arrive", "dr_pipeline/dataset/formats/ipc.py",
             "whole = pending.num_rows - pending.num_rows % ROW_GROUP_ROWS", "whole = pending.num_rows",
             ("tests/dataset/test_ipc_format.py::test_bytes_and_record_batches_do_not_depend_on_how_columns_arrive",), True),
    Mutation("ipc: record batches used without validating them in full", "dr_pipeline/dataset/formats/ipc.py",
             "        batch.validate(full=True)", "        pass",
             ("tests/dataset/test_ipc_format.py::test_damaged_files_are_refused_by_validate_and_the_reader",), True),
)


def apply(root: Path, mutation: Mutation) -> str:
    """Edit the copy at `root`; returns the file's original text. Fails loudly on a stale edit."""
    path = root / mutation.file
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:
        raise SystemExit(f"mutation {mutation.name!r}: its old text is found {count} times in {mutation.file} "
                         "(not exactly once): update tests/mutations.py to the code")
    path.write_text(text.replace(mutation.old, mutation.new))
    return text


def failed_tests(output: str) -> list[str]:
    return re.findall(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)


def stale(mutations: list[Mutation]) -> list[str]:
    """The mutations whose old text is not found exactly once in their file (the code moved on)."""
    return [f"mutation {m.name!r}: its old text is not found exactly once in {m.file}"
            for m in mutations
            if not (REPOSITORY / m.file).exists() or (REPOSITORY / m.file).read_text().count(m.old) != 1]


def missing_tests(mutations: list[Mutation]) -> list[str]:
    """The named tests whose file is gone (a test moved or renamed without its mutation)."""
    return [f"mutation {m.name!r}: test file of {test} not found"
            for m in mutations for test in m.tests if not (REPOSITORY / test.split("::")[0]).exists()]


def run(mutations: list[Mutation], python: str, datasets: Path | None = None) -> bool:
    if problems := stale(mutations):  # every edit is checked against the code before anything runs
        raise SystemExit("\n".join(problems) + "\nupdate tests/mutations.py to the code")
    rows, survived = [], []
    with tempfile.TemporaryDirectory(prefix="dr-gen-mutations-") as temp:
        root = Path(temp) / "repo"
        shutil.copytree(REPOSITORY, root, ignore=COPY_IGNORED)
        datasets = datasets or Path(temp) / "datasets"
        datasets.mkdir(parents=True, exist_ok=True)
        for mutation in mutations:
            original = apply(root, mutation)
            env = {**os.environ, "PYTHONPATH": str(root), "RAY_ADDRESS": ""}
            env.pop("DR_GEN_TEST_DATASETS", None)
            if mutation.datasets_reused:
                env["DR_GEN_TEST_DATASETS"] = str(datasets)
            started = time.monotonic()
            result = subprocess.run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutation.tests],
                                    cwd=root, env=env, capture_output=True, text=True)
            (root / mutation.file).write_text(original)
            caught = failed_tests(result.stdout)
            seconds = time.monotonic() - started
            if result.returncode == 1 and caught:
                rows.append((mutation.name, caught[0]))
                print(f"caught    {mutation.name}: {caught[0]} ({seconds:.0f} s)", flush=True)
            else:
                survived.append(mutation.name)
                tail = "\n".join(result.stdout.splitlines()[-5:])
                print(f"SURVIVED  {mutation.name} (pytest exit {result.returncode}, {seconds:.0f} s)\n{tail}", flush=True)
    print("\n| mutation | file | caught by |\n|---|---|---|")
    by_name = {m.name: m for m in mutations}
    for name, test in rows:
        print(f"| {name} | `{by_name[name].file}` | `{test}` |")
    if survived:
        print(f"\n{len(survived)} mutation(s) survived, each a missing test: {', '.join(survived)}")
    return not survived


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations (names or parts of them)")
    parser.add_argument("--skip", nargs="+", metavar="NAME", default=[], help="leave out these mutations (names or parts)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--datasets", type=Path, metavar="DIR",
                        help="build the reused datasets in DIR once and keep them for later invocations "
                             "(default: a temporary folder per invocation)")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if (not args.only or any(part in m.name for part in args.only))
              and not any(part in m.name for part in args.skip)]
    if args.list:
        for mutation in chosen:
            print(f"{mutation.name}\t{mutation.file}\t{' '.join(mutation.tests)}")
        return
    if not chosen:
        raise SystemExit(f"no mutation matches {args.only}")
    sys.exit(0 if run(chosen, sys.executable, args.datasets) else 1)


if __name__ == "__main__":
    main()
