"""`dr-gen plan`: FLOPs formulas against torch's FLOP counter, sample counting per input kind, speed on
a 100k-shard listing, and no model loaded."""

import dataclasses
import errno
import io
import json
import shutil
import tarfile
from types import SimpleNamespace

import fsspec
import open_clip
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from dr_pipeline.cli import app
from dr_pipeline.core.config import CaptionerConfig, InputConfig, SamplerConfig
from dr_pipeline.core.storage import storage_retries
from dr_pipeline.sources.formats import INPUT_FORMATS, ShardCount
from dr_pipeline.sources.formats import base as formats_base
from dr_pipeline.tools.estimate import GPU_PEAK_TFLOPS, survey_input
from dr_pipeline.read.reader import open_dataset
from tests.sample_parquet import write_sample_parquet
from teachers import build_captioner, model_cost
from teachers.open_clip_adapter import OpenClipCaptioner


def _counted_flops(run):
    """FLOPs torch counts for `run()`, with attention as plain matmuls so it is counted too."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["ViT-L-14", "coca_ViT-L-14", "dr-tiny-vit-16-160"])
def test_tower_flops_match_torchs_count(name):
    with torch.device("meta"):  # the real architecture, no memory for weights
        model = open_clip.create_model(name, pretrained=None, device="meta").train()  # train: no fused MHA
    cost = model_cost(f"open_clip:{name}", "teacher")
    size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
    context = open_clip.get_model_config(name)["text_cfg"]["context_length"]
    image = _counted_flops(lambda: model.encode_image(torch.zeros(1, 3, size, size, device="meta")))
    text = _counted_flops(lambda: model.encode_text(torch.zeros(1, context, dtype=torch.long, device="meta")))
    assert cost.image_flops == pytest.approx(image, rel=1e-5)
    assert cost.text_flops == pytest.approx(text, rel=1e-5)
    if name == "ViT-L-14":
        assert cost.image_flops / 1e9 == pytest.approx(162.03, abs=0.01) and cost.embedding_dim == 768


def test_caption_decoding_flops_match_torchs_count():
    config = CaptionerConfig(id="c", spec="open_clip:dr-tiny-coca")
    captioner = build_captioner(config)
    captioner.model.train()
    sampler = SamplerConfig(max_length=12, min_length=11)  # every caption runs all 12 steps
    images = torch.zeros(2, 3, 224, 224, dtype=torch.uint8)
    seeds = [[1, 2, 3], [4, 5, 6]]
    counted = _counted_flops(lambda: OpenClipCaptioner.generate.__wrapped__(captioner, images, seeds, sampler))
    cost = model_cost(config.spec, "captioner")
    expected = 2 * (cost.image_flops + cost.decoder.image_flops()) + 6 * cost.decoder.caption_flops(12)
    assert expected == pytest.approx(counted, rel=1e-6)


def _plan(job_file, *args):
    result = CliRunner().invoke(app, ["plan", str(job_file), *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def job_file(tmp_path, small_job_dict, sample_shards):
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(small_job_dict(sample_shards, tmp_path / "out")))
    return path


def test_plan_of_tars_counts_each_shards_index(job_file, sample_shards, reinforced, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("plan must not build a model")

    monkeypatch.setattr(open_clip, "create_model", no_model)
    samples = 0
    for shard in sample_shards:
        with tarfile.open(shard) as tar:
            samples += len({member.name.split(".")[0] for member in tar})
    plan = _plan(job_file, "--gpu", "a100")
    survey = plan["input"]
    assert (survey["shards"], survey["samples"], survey["exact"]) == (3, samples, True) and samples == 20
    assert survey["method"] == "exact: member indexes of all 3 shards"
    assert {"samples", "views", "forward passes"} <= set(plan["exact"])
    assert "GPU-hours (assumed MFU)" in plan["estimated"] and "samples" not in plan["estimated"]
    assert plan["views"] == samples * 3
    teacher, _, captioner = plan["models"]
    assert teacher["items"] == {"image_forwards": 3 * samples, "text_forwards": samples * 3}
    assert captioner["items"] == {"images": samples, "captions": 2 * samples, "caption_tokens_at_most": 16 * samples}
    # GPU-hours: encoders at MFU 0.4, decoding at 0.1, of the A100's 312 TFLOP/s
    encoders = sum(m["encoder_flops"] for m in plan["models"])
    seconds = encoders / (312e12 * 0.4) + (plan["flops"] - encoders) / (312e12 * 0.1)
    assert plan["gpu"]["peak_tflops"] == GPU_PEAK_TFLOPS["a100"] == 312
    assert plan["gpu_hours"] == pytest.approx(seconds / 3600)
    # embedding bytes per sample are exact: those of a row of the real run
    row = next(open_dataset(reinforced.arrow).iter_samples())
    stored = sum(row[name].size * 2 for name in open_dataset(reinforced.arrow).layout.embedding_shapes())  # float16
    assert plan["bytes_per_sample"]["embeddings"] == stored


def test_plan_counts_parquet_and_img2dataset_stats_exactly(tmp_path, small_job_dict, sample_shards):
    parquet = write_sample_parquet(str(tmp_path / "samples.parquet"))
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(small_job_dict(parquet, tmp_path / "out")))
    plan = _plan(path)
    assert (plan["input"]["samples"], plan["input"]["exact"]) == (20, True)
    assert plan["input"]["method"] == "exact: parquet footer row counts of all 1 shards"
    assert plan["input"]["caption_bytes"] > 10 and plan["input"]["image_bytes"] > 1000
    tars = tmp_path / "img2dataset"
    tars.mkdir()
    for index, shard in enumerate(sample_shards):
        shutil.copy(shard, tars / f"{index:05d}.tar")
        (tars / f"{index:05d}_stats.json").write_text(json.dumps({"count": 10, "successes": 100 + index}))
    plan = _plan(path, "--input", str(tars / "{00000..00002}.tar"))
    assert (plan["input"]["samples"], plan["input"]["exact"]) == (303, True)
    assert plan["input"]["method"] == "exact: img2dataset stats files of all 3 shards"
    # a shard without its stats file is counted from its own index, not the whole count made cruder
    (tars / "00001_stats.json").unlink()
    with tarfile.open(tars / "00001.tar") as tar:
        indexed = len({member.name.split(".")[0] for member in tar})
    plan = _plan(path, "--input", str(tars / "{00000..00002}.tar"))
    assert (plan["input"]["samples"], plan["input"]["exact"]) == (100 + 102 + indexed, True)
    assert plan["input"]["method"] == "exact: img2dataset stats files and member indexes of all 3 shards"


def test_a_100k_shard_listing_is_planned_from_two_checks_and_16_stats_files():
    """Remote patterns are checked at their first and last shard, so no per-shard request is made
    while listing (only those two shards exist here); samples come from the stats files of 16
    shards spread over the listing."""
    fs = fsspec.filesystem("memory")
    fs.pipe({f"/plan100k/{i:06d}_stats.json": json.dumps({"successes": 9000 + i % 3}).encode()
             for i in range(100_000)})
    fs.pipe({"/plan100k/000000.tar": b"", "/plan100k/099999.tar": b""})
    try:
        survey = survey_input(InputConfig(urls="memory://plan100k/{000000..099999}.tar", format="webdataset"))
    finally:  # fs.rm would walk the listing once per file
        for path in [p for p in fs.store if p.startswith("/plan100k/")]:
            del fs.store[path]
    assert survey.shards == 100_000 and not survey.exact
    assert survey.method.startswith("estimate: img2dataset stats files of 16 of 100000 shards")
    assert 9000 * 100_000 <= survey.samples <= 9002 * 100_000


def test_plan_refuses_an_unknown_gpu(job_file):
    result = CliRunner().invoke(app, ["plan", str(job_file), "--gpu", "abacus"])
    assert result.exit_code == 2 and "unknown GPU 'abacus'" in result.stderr


def test_plan_counts_through_the_input_format_registry(monkeypatch, sample_shards):
    """survey_input has no counting of its own: what the registered format counts is what plan says."""
    counted = []

    def count(url, config):
        counted.append(url)
        return ShardCount(7, 700.0, 70.0)

    webdataset = dataclasses.replace(INPUT_FORMATS["webdataset"], count_cheaply=count, cheap_count_source="test counts")
    monkeypatch.setitem(INPUT_FORMATS, "webdataset", webdataset)
    survey = survey_input(InputConfig(urls=sample_shards))
    assert sorted(counted) == sorted(sample_shards)
    assert (survey.format, survey.samples, survey.exact) == ("webdataset", 21, True)
    assert survey.method == "exact: test counts of all 3 shards"
    assert (survey.image_bytes, survey.caption_bytes) == (100.0, 10.0)


def test_plan_reads_counts_through_the_retried_storage_path(tmp_path, monkeypatch):
    """A connection dropped while a parquet footer is read is retried (and counted), not an unreadable shard."""
    url = write_sample_parquet(str(tmp_path / "samples.parquet"))
    data = (tmp_path / "samples.parquet").read_bytes()
    opened = []

    class DroppingOnce(io.BytesIO):
        def read(self, size=-1):
            if len(opened) == 1:
                raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
            return super().read(size)

    def open_file(path, mode, **options):
        return SimpleNamespace(open=lambda: opened.append(path) or DroppingOnce(data))

    monkeypatch.setattr(formats_base.fsspec, "open", open_file)
    before = storage_retries()
    survey = survey_input(InputConfig(urls=url))
    assert (survey.samples, survey.exact, len(opened)) == (20, True, 2)
    assert storage_retries() - before == 1
