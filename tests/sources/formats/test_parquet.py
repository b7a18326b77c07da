"""Parquet input: detected or configured columns, nulls, positional keys, Hugging Face image
structs, files without usable columns."""

import io

import pyarrow as pa
import pyarrow.parquet as pq

from dr_pipeline.sources.records import InputFailure, RawSample
from dr_pipeline.tools.sample_data import sample_records
from tests.sample_parquet import write_sample_parquet
from tests.sources.shard_files import memory_url, put, read_all


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
