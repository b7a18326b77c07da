"""The webdataset output format: one tar per unit, members named per schemas/v1 (`webdataset.members`).

A member holds one column as npy, several as one JSON object (or one as a JSON value),
or the kept image's bytes under its own format's suffix. Members are written with
mtime 0, so a rerun writes the same bytes.
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any, BinaryIO, Iterator

import numpy as np

from dr_pipeline.core.errors import error_line
from dr_pipeline.core.schema import DatasetLayout
from dr_pipeline.dataset.formats.base import (
    CHECKED_ROWS,
    CheckedRows,
    DatasetFormat,
    FileLayout,
    ReportRow,
    UnusableFile,
)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encode_member(member: dict[str, Any], values: list[Any]) -> bytes:
    """The bytes of one member from the values of its fields."""
    if member["encoding"] == "json":
        value = dict(zip(member["fields"], values)) if len(values) > 1 else values[0]
        return json.dumps(value, ensure_ascii=False).encode()
    if member["encoding"] == "npy":
        return _npy_bytes(values[0])
    return values[0]


def decode_member(member: dict[str, Any], data: bytes) -> Any:
    """A member's value: an array (npy), a JSON value (the object of its fields when it has
    several), or the bytes themselves; ValueError when it does not decode."""
    if member["encoding"] == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if member["encoding"] == "json":
        return json.loads(data)
    return data


def _samples(handle: BinaryIO, regular_only: bool = False) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) of each sample, its members consecutive in the tar (webdataset's naming:
    the key is the member name up to its first dot); other than regular members read as b"" if asked."""
    with tarfile.open(fileobj=handle, mode="r|") as tar:
        key, raw = None, {}
        for info in tar:
            name_key, _, suffix = info.name.partition(".")
            if name_key != key and raw:
                yield key, raw
                raw = {}
            key = name_key
            raw[suffix] = tar.extractfile(info).read() if info.isreg() or not regular_only else b""
        if raw:
            yield key, raw


class WebDatasetUnitWriter:
    """One tar per unit; mtime 0 for reproducible bytes."""

    def __init__(self, sink: Any, layout: FileLayout, keep_images: bool):
        import webdataset  # noqa: PLC0415 - it imports torch, which reading and validating a dataset do without
        self._tar = webdataset.TarWriter(sink, encoder=False, mtime=0)
        self._members = layout.webdataset_members(keep_images)

    def write(self, columns: dict[str, Any]) -> None:
        for i, key in enumerate(columns["key"]):
            sample: dict[str, Any] = {"__key__": key}
            # a sidecar has no image_format column (and no member named after it)
            variables = {"image_format": columns["image_format"][i]} if "image_format" in columns else {}
            for member in self._members:
                suffix = member["suffix"].format(**variables)
                sample[suffix] = encode_member(member, [columns[name][i] for name in member["fields"]])
            self._tar.write(sample)

    def close(self) -> None:
        self._tar.close()


class WebDatasetFormat(DatasetFormat):
    """Tars as webdataset and open_clip's loaders read them."""

    name = "webdataset"
    suffix = "tar"

    def open_writer(self, sink: BinaryIO, layout: FileLayout, keep_images: bool) -> WebDatasetUnitWriter:
        return WebDatasetUnitWriter(sink, layout, keep_images)

    def rows(self, handle: BinaryIO, layout: FileLayout, array_names: set[str]) -> Iterator[dict[str, Any]]:
        members = layout.webdataset_members(keep_images=True)
        for key, raw in _samples(handle):
            row: dict[str, Any] = {"key": key, "image": None}
            for member in members:
                if member["encoding"] == "bytes":
                    continue
                value = decode_member(member, raw[member["suffix"]])
                row.update(value if len(member["fields"]) > 1 else {member["fields"][0]: value})
            image_member = row.get("image_format")
            if image_member in raw:
                row["image"] = raw[image_member]
            yield row

    def checked_rows(
        self, handle: BinaryIO, layout: DatasetLayout, keep_images: bool, report: ReportRow,
    ) -> Iterator[CheckedRows]:
        """Samples of a unit, member by member; a sample whose members are wrong is
        reported and left out of the value checks."""
        members = layout.webdataset_members(keep_images)
        batch: list[dict[str, Any]] = []
        try:
            for key, raw in _samples(handle, regular_only=True):
                batch.append(_checked_sample(key, raw, members, layout, report))
                if len(batch) >= CHECKED_ROWS:
                    yield _checked_rows(batch, layout)
                    batch = []
        except tarfile.TarError as error:
            raise UnusableFile([f"not a readable tar ({error_line(error)})"]) from None
        if batch:
            yield _checked_rows(batch, layout)


def _checked_sample(
    key: str, raw: dict[str, bytes], members: list[dict[str, Any]], layout: DatasetLayout, report: ReportRow
) -> dict[str, Any]:
    """One sample's values; {"key", "bad": True} when a member is missing, extra or malformed."""
    row: dict[str, Any] = {"key": key, "bad": False, "image": None}
    arrays = layout.stored_arrays()
    expected = set()
    for member in members:
        suffix = member["suffix"]
        if member["encoding"] == "bytes":
            if "image_format" not in row:  # the json member is bad (reported): the image member cannot be named
                expected.update(set(raw) - {m["suffix"] for m in members})
                continue
            suffix = row["image_format"]
        expected.add(suffix)
        if suffix not in raw:
            report(f"member .{member['suffix']} missing", key)
            row["bad"] = True
            continue
        try:
            value = decode_member(member, raw[suffix])
        except ValueError as error:
            report(f"member .{suffix} cannot be decoded ({type(error).__name__})", key)
            row["bad"] = True
            continue
        if member["encoding"] == "npy":
            name = member["fields"][0]
            want = arrays[name]
            if (value.dtype, value.shape) != want:
                report(f"member .{suffix} is {value.dtype} {list(value.shape)}, "
                       f"the schema says {want[0]} {list(want[1])}", key)
                row["bad"] = True
            row[name] = value
        elif member["encoding"] == "json":
            if len(member["fields"]) == 1:
                value = {member["fields"][0]: value}
            elif not isinstance(value, dict) or set(value) != set(member["fields"]):
                report(f"member .{suffix} does not hold exactly {', '.join(member['fields'])}", key)
                row["bad"] = True
                continue
            row.update(value)
        else:
            row["image"] = value
    for suffix in sorted(set(raw) - expected):
        report(f"unexpected member .{suffix}", key)
    if not row["bad"] and row.get("key") != key:
        report("json key differs from the member names' key", key)
    return row


def _checked_rows(samples: list[dict[str, Any]], layout: DatasetLayout) -> CheckedRows:
    good = [s for s in samples if not s["bad"]]
    return CheckedRows.from_rows(good, layout, unchecked_keys=[s["key"] for s in samples if s["bad"]])
