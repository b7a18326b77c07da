"""Listing input shards: braces, globs, lists, folders; which URLs are checked."""

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from dr_pipeline.core.errors import ConfigError
from dr_pipeline.sources.listing import list_shards
from tests.sources.shard_files import config, memory_url, put


def test_list_shards_expands_braces_globs_and_lists_in_natural_order(tmp_path):
    for name in ("shard-1.tar", "shard-2.tar", "shard-10.tar", "other.parquet"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "shard-dir.tar").mkdir()  # a directory matching the glob is not a shard
    patterns = [f"{tmp_path}/shard-{{1,2}}.tar", f"{tmp_path}/shard-*.tar", f"file://{tmp_path}/*.parquet"]
    names = ["other.parquet", "shard-1.tar", "shard-2.tar", "shard-10.tar"]
    assert list_shards(config(patterns)) == [f"{tmp_path}/{name}" for name in names]


def test_list_shards_makes_local_paths_absolute(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    for index in range(3):
        (tmp_path / "data" / f"{index:05d}.tar").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert list_shards(config("data/{00000..00002}.tar")) == [f"{tmp_path}/data/{i:05d}.tar" for i in range(3)]


def test_list_shards_fails_on_patterns_that_match_nothing(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"matches no shard") as error:
        list_shards(config(f"{tmp_path}/*.parquet"))
    assert f"{tmp_path}/*.parquet" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"2 of 3 files do not exist, first .*/00001\.tar"):
        list_shards(config(f"{tmp_path}/{{00000..00002}}.tar"))
    with pytest.raises(ConfigError, match=r"cannot use its filesystem"):
        list_shards(config("nosuchprotocol://bucket/{0..3}.tar"))


def test_list_shards_on_memory_filesystem_checks_only_first_and_last_of_a_range():
    folder = memory_url("shards")
    for index in (0, 1, 3):  # 2 is missing: found when read, not at listing time
        put(f"{folder}/{index}.tar", b"x")
    fs, root = fsspec.core.url_to_fs(folder)
    expected = [fs.unstrip_protocol(f"{root}/{index}.tar") for index in range(4)]
    assert list_shards(config(f"{folder}/{{0..3}}.tar")) == expected
    assert list_shards(config(f"{folder}/*.tar")) == [expected[0], expected[1], expected[3]]
    with pytest.raises(ConfigError, match=r"4\.tar does not exist"):
        list_shards(config(f"{folder}/{{0..4}}.tar"))


def test_list_shards_expands_a_huge_remote_range_without_touching_each_shard(monkeypatch):
    folder = memory_url("big")
    put(f"{folder}/00000.tar", b"x")
    put(f"{folder}/99999.tar", b"x")
    checked = []
    original_info = MemoryFileSystem.info
    monkeypatch.setattr(MemoryFileSystem, "info",
                        lambda fs, path, **kw: checked.append(path) or original_info(fs, path, **kw))
    shards = list_shards(config(f"{folder}/{{00000..99999}}.tar"))
    assert len(shards) == 100_000 and shards[0].endswith("/00000.tar") and shards[-1].endswith("/99999.tar")
    assert sorted(checked) == [shards[0], shards[-1]]
