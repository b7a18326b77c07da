"""Schema v1 as data: Arrow types, webdataset members, keys, storage dtypes, version checks."""

import hashlib

import numpy as np
import pyarrow as pa
import pytest
import torch

from dr_pipeline.core.errors import DatasetError
from dr_pipeline.core.schema import (
    KEY_PATTERN,
    CaptionerColumns,
    DatasetLayout,
    TeacherColumns,
    check_schema_version,
    from_storage,
    safe_key,
    sample_uid,
)
from dr_pipeline.generate.model_worker import to_storage

LAYOUT = DatasetLayout(
    num_views=3,
    embedding_dtype="float16",
    teachers=(TeacherColumns("big", 8), TeacherColumns("text_only", 4, has_image=False)),
    captioners=(CaptionerColumns("coca", 2), CaptionerColumns("blip", 1)),
)


def test_arrow_schema_instantiates_templates():
    schema = LAYOUT.arrow_schema()
    assert schema.field("image_emb_big").type == pa.list_(pa.list_(pa.float16(), 8), 3)
    assert schema.field("text_emb_big").type == pa.list_(pa.list_(pa.float16(), 8), 4)
    assert schema.field("text_emb_text_only").type == pa.list_(pa.list_(pa.float16(), 4), 4)
    assert "image_emb_text_only" not in schema.names
    assert schema.field("captions_coca").type == pa.list_(pa.string())
    aug = schema.field("aug").type.value_type
    assert [aug.field(i).name for i in range(aug.num_fields)] == ["crop", "flip", "rand_augment", "erase"]
    assert not schema.field("key").nullable and schema.field("url").nullable
    assert schema.metadata[b"dr_gen.schema_version"] == b"1.2"
    assert schema.names.index("uid") == schema.names.index("source_key") + 1 and not schema.field("uid").nullable


def test_layouts_before_schema_1_2_have_no_uid_column():
    """A 1.0/1.1 manifest's layout has no uid_column: its files are read and validated without one."""
    old = DatasetLayout.from_dict({k: v for k, v in LAYOUT.to_dict().items() if k != "uid_column"})
    assert "uid" not in old.arrow_schema().names and "uid" in LAYOUT.arrow_schema().names
    json_member = old.webdataset_members(keep_images=False)[0]
    assert json_member["suffix"] == "json" and "uid" not in json_member["fields"]
    assert "uid" in LAYOUT.webdataset_members(keep_images=False)[0]["fields"]
    assert DatasetLayout.from_dict(LAYOUT.to_dict()) == LAYOUT


def test_uid_is_the_inputs_own_else_derived_from_key_and_image():
    assert sample_uid("0f3c9a", "000001", "ab" * 32) == "0f3c9a"
    derived = sample_uid(None, "000001", "ab" * 32)
    assert derived == hashlib.sha256(("000001\n" + "ab" * 32).encode()).hexdigest()[:32]
    assert sample_uid("", "000001", "ab" * 32) == derived != sample_uid(None, "000001", "cd" * 32)


def test_bfloat16_is_stored_as_raw_bits():
    schema = DatasetLayout(2, "bfloat16", (TeacherColumns("t", 5),)).arrow_schema()
    assert schema.field("image_emb_t").type == pa.list_(pa.list_(pa.uint16(), 5), 2)
    values = torch.randn(4, 5)
    stored = to_storage(values, "bfloat16")
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(from_storage(stored, "bfloat16"), values.to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(from_storage(to_storage(values, "float32"), "float32"), values.numpy())


def test_text_rows_and_webdataset_members():
    assert LAYOUT.num_texts == 4
    assert LAYOUT.text_sources() == [
        {"source": "text"},
        {"source": "captions_coca", "index": 0},
        {"source": "captions_coca", "index": 1},
        {"source": "captions_blip", "index": 0},
    ]
    suffixes = [m["suffix"] for m in LAYOUT.webdataset_members(keep_images=False)]
    assert suffixes == [
        "json", "aug.json", "image_emb.big.npy", "text_emb.big.npy", "text_emb.text_only.npy",
        "captions.coca.json", "captions.blip.json",
    ]
    with_images = LAYOUT.webdataset_members(keep_images=True)
    assert with_images[-1] == {"suffix": "{image_format}", "fields": ["image"], "encoding": "bytes"}


def test_layout_round_trips_through_manifest_dict():
    assert DatasetLayout.from_dict(LAYOUT.to_dict()) == LAYOUT


@pytest.mark.parametrize("key", ["000001", "abc_DEF-9"])
def test_safe_keys_are_kept(key):
    assert safe_key(key) == key


@pytest.mark.parametrize("key", ["a/b", "../../etc/passwd", "x.jpg", "ünïcode", "", "a b", "k" * 200])
def test_unsafe_keys_map_deterministically_and_distinctly(key):
    mapped = safe_key(key)
    assert KEY_PATTERN.match(mapped)
    assert mapped == safe_key(key)
    assert "/" not in mapped and "." not in mapped
    assert safe_key(key + "?") != mapped


def test_unknown_major_version_is_refused():
    check_schema_version("1.3")
    with pytest.raises(DatasetError, match="schema version 2.0 is not supported"):
        check_schema_version("2.0")
