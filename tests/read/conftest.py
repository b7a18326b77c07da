"""Two reinforced datasets of the sample shards, generated once for every test of this folder.

kept: Arrow, original images kept, flips and erasing on, float16.
from_input: webdataset, images not kept (replay reads the input shards), no flip or
erasing (exportable as DataCompDR), bfloat16.
ipc: the from_input job written as Arrow IPC files (same seeds, so the same rows).
"""

from dataclasses import dataclass

import pytest
import ray
import torch

from dr_pipeline.core.config import JobConfig, parse_job
from dr_pipeline.read.reader import ReinforcedDataset, open_dataset
from dr_pipeline.execution.runner import run_job


# The from_input and ipc jobs' augmentation: no flip or erasing, so the DataCompDR layout holds it.
FROM_INPUT = {"augmentation": {"horizontal_flip": {"p": 0.0}, "random_erasing": {"p": 0.0}}}


@dataclass(frozen=True)
class Generated:
    job: JobConfig
    dataset: ReinforcedDataset


@pytest.fixture(scope="session")
def generated(sample_shards, small_job_dict, tmp_path_factory):
    """{"kept": Generated, "from_input": Generated, "ipc": Generated}, from one local Ray session."""
    root = tmp_path_factory.mktemp("reading")
    jobs = {
        "kept": parse_job(small_job_dict(sample_shards, root / "kept", output={"keep_images": True})),
        "from_input": parse_job(small_job_dict(
            sample_shards, root / "from_input", output={"format": "webdataset", "embedding_dtype": "bfloat16"}, **FROM_INPUT,
        )),
        "ipc": parse_job(small_job_dict(
            sample_shards, root / "ipc", output={"format": "ipc", "embedding_dtype": "bfloat16"}, **FROM_INPUT,
        )),
    }
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2, log_to_driver=False)
    try:
        for job in jobs.values():
            run_job(job)
    finally:
        if started_here:
            ray.shutdown()
    return {name: Generated(job, open_dataset(job.output.url)) for name, job in jobs.items()}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Replay is many small ops: like a DataLoader worker, use one thread (2 shared cores oversubscribe)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
