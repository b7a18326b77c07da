"""Webdataset tars: keys, captions and images by img2dataset's conventions or the config; cut,
damaged, empty and gzipped tars."""

import gzip
import io
import json
import tarfile

import fsspec

from dr_pipeline.sources.records import InputFailure, RawSample
from dr_pipeline.sources.shards import iter_shard
from dr_pipeline.tools.sample_data import sample_records
from tests.sources.shard_files import config, memory_url, put, read_all, tar_bytes


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


def test_member_keys_are_named_as_webdataset_names_them():
    from webdataset.tariterators import base_plus_ext as webdatasets

    from dr_pipeline.sources.formats.webdataset import base_plus_ext

    names = ["000001.jpg", "a/b/000001.json", "a.b/c.d.e", "shard/x.tar.gz", "noext", "dir.d/noext", "x.", ".hidden",
             "k.JPG", "a/b/"]
    assert [base_plus_ext(name) for name in names] == [webdatasets(name) for name in names]
