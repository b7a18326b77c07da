"""Listing, format detection and reading of input shards (webdataset tars and parquet)."""

import gzip
import io
import json
import random
import tarfile
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from dr_pipeline.sources import inputs
from dr_pipeline.core.config import InputConfig
from dr_pipeline.core.errors import ConfigError
from dr_pipeline.sources.inputs import InputFailure, RawSample, ShardUnavailable, detect_format, iter_shard, list_shards
from dr_pipeline.tools.sample_data import sample_records
from tests.sample_parquet import write_sample_parquet


def config(urls="unused", **settings) -> InputConfig:
    return InputConfig(urls=urls, **settings)


def memory_url(name: str) -> str:
    """A fresh memory:// folder per call, so tests never see each other's files."""
    return f"memory://{uuid.uuid4().hex}/{name}"


def put(url: str, data: bytes) -> str:
    with fsspec.open(url, "wb") as file:
        file.write(data)
    return url


def tar_bytes(members: list[tuple[str, bytes]], directories: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in directories:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def read_all(url: str, **settings) -> list[RawSample | InputFailure]:
    return list(iter_shard(url, config(**settings)))


# --------------------------------------------------------------------------- list_shards


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


# --------------------------------------------------------------------------- detect_format


def test_detect_format_by_config_then_extension():
    assert detect_format("x/data.bin", config(format="parquet")) == "parquet"
    assert detect_format("x/00000.tar", config(format="parquet")) == "parquet"
    for name in ("a.tar", "a.TAR", "a.tar.gz", "a.tgz", "https://h/a.tar?token=1"):
        assert detect_format(name, config()) == "webdataset"
    for name in ("a.parquet", "s3://b/a.PARQUET"):
        assert detect_format(name, config()) == "parquet"


def test_detect_format_sniffs_the_content_when_the_name_does_not_tell():
    tar_url = put(memory_url("shard-a"), tar_bytes([("k.txt", b"hello")]))
    buffer = io.BytesIO()
    pq.write_table(pa.table({"caption": ["c"]}), buffer)
    parquet_url = put(memory_url("shard-b"), buffer.getvalue())
    assert detect_format(tar_url, config()) == "webdataset"
    assert detect_format(parquet_url, config()) == "parquet"
    with pytest.raises(ConfigError, match="set input.format"):
        detect_format(put(memory_url("shard-c"), b"plain text, neither format"), config())
    with pytest.raises(ConfigError, match="cannot read it"):
        detect_format(memory_url("missing"), config())


# --------------------------------------------------------------------------- webdataset tars


def test_reading_the_sample_shards_gives_back_what_was_written(sample_shards):
    read = [item for url in sample_shards for item in iter_shard(url, config())]
    expected = sample_records()
    assert all(isinstance(item, RawSample) for item in read)
    assert [item.source_key for item in read] == [record.key for record in expected]
    for item, record in zip(read, expected):
        assert (item.text, item.image, item.image_format, item.url) == (
            record.caption,
            record.image,
            record.image_format,
            record.url,
        )


def test_tar_keys_captions_and_images_follow_img2dataset_conventions():
    members = [
        ("a.jpg", b"A-JPG"), ("a.png", b"A-PNG"), ("a.txt", b"caption a"),
        ("a.json", json.dumps({"uid": "uid-a", "key": "key-a", "url": "https://x/a.jpg", "caption": "j"}).encode()),
        ("b.JPEG", b"B"), ("b.json", json.dumps({"key": "key-b", "caption": "json caption b"}).encode()),
        ("c.webp", b"C"), ("c.json", json.dumps({"uid": 1234, "text": "json text c"}).encode()),
        ("d.png", b"D"), ("d.txt", b"  "), ("d.json", b"{not json"),
        ("e.npz", b"E"), ("e.txt", b""),
        ("f.jpg", b"F"), ("f.txt", b"caf\xc3\xa9 \xff"), ("f.json", b"[1, 2]"),
    ]  # fmt: skip
    read = read_all(put(memory_url("s.tar"), tar_bytes(members, directories=("subdir",))))
    assert read == [
        RawSample("uid-a", "caption a", b"A-JPG", "jpg", "https://x/a.jpg", uid="uid-a"),
        RawSample("key-b", "json caption b", b"B", "jpg", None),
        RawSample("1234", "json text c", b"C", "webp", None, uid="1234"),
        RawSample("d", "  ", b"D", "png", None),
        RawSample("e", "", None, None, None),
        RawSample("f", "café \ufffd", b"F", "jpg", None),
    ]


def test_tar_members_and_json_fields_can_be_named_in_the_config():
    members = [
        ("a.jpg", b"JPG"), ("a.webp", b"WEBP"), ("a.txt", b"txt caption"), ("a.alt", b"alt caption"),
        ("a.json", json.dumps({"uid": "u", "id": "custom-id", "src": "https://x/a", "caption": "c"}).encode()),
        ("b.jpg", b"JPG"), ("b.json", json.dumps({"caption": "only in json"}).encode()),
    ]  # fmt: skip
    read = read_all(
        put(memory_url("s.tar"), tar_bytes(members)),
        image_column="webp", text_column="alt", key_column="id", url_column="src",
    )  # fmt: skip
    assert read == [
        RawSample("custom-id", "alt caption", b"WEBP", "webp", "https://x/a", uid="u"),
        RawSample("b", None, None, None, None),
    ]


def test_repeated_or_interleaved_keys_become_separate_samples_for_duplicate_accounting():
    members = [("a.jpg", b"1"), ("a.jpg", b"2"), ("b.jpg", b"3"), ("a.jpg", b"4")]
    assert [(s.source_key, s.image) for s in read_all(put(memory_url("s.tar"), tar_bytes(members)))] == [
        ("a", b"1"), ("a", b"2"), ("b", b"3"), ("a", b"4"),
    ]  # fmt: skip


def test_gzipped_tar_is_read():
    data = tar_bytes([("a.jpg", b"A"), ("a.txt", b"cap")])
    assert read_all(put(memory_url("s.tar.gz"), gzip.compress(data, mtime=0))) == [
        RawSample("a", "cap", b"A", "jpg", None)
    ]


def test_truncated_tar_yields_the_complete_samples_then_one_failure(sample_shards):
    data = fsspec.open(sample_shards[1], "rb").open().read()
    expected = [(s.source_key, s.text, s.image, s.url) for s in iter_shard(sample_shards[1], config())]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offsets = {member.name: (member.offset, member.offset_data + member.size) for member in tar}
    first_key = expected[0][0]
    third_key = expected[2][0]
    image_start, image_end = offsets[f"{third_key}.jpg"]
    cuts = {  # cut offset: samples that come out complete; the next one is reported truncated
        image_start: 1,  # exactly between the second and third samples: the second cannot be proven complete
        image_start + 100: 1,  # inside the third sample's first header: its key is not known yet
        (image_start + image_end) // 2: 2,  # inside the third sample's image data
        offsets[f"{third_key}.json"][1]: 2,  # after its last member's data, before the padding
        offsets[f"{first_key}.txt"][1] + 3: 0,  # inside the first sample, in the padding of a member
    }
    for cut, complete in cuts.items():
        read = read_all(put(memory_url("cut.tar"), data[:cut]))
        samples = [(s.source_key, s.text, s.image, s.url) for s in read[:-1]]
        assert samples == expected[:complete], cut
        failure = read[-1]
        assert isinstance(failure, InputFailure) and failure.reason == "truncated_shard", cut
        assert failure.key == expected[complete][0], cut


def test_tar_cut_inside_its_end_marker_is_complete(sample_shards):
    data = fsspec.open(sample_shards[0], "rb").open().read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1]
    end_of_members = last.offset_data + -(-last.size // 512) * 512
    for cut in (end_of_members + 1, end_of_members + 512, len(data) - 1):
        read = read_all(put(memory_url("cut.tar"), data[:cut]))
        assert all(isinstance(item, RawSample) for item in read) and len(read) == len(sample_records()) // 3


def test_tar_damage_after_the_start_is_a_truncated_shard_keyed_by_shard_when_no_sample_began():
    data = tar_bytes([("__meta__", b"skipped, no key"), ("a.jpg", b"A")])
    corrupt = data[:512 * 2] + b"\x07" * 512 + data[512 * 3:]  # the second header is garbage
    assert read_all(put(memory_url("s.tar"), corrupt)) == [
        InputFailure(
            "s.tar#truncated",
            "truncated_shard",
            "s.tar breaks off: DamagedTarError: damaged tar header (invalid header)",
        )
    ]


def test_empty_tar_yields_nothing_and_non_tar_files_one_unreadable_failure():
    assert read_all(put(memory_url("empty.tar"), tar_bytes([]))) == []
    for name, data in (("zero.tar", b""), ("garbage.tar", b"this is not a tar archive" * 100)):
        read = read_all(put(memory_url(name), data))
        assert [(f.key, f.reason) for f in read] == [(f"{name}#unreadable", "unreadable_shard")]
        assert read[0].detail.startswith("not a tar archive")
    unknown = read_all(put(memory_url("mystery"), b"neither format"))
    assert [(f.key, f.reason) for f in unknown] == [("mystery#unreadable", "unreadable_shard")]


def test_a_shard_that_cannot_be_opened_raises_rather_than_yielding_a_failure():
    """Its unit must fail (and a rerun retry it), never be committed without its samples."""
    with pytest.raises(ShardUnavailable, match="missing.tar cannot be opened .*FileNotFoundError"):
        read_all(memory_url("missing.tar"))


def test_tar_reading_streams(sample_shards, monkeypatch):
    """The first sample arrives after reading a small part of the shard, not all of it."""
    data = fsspec.open(sample_shards[1], "rb").open().read()
    file = io.BytesIO(data)
    monkeypatch.setattr(inputs.fsspec, "open", lambda url, mode, **options: _Opener(file))
    samples = iter_shard("s3://bucket/00001.tar", config())
    next(samples)
    assert file.tell() < len(data) / 2


# --------------------------------------------------------------------------- storage errors


class _Opener:
    def __init__(self, file):
        self.file = file

    def open(self):
        return self.file


class _FailingFile(io.BytesIO):
    """A remote file whose connection drops once `limit` bytes have been read."""

    def __init__(self, data: bytes, limit: int):
        super().__init__(data)
        self.left = limit

    def read(self, size=-1):
        if self.left <= 0:
            raise ConnectionResetError("connection reset by peer")
        data = super().read(size)
        self.left -= len(data)
        return data


@pytest.mark.parametrize("name", ["00000.tar", "00000.parquet"])
def test_storage_errors_propagate_instead_of_being_recorded(monkeypatch, name):
    """A dropped connection says nothing about the shard: the caller must retry, not record a failure."""
    images = [random.Random(i).randbytes(2_000) for i in range(200)]
    if name.endswith(".parquet"):
        buffer = io.BytesIO()
        table = pa.table({"jpg": images, "caption": ["c"] * len(images)})
        pq.write_table(table, buffer, row_group_size=10, compression="none")
        data = buffer.getvalue()
    else:
        data = tar_bytes([(f"{i}.jpg", image) for i, image in enumerate(images)])
    dropping = _FailingFile(data, limit=len(data) * 4 // 5)
    monkeypatch.setattr(inputs.fsspec, "open", lambda url, mode, **options: _Opener(dropping))
    samples = iter_shard(f"s3://bucket/{name}", config())
    assert isinstance(next(samples), RawSample)
    with pytest.raises(ConnectionResetError):
        list(samples)


# --------------------------------------------------------------------------- parquet


def parquet_url(table: pa.Table, name: str = "00007.parquet", **write_options) -> str:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, **write_options)
    return put(memory_url(name), buffer.getvalue())


def test_img2dataset_parquet_is_read_with_detected_columns(tmp_path):
    url = write_sample_parquet(str(tmp_path / "00000.parquet"))
    read = read_all(url)
    assert [(s.source_key, s.text, s.image, s.image_format, s.url) for s in read] == [
        (r.key, r.caption, r.image, r.image_format, r.url) for r in sample_records()
    ]


def test_parquet_with_configured_columns_nulls_and_positional_keys():
    table = pa.table(
        {
            "photo": [b"\x89PNG\r\n\x1a\n...", None, b"????"],
            "alt_text": ["first", "second", None],
            "source": ["https://x/1", None, "https://x/3"],
            "caption": ["ignored", "ignored", "ignored"],
        }
    )
    read = read_all(parquet_url(table), image_column="photo", text_column="alt_text", url_column="source")
    assert read == [
        RawSample("00007_000000000", "first", b"\x89PNG\r\n\x1a\n...", "png", "https://x/1"),
        RawSample("00007_000000001", "second", None, None, None),
        RawSample("00007_000000002", None, b"????", None, "https://x/3"),
    ]


def test_parquet_hugging_face_image_struct_and_row_keys_across_batches():
    rows = 600  # more than one read batch and row group
    images = [{"bytes": b"\xff\xd8\xff" + bytes([i % 256]), "path": f"{i}.jpg"} for i in range(rows)]
    images[5] = {"bytes": None, "path": "external.jpg"}
    table = pa.table({"image": images, "text": [f"caption {i}" for i in range(rows)], "uid": list(range(rows))})
    read = read_all(parquet_url(table, row_group_size=250))
    assert len(read) == rows
    assert read[0] == RawSample("0", "caption 0", b"\xff\xd8\xff\x00", "jpg", None, uid="0")
    assert read[5].image is None and read[5].source_key == "5"
    assert read[599] == RawSample("599", "caption 599", b"\xff\xd8\xff\x57", "jpg", None, uid="599")


def test_parquet_without_usable_columns_is_one_unreadable_failure():
    no_image = parquet_url(pa.table({"caption": ["a", "b"], "key": ["1", "2"]}), name="a.parquet")
    assert read_all(no_image) == [
        InputFailure(
            "a.parquet#unreadable",
            "unreadable_shard",
            "no image column (looked for jpg, jpeg, png, webp, image, img, image_bytes); "
            "columns: caption, key; 2 rows not read",
        )
    ]
    no_text = read_all(parquet_url(pa.table({"jpg": [b"x"]}), name="b.parquet"))
    assert [(f.key, f.reason) for f in no_text] == [("b.parquet#unreadable", "unreadable_shard")]
    assert "no text column" in no_text[0].detail
    configured = read_all(parquet_url(pa.table({"jpg": [b"x"], "caption": ["c"]})), key_column="id")
    assert configured[0].reason == "unreadable_shard" and "no column 'id' (input.key_column)" in configured[0].detail
    wrong_type = read_all(parquet_url(pa.table({"jpg": ["a string"], "caption": ["c"]})))
    assert "image column 'jpg' has type string" in wrong_type[0].detail
    garbage = read_all(put(memory_url("c.parquet"), b"not parquet at all"))
    assert [(f.key, f.reason) for f in garbage] == [("c.parquet#unreadable", "unreadable_shard")]
