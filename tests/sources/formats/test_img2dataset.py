"""img2dataset's output folder as input: only its tars are shards, and the downloads img2dataset
recorded as failed reach our failures file with its status and message.

The fixture is laid out as img2dataset's webdataset writer leaves it: per shard NNNNN.tar (members
KEY.jpg, KEY.txt, KEY.json with url, caption, key, status, error_message, sizes, exif, sha256; only
the successful downloads), NNNNN.parquet (the same metadata for every URL of the shard, failed
ones with status failed_to_download / failed_to_resize and error_message) and NNNNN_stats.json.
"""

import hashlib
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dr_pipeline.core.config import InputConfig, parse_job
from dr_pipeline.sources.listing import list_shards
from dr_pipeline.sources.records import InputFailure, RawSample
from dr_pipeline.sources.shards import iter_shard

FAILED = {
    "000000001": ("failed_to_download", "HTTP Error 404: Not Found"),
    "000000003": ("failed_to_resize", "image decoding error"),
    "000010002": ("failed_to_download", "<urlopen error [Errno -2] Name or service not known>"),
}


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48 + seed, 40), (40 * seed % 255, 90, 160)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset_folder(folder, shards: int = 2, urls_per_shard: int = 4) -> dict[str, int]:
    """An img2dataset webdataset output folder; returns {"success": n, "failed": n}."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = {"success": 0, "failed": 0}
    for shard_id in range(shards):
        name = f"{shard_id:05d}"
        rows = []
        with tarfile.open(folder / f"{name}.tar", "w") as tar:
            for index in range(urls_per_shard):
                key = f"{shard_id:05d}{index:04d}"
                status, error = FAILED.get(key, ("success", None))
                image = _jpeg(index) if status == "success" else None
                meta = {
                    "url": f"https://example.org/img2dataset/{key}.jpg", "caption": f"a photo number {key}",
                    "key": key, "status": status, "error_message": error,
                    "width": 48 + index if image else None, "height": 40 if image else None,
                    "original_width": 48 + index if image else None, "original_height": 40 if image else None,
                    "exif": None, "sha256": hashlib.sha256(image).hexdigest() if image else None,
                }
                rows.append(meta)
                if image is None:
                    counts["failed"] += 1
                    continue
                counts["success"] += 1
                _add(tar, f"{key}.jpg", image)
                _add(tar, f"{key}.txt", meta["caption"].encode())
                _add(tar, f"{key}.json", json.dumps(meta, indent=4).encode())
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{name}.parquet")
        failed = [r for r in rows if r["status"] != "success"]
        stats = {
            "count": len(rows), "successes": len(rows) - len(failed),
            "failed_to_download": sum(r["status"] == "failed_to_download" for r in failed),
            "failed_to_resize": sum(r["status"] == "failed_to_resize" for r in failed),
            "duration": 1.5, "start_time": 1700000000.0, "end_time": 1700000001.5,
            "status_dict": {r["error_message"]: 1 for r in failed},
            "config": {"output_format": "webdataset", "image_size": 256},
        }
        (folder / f"{name}_stats.json").write_text(json.dumps(stats, indent=4))
    return counts


@pytest.fixture(scope="module")
def img2dataset_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("img2dataset") / "out_webdataset"
    return folder, write_img2dataset_folder(folder)


@pytest.mark.parametrize("form", ["folder", "folder/", "glob"])
def test_folder_or_glob_lists_only_the_tars(img2dataset_folder, form):
    folder, _ = img2dataset_folder
    url = {"folder": str(folder), "folder/": f"{folder}/", "glob": f"{folder}/*"}[form]
    assert list_shards(InputConfig(urls=url)) == [str(folder / "00000.tar"), str(folder / "00001.tar")]


def test_failed_downloads_come_with_img2dataset_status_and_message(img2dataset_folder):
    folder, counts = img2dataset_folder
    config = InputConfig(urls=str(folder))
    items = [item for shard in list_shards(config) for item in iter_shard(shard, config)]
    samples = [i for i in items if isinstance(i, RawSample)]
    failures = {i.key: (i.reason, i.detail) for i in items if isinstance(i, InputFailure)}
    assert len(samples) == counts["success"] and all(s.image and s.text for s in samples)
    assert failures == {key: ("download_failed", f"{status}: {message}") for key, (status, message) in FAILED.items()}


def test_a_run_over_the_folder_accounts_for_every_url(img2dataset_folder, tmp_path, small_job_dict):
    """Through a real run: every URL img2dataset was given is a sample or a failure with its message."""
    import ray

    from dr_pipeline.read.reader import open_dataset
    from dr_pipeline.execution.runner import run_job

    folder, counts = img2dataset_folder
    job = parse_job(small_job_dict(f"{folder}/*", tmp_path / "out", captioners=[],
                                   augmentation={"num_views": 2}))
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    try:
        summary = run_job(job)
    finally:
        ray.shutdown()
    assert (summary.units_done, summary.samples, summary.failures) == (2, counts["success"], counts["failed"])
    dataset = open_dataset(str(tmp_path / "out"))
    assert [u["id"] for u in dataset.units] == ["00000", "00001"]
    recorded = {f["key"]: f for unit in dataset.units for f in dataset.failures(unit)}
    assert recorded["000000001"]["reason"] == "download_failed"
    assert recorded["000000001"]["detail"] == "failed_to_download: HTTP Error 404: Not Found"
    assert set(recorded) == set(FAILED)


def test_img2dataset_parquet_output_failed_rows_carry_its_status(tmp_path):
    """output_format=parquet: one row per URL, jpg null where the download failed."""
    rows = []
    for index in range(4):
        key = f"{0:05d}{index:04d}"
        status, error = FAILED.get(key, ("success", None))
        rows.append({"key": key, "jpg": _jpeg(index) if status == "success" else None,
                     "txt": None if error else f"a photo number {key}", "url": f"https://example.org/{key}.jpg",
                     "caption": f"a photo number {key}", "status": status, "error_message": error})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "00000.parquet")
    config = InputConfig(urls=str(tmp_path))
    (shard,) = list_shards(config)
    items = list(iter_shard(shard, config))
    assert [i.source_key for i in items] == [r["key"] for r in rows] and all(isinstance(i, RawSample) for i in items)
    from dr_pipeline.generate.prepare import _metadata_problem

    problems = {i.source_key: _metadata_problem(i, i.source_key, set()) for i in items}
    assert problems == {
        "000000000": None, "000000002": None,
        "000000001": ("download_failed", "failed_to_download: HTTP Error 404: Not Found"),
        "000000003": ("download_failed", "failed_to_resize: image decoding error"),
    }
