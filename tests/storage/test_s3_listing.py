"""Input listing on a real S3 API (moto's server, the `s3` fixture): a bare folder URL, with or
without its trailing slash, stands for its shards as a local folder does (img2dataset's sidecar
files left out), and `plan` counts them through the input format registry."""

import json

import pytest

from dr_pipeline.core.config import InputConfig
from dr_pipeline.core.errors import ConfigError
from dr_pipeline.sources.listing import list_shards
from dr_pipeline.tools.estimate import survey_input
from tests.storage.conftest import s3_upload


@pytest.fixture(scope="module")
def img2dataset_folder(s3, sample_shards, tmp_path_factory):
    """s3://drgen-folder/out/ laid out as img2dataset leaves it: NNNNN.tar, NNNNN.parquet (its
    metadata), NNNNN_stats.json; and a file of no input format."""
    local = tmp_path_factory.mktemp("img2dataset")
    files = []
    for index, shard in enumerate(sample_shards):
        tar = local / f"{index:05d}.tar"
        tar.write_bytes(open(shard, "rb").read())
        (local / f"{index:05d}.parquet").write_bytes(b"PAR1 metadata, not a shard")
        (local / f"{index:05d}_stats.json").write_text(json.dumps({"successes": 100 + index}))
        files += [tar, local / f"{index:05d}.parquet", local / f"{index:05d}_stats.json"]
    (local / "notes.txt").write_text("not a shard")
    bucket = s3.bucket("drgen-folder")
    s3_upload(s3, [*files, local / "notes.txt"], "drgen-folder/out")
    return bucket, [f"{bucket}/out/{index:05d}.tar" for index in range(len(sample_shards))]


def test_a_bare_s3_folder_is_listed_like_a_local_folder(s3, img2dataset_folder):
    bucket, tars = img2dataset_folder
    for url in (f"{bucket}/out/", f"{bucket}/out", f"{bucket}/{{out,out/}}"):
        assert list_shards(InputConfig(urls=url, storage_options=s3.options)) == tars, url
    with pytest.raises(ConfigError, match="does not exist"):
        list_shards(InputConfig(urls=f"{bucket}/nothing-here/", storage_options=s3.options))


def test_plan_counts_an_s3_folder_from_img2dataset_stats(s3, img2dataset_folder):
    bucket, _ = img2dataset_folder
    survey = survey_input(InputConfig(urls=f"{bucket}/out/", storage_options=s3.options))
    assert (survey.shards, survey.samples, survey.exact) == (3, 303, True)
    assert survey.method == "exact: img2dataset stats files of all 3 shards"
