"""The reinforcement run end to end on local Ray with the real libraries and tiny random-weight models."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from tests.processes import kill_tree
from dr_pipeline.views.augment import render_view
from dr_pipeline.core.config import TeacherConfig, parse_job
from dr_pipeline.views.decode import decode_image
from dr_pipeline.core.errors import ConfigError
from dr_pipeline.read.reader import open_dataset
from dr_pipeline.execution.runner import run_job
from dr_pipeline.core.schema import SCHEMA_VERSION
from dr_pipeline.tools.validate import validate_dataset
from teachers import build_teacher

EXPECTED_FAILURES = {"undecodable_image", "empty_text"}


pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def arrow_run(sample_shards, small_job_dict, tmp_path_factory):
    out = tmp_path_factory.mktemp("arrow") / "out"
    job = parse_job(small_job_dict(sample_shards, out, output={"keep_images": True}))
    summary = run_job(job)
    return job, summary, open_dataset(str(out))


def _rows_by_key(dataset):
    return {row["key"]: row for row in dataset.iter_samples()}


def _failures(dataset):
    return [record for unit in dataset.units for record in dataset.failures(unit)]


def test_every_input_sample_is_accounted_for(arrow_run, sample_shards):
    job, summary, dataset = arrow_run
    totals = dataset.manifest["totals"]
    assert summary.units_done == totals["units_done"] == totals["units_planned"] == len(sample_shards)
    assert totals["input_samples"] == totals["samples"] + totals["failures"]
    for unit in dataset.units:
        assert unit["input_samples"] == unit["samples"] + unit["failures"]
    rows = list(dataset.iter_samples())
    assert len(rows) == totals["samples"] == len({r["key"] for r in rows})
    failures = _failures(dataset)
    assert len(failures) == totals["failures"] == 2
    assert {f["reason"] for f in failures} == EXPECTED_FAILURES
    assert totals["failures_by_reason"] == {"empty_text": 1, "undecodable_image": 1}
    assert all(f["key"] and f["detail"] and "\n" not in f["detail"] for f in failures)
    assert not {f["key"] for f in failures} & {r["source_key"] for r in rows}


def test_manifest_records_schema_cards_and_checksums(arrow_run):
    job, _, dataset = arrow_run
    manifest = dataset.manifest
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["status"] == "complete"
    assert [t["id"] for t in manifest["teachers"]] == ["tiny_vit_32", "tiny_vit_16_160"]
    dims = [t["card"]["embedding_dim"] for t in manifest["teachers"]]
    sizes = [t["card"]["input_size"] for t in manifest["teachers"]]
    assert dims == [64, 96] and sizes == [224, 160]
    assert manifest["captioners"][0]["num_captions"] == 2
    assert manifest["config_hash"] == job.output_hash()
    for unit in dataset.units:
        for info in unit["files"].values():
            data = dataset.location.read_bytes(info["path"])
            assert len(data) == info["bytes"] and hashlib.sha256(data).hexdigest() == info["sha256"]


def test_shapes_and_dtypes_follow_the_schema(arrow_run):
    job, _, dataset = arrow_run
    for unit in dataset.units:
        with dataset.location.fs.open(dataset.location.join(unit["files"]["data"]["path"]), "rb") as handle:
            assert pq.read_schema(handle).remove_metadata() == dataset.layout.arrow_schema().remove_metadata()
    for row in dataset.iter_samples():
        assert row["image_emb_tiny_vit_32"].shape == (3, 64)
        assert row["image_emb_tiny_vit_16_160"].shape == (3, 96)
        assert row["text_emb_tiny_vit_32"].shape == (3, 64)  # real caption + 2 synthetic
        assert len(row["aug"]) == 3 and len(row["captions_tiny_coca"]) == 2
        for name in dataset.layout.embedding_shapes():
            np.testing.assert_allclose(np.linalg.norm(row[name], axis=-1), 1.0, atol=2e-3)
        assert row["image"] is not None and row["image_height"] > 0


def _reference_embedding(teacher, view: torch.Tensor) -> torch.Tensor:
    """open_clip called directly on a replayed view: our resize + normalise done by hand."""
    card = teacher.card
    pixels = view.float().unsqueeze(0) / 255.0
    if pixels.shape[-1] != card.input_size:
        pixels = F.interpolate(pixels, size=(card.input_size,) * 2, mode="bicubic", antialias=True,
                               align_corners=False).clamp(0, 1)
    mean = torch.tensor(card.mean).view(1, 3, 1, 1)
    std = torch.tensor(card.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return teacher.model.encode_image((pixels - mean) / std, normalize=True)[0]


def test_stored_view_embeddings_equal_open_clip_on_the_replayed_view(arrow_run):
    job, _, dataset = arrow_run
    rows = list(dataset.iter_samples())[:4]
    for config in job.teachers:
        teacher = build_teacher(TeacherConfig(id=config.id, spec=config.spec))
        for row in rows:
            pixels = decode_image(row["image"], job.input.max_image_pixels)
            for index, params in enumerate(row["aug"]):
                view = render_view(pixels, params, job.augmentation.random_resized_crop.size, job.augmentation)
                expected = _reference_embedding(teacher, view)
                stored = torch.from_numpy(row[f"image_emb_{config.id}"][index])
                assert F.cosine_similarity(expected, stored, dim=0) > 0.999


def test_real_caption_text_embedding_matches_the_teacher(arrow_run):
    job, _, dataset = arrow_run
    row = next(iter(dataset.iter_samples()))
    teacher = build_teacher(job.teachers[0])
    texts = [row["text"]] + row["captions_tiny_coca"]
    expected = teacher.encode_text(texts)
    stored = torch.from_numpy(row["text_emb_tiny_vit_32"])
    assert torch.all(F.cosine_similarity(expected, stored, dim=1) > 0.999)


def test_second_run_is_identical_and_webdataset_form_matches(arrow_run, sample_shards, small_job_dict, tmp_path):
    job, _, first = arrow_run
    data = small_job_dict(sample_shards, tmp_path / "wds", output={"keep_images": True, "format": "webdataset"},
                          resources={"batch_size": 3, "cpu_workers": 2})
    summary = run_job(parse_job(data))
    assert summary.units_done == len(sample_shards)
    second = open_dataset(str(tmp_path / "wds"))
    assert second.manifest["config_hash"] != first.manifest["config_hash"]  # output format differs
    names = second.location.fs.ls(second.location.join("data"), detail=False)
    assert sorted(n.rsplit("/", 1)[-1] for n in names if n.endswith(".tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    a, b = _rows_by_key(first), _rows_by_key(second)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key]["aug"] == b[key]["aug"]
        assert a[key]["captions_tiny_coca"] == b[key]["captions_tiny_coca"]
        for name in first.layout.embedding_shapes():
            np.testing.assert_allclose(a[key][name], b[key][name], atol=2e-3)


def test_rerun_skips_committed_units_and_refuses_another_config(arrow_run):
    job, _, dataset = arrow_run
    stats_before = {u["id"]: u["files"]["data"]["sha256"] for u in dataset.units}
    summary = run_job(job)
    assert summary.units_done == 0 and summary.units_skipped == len(stats_before)
    reseeded = parse_job({**job.model_dump(mode="json"), "seed": job.seed + 1})
    with pytest.raises(ConfigError, match="was written with a different config"):
        run_job(reseeded)
    assert {u["id"]: u["files"]["data"]["sha256"] for u in open_dataset(job.output.url).units} == stats_before


def _committed_units(out):
    folder = out / "data"
    return sorted(p.name for p in folder.glob("*.stats.json")) if folder.exists() else []


def _wait_for(condition, what, process=None, timeout=300):
    """Wait for an event (a file appearing, a reader on a pipe) while the run lives; generous timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process is None or process.poll() is None, f"the run ended (code {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def _files_of(out, units):
    """(inode, mtime) of every file of the given committed units: a recomputed unit gets new ones."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "data").iterdir()
            if p.name.split(".")[0] in {u.split(".")[0] for u in units}}


def test_killed_run_resumes_to_the_same_dataset(arrow_run, sample_shards, small_job_dict, tmp_path):
    """SIGKILL `dr-gen run` and every process it started three times, each placed by an event, then rerun.

    After kill 1 the last shard is a named pipe nobody writes, so no killed run can finish (or
    commit the last unit); the rerun gets the file back: kill 1 when plan.json appears; kill 2 when the first unit has
    committed; kill 3 once the last unit's task has opened its temp data file. The rerun redoes
    only the last unit: the committed units' files keep their inode and mtime, the run record
    counts 1 unit written and 2 skipped, and the dataset equals an uninterrupted run's."""
    _, _, reference = arrow_run
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in sample_shards:
        shutil.copy(shard, shards / os.path.basename(shard))
    last = shards / os.path.basename(sample_shards[-1])
    last_bytes = last.read_bytes()
    out = tmp_path / "killed"
    data = small_job_dict([str(shards / os.path.basename(s)) for s in sample_shards], out, output={"keep_images": True})
    job_file = tmp_path / "job.yaml"
    job_file.write_text(json.dumps(data))
    command = [sys.executable, "-m", "dr_pipeline.cli", "run", str(job_file)]
    env = {**os.environ, "RAY_ADDRESS": ""}

    def start():
        return subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    last_marker = f"{last.name.split('.')[0]}.stats.json"

    # kill 1: in start-up, once plan.json is written
    process = start()
    _wait_for(lambda: (out / "plan.json").exists(), "plan.json", process)
    kill_tree(process)
    assert _committed_units(out) == [], "kill 1 should land before any unit commits"
    last.unlink()
    os.mkfifo(last)  # listed in plan.json as a file; from now on its reader waits for the test

    # kill 2: once the first unit has committed
    process = start()
    _wait_for(lambda: _committed_units(out), "a committed unit", process)
    kill_tree(process)
    committed = _committed_units(out)
    assert committed and last_marker not in committed

    # kill 3: during the last unit: its task has opened its temp data file and waits on its shard
    before = _files_of(out, committed)
    process = start()
    last_id = last.name.split(".")[0]
    _wait_for(lambda: list((out / "data").glob(f".{last_id}.parquet.*.tmp")), "the last unit's temp file", process)
    kill_tree(process)
    committed = _committed_units(out)
    assert last_marker not in committed and len(committed) == len(sample_shards) - 1
    assert _files_of(out, before) == before, "a unit committed before kill 3 was written again"
    assert [p.name for p in (out / "data").iterdir() if p.name.startswith(".")], "kill 3 should leave a temp file"

    # the rerun, with the last shard a file again (the reader needs a seekable file)
    last.unlink()
    last.write_bytes(last_bytes)
    before = _files_of(out, committed)
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert _files_of(out, before) == before, "the rerun recomputed a committed unit"
    (record,) = json.loads((out / "runs.json").read_text())["runs"]  # killed runs leave no record
    assert (record["units_written"], record["units_skipped"]) == (1, len(sample_shards) - 1)
    resumed = open_dataset(str(out))
    assert resumed.manifest["status"] == "complete"
    assert validate_dataset(str(out)).problems == []
    assert resumed.manifest["totals"] == reference.manifest["totals"]
    assert not [p for p in (out / "data").iterdir() if p.name.startswith(".")], "temp files left behind"
    rows, expected = list(resumed.iter_samples()), _rows_by_key(reference)
    assert len(rows) == len({r["key"] for r in rows}) == len(expected)
    for row in rows:
        assert row["aug"] == expected[row["key"]]["aug"]
        assert row["captions_tiny_coca"] == expected[row["key"]]["captions_tiny_coca"]
        for name in reference.layout.embedding_shapes():
            np.testing.assert_allclose(row[name], expected[row["key"]][name], atol=2e-3)
    reference_sums = {u["id"]: u["files"]["data"]["sha256"] for u in reference.units}
    assert {u["id"]: u["files"]["data"]["sha256"] for u in resumed.units} == reference_sums


def test_inspect_json_reports_the_dataset(arrow_run):
    from typer.testing import CliRunner

    from dr_pipeline.cli import app

    job, _, dataset = arrow_run
    result = CliRunner().invoke(app, ["inspect", job.output.url, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    totals = dataset.manifest["totals"]
    assert report["schema_version"] == SCHEMA_VERSION
    assert (report["samples"], report["failures"], report["units"]) == (
        totals["samples"], totals["failures"], totals["units_done"])
    assert report["num_augmentations"] == 3
    assert [t["dim"] for t in report["teachers"]] == [64, 96]
    assert report["captioners"][0]["num_captions"] == 2
    assert report["bytes_per_sample"] == pytest.approx(totals["bytes"] / totals["samples"], rel=1e-3)
    assert report["sample"]["key"] and len(report["sample"]["captions"]["tiny_coca"]) == 2
    text = CliRunner().invoke(app, ["inspect", job.output.url])
    assert text.exit_code == 0 and "undecodable_image" in text.stdout and "tiny_vit_16_160" in text.stdout
