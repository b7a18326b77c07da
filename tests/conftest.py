"""Shared fixtures: the bundled sample shards and a small job over them.

DR_GEN_TEST_DATASETS=FOLDER keeps the sample shards and the `reinforced` datasets in FOLDER and
reuses them when they are there: tests/mutations.py sets it for mutations of code that reads
datasets (validate, verify), so each of those reruns does not regenerate them. Never set it
when the generator itself is under test.
"""

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory):
    """The quickstart sample data: 3 webdataset tars of real photographs (one corrupt, one uncaptioned)."""
    from dr_pipeline.tools.sample_data import write_sample_data

    cache = os.environ.get("DR_GEN_TEST_DATASETS")
    folder = Path(cache) / "sample_data" if cache else tmp_path_factory.mktemp("sample_data")
    return write_sample_data(str(folder), num_shards=3)  # same bytes every time


@pytest.fixture(scope="session")
def small_job_dict():
    """A factory of small job dicts over given shards and output (see `_small_job_dict`)."""
    return _small_job_dict


def _small_job_dict(shards, output_url, **overrides):
    """The quickstart job shrunk for tests: K=3 views, one caption per captioner."""
    data = {
        "name": "test",
        "seed": 7,
        "input": {"urls": shards},
        "output": {"url": str(output_url)},
        "augmentation": {
            "num_views": 3,
            "horizontal_flip": {"p": 0.5},
            "random_erasing": {"p": 0.5},
        },
        "teachers": [
            {"id": "tiny_vit_32", "spec": "open_clip:dr-tiny-vit-32"},
            {"id": "tiny_vit_16_160", "spec": "open_clip:dr-tiny-vit-16-160"},
        ],
        "captioners": [
            {
                "id": "tiny_coca",
                "spec": "open_clip:dr-tiny-coca",
                "num_captions": 2,
                "sampler": {"max_length": 8, "min_length": 2},
            }
        ],
        "resources": {"actors": 1, "cpu_workers": 1, "batch_size": 4},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray session for one test module (`pytestmark = pytest.mark.usefixtures("local_ray")`)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def reinforced(sample_shards, small_job_dict, tmp_path_factory):
    """Two real runs of the small job on the sample shards, in one Ray session: an Arrow dataset without
    images (tools re-read the input shards) and a webdataset one with images; and the progress
    reports of the first run."""
    import types

    import ray

    from dr_pipeline.core.config import parse_job
    from dr_pipeline.execution.runner import run_job

    from dr_pipeline.execution.progress import RunProgress

    cache = os.environ.get("DR_GEN_TEST_DATASETS")
    root = Path(cache) if cache else tmp_path_factory.mktemp("reinforced")
    arrow = parse_job(small_job_dict(sample_shards, root / "arrow"))
    webdataset = parse_job(small_job_dict(sample_shards, root / "wds", output={"keep_images": True, "format": "webdataset"}))
    progress_file = root / "progress.json"
    if progress_file.exists():
        progress = [RunProgress(**snapshot) for snapshot in json.loads(progress_file.read_text())]
    else:
        progress = []
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2, log_to_driver=False)
        try:
            run_job(arrow, on_progress=progress.append)
            run_job(webdataset)
        finally:
            ray.shutdown()
        if cache:
            progress_file.write_text(json.dumps([vars(snapshot) for snapshot in progress]))
    return types.SimpleNamespace(arrow=arrow.output.url, webdataset=webdataset.output.url, arrow_job=arrow,
                                 progress=progress)


EXTENSION_TEACHER = {"id": "tiny_extra", "spec": "open_clip:dr-tiny-vit-32"}
EXTENSION_CAPTIONER = {"id": "coca_extra", "spec": "open_clip:dr-tiny-coca", "num_captions": 1,
                       "sampler": {"max_length": 8, "min_length": 2}}


@pytest.fixture(scope="session")
def extended(reinforced, small_job_dict, sample_shards):
    """Copies of both `reinforced` datasets extended (`--extend`) with one more teacher and one more
    captioner: their sidecar files hold added image, text and caption columns and the base
    teachers' embeddings of the new captions (rows appended). Kept beside the `reinforced`
    datasets (see DR_GEN_TEST_DATASETS)."""
    import shutil
    import types

    import ray

    from dr_pipeline.core.config import parse_job
    from dr_pipeline.execution.extend import extend_dataset

    root = Path(reinforced.arrow).parent / "extended"
    copies = {"arrow": (reinforced.arrow, {}), "wds": (reinforced.webdataset, {"keep_images": True, "format": "webdataset"})}
    if not all((root / name / "dataset.json").exists() for name in copies):
        shutil.rmtree(root, ignore_errors=True)
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2, log_to_driver=False)
        try:
            for name, (source, output) in copies.items():
                shutil.copytree(source, root / name)
                job = small_job_dict(sample_shards, root / name, output=output)
                job["teachers"] = [*job["teachers"], EXTENSION_TEACHER]
                job["captioners"] = [*job["captioners"], EXTENSION_CAPTIONER]
                extend_dataset(parse_job(job))
        finally:
            ray.shutdown()
    return types.SimpleNamespace(arrow=root / "arrow", webdataset=root / "wds")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread: torch's thread pool mostly waits on a loaded machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
