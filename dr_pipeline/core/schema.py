"""Schema v1 as code: turns the JSON definitions in `schemas/v1/` into Arrow schemas,
webdataset member names and checks, for one dataset's teachers and captioners.

`DatasetLayout` is everything a writer or reader needs to know about the columns
of one dataset; the manifest stores it, so readers never guess from which keys
happen to exist.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import jsonschema
import numpy as np
import pyarrow as pa

import schemas
from dr_pipeline.core.errors import DatasetError

SCHEMA_VERSION = schemas.load_spec()["version"]
KEY_PATTERN = re.compile(schemas.load_spec()["key_pattern"])
FAILURE_REASONS: dict[str, str] = schemas.load_spec()["failure_reasons"]

_PRIMITIVES = {
    "string": pa.string(),
    "binary": pa.binary(),
    "bool": pa.bool_(),
    "int8": pa.int8(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "uint16": pa.uint16(),
    "float16": pa.float16(),
    "float32": pa.float32(),
}


def safe_key(source_key: str) -> str:
    """The key itself when it is safe as a tar member prefix, else a deterministic mapping.

    The mapping keeps a readable prefix and adds a hash of the original, so two
    different source keys never collide after sanitising.
    """
    if KEY_PATTERN.match(source_key):
        return source_key
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", source_key).strip("_")[:80]
    digest = hashlib.sha256(source_key.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{readable}-{digest}" if readable else f"k-{digest}"


def sample_uid(input_uid: str | None, source_key: str, image_sha256: str) -> str:
    """The one uid rule, whatever the input format: the input's own uid field when it has one
    (DataComp's 32-hex uid), else the first 32 hex digits of sha256(source key, newline, image
    sha256): stable across reruns and shardings, distinct for distinct images under one key."""
    if input_uid:
        return input_uid
    return hashlib.sha256(f"{source_key}\n{image_sha256}".encode("utf-8", "surrogatepass")).hexdigest()[:32]


def check_schema_version(version: str) -> None:
    """Refuse a dataset whose schema major version this dr-gen does not know."""
    major = str(version).split(".")[0]
    if major != SCHEMA_VERSION.split(".")[0]:
        raise DatasetError(
            f"dataset schema version {version} is not supported by this dr-gen "
            f"(it reads schema {SCHEMA_VERSION.split('.')[0]}.x); upgrade dr-gen to read it"
        )


def validate_manifest(manifest: dict[str, Any]) -> None:
    """Check a dataset.json against schemas/v1/manifest.schema.json."""
    check_schema_version(manifest.get("schema_version", "?"))
    try:
        jsonschema.validate(manifest, schemas.load_spec(name="manifest.schema.json"))
    except jsonschema.ValidationError as error:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise DatasetError(f"dataset.json: {where}: {error.message}") from None


def _fill(template: str, variables: dict[str, Any]) -> str:
    return template.format(**variables)


def _arrow_type(spec: Any, variables: dict[str, Any]) -> pa.DataType:
    if isinstance(spec, str):
        return _PRIMITIVES[_fill(spec, variables)]
    if "list" in spec:
        return pa.list_(_arrow_type(spec["list"], variables))
    if "fixed_size_list" in spec:
        size = int(_fill(str(spec["size"]), variables))
        return pa.list_(_arrow_type(spec["fixed_size_list"], variables), size)
    if "struct" in spec:
        return pa.struct([arrow_field(f, variables) for f in spec["struct"]])
    raise ValueError(f"unknown type spec in schema: {spec!r}")


def arrow_field(spec: dict[str, Any], variables: dict[str, Any]) -> pa.Field:
    return pa.field(
        _fill(spec["name"], variables),
        _arrow_type(spec["type"], variables),
        nullable=spec.get("nullable", True),
    )


@dataclass(frozen=True)
class TeacherColumns:
    id: str
    dim: int
    has_image: bool = True
    has_text: bool = True

    @property
    def image_column(self) -> str | None:
        return f"image_emb_{self.id}" if self.has_image else None

    @property
    def text_column(self) -> str | None:
        return f"text_emb_{self.id}" if self.has_text else None


@dataclass(frozen=True)
class CaptionerColumns:
    id: str
    num_captions: int

    @property
    def column(self) -> str:
        return f"captions_{self.id}"


@dataclass(frozen=True)
class DatasetLayout:
    """Columns of one dataset: K views, teachers (in order), captioners (in order), dtype."""

    num_views: int
    embedding_dtype: str
    teachers: tuple[TeacherColumns, ...]
    captioners: tuple[CaptionerColumns, ...] = field(default_factory=tuple)
    uid_column: bool = True  # False for datasets written before schema 1.2

    def _has(self, field_name: str) -> bool:
        return self.uid_column or field_name != "uid"

    @property
    def num_texts(self) -> int:
        """Rows of every text embedding: the real caption, then each synthetic caption."""
        return 1 + sum(c.num_captions for c in self.captioners)

    @property
    def storage_numpy_dtype(self) -> np.dtype:
        return np.dtype(schemas.load_spec()["embedding_dtypes"][self.embedding_dtype]["numpy"])

    @property
    def quantized(self) -> bool:
        """Whether embeddings are stored with a per-row scale column (int8)."""
        return is_quantized(self.embedding_dtype)

    def scale_columns(self) -> dict[str, str]:
        """Embedding column -> its scale column, for a quantised dtype (else empty)."""
        return {name: scale_column(name) for name in self.embedding_shapes()} if self.quantized else {}

    def stored_arrays(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Column name -> (numpy dtype, shape per sample) of every array column: embeddings
        [rows, D] in the storage dtype and, when quantised, their scales [rows] float32."""
        arrays: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
            name: (self.storage_numpy_dtype, shape) for name, shape in self.embedding_shapes().items()
        }
        for name, scale in self.scale_columns().items():
            arrays[scale] = (np.dtype(np.float32), arrays[name][1][:1])
        return arrays

    def text_sources(self) -> list[dict[str, Any]]:
        """What each row of a text embedding is: the real caption, then (captioner, index)."""
        rows: list[dict[str, Any]] = [{"source": "text"}]
        for captioner in self.captioners:
            rows += [{"source": captioner.column, "index": i} for i in range(captioner.num_captions)]
        return rows

    def arrow_schema(self) -> pa.Schema:
        spec = schemas.load_spec()
        base = {"num_views": self.num_views, "dtype": spec["embedding_dtypes"][self.embedding_dtype]["arrow"]}
        fields = [arrow_field(f, base) for f in spec["fields"] if self._has(f["name"])]
        for teacher in self.teachers:
            variables = {**base, "id": teacher.id, "dim": teacher.dim, "num_texts": self.num_texts}
            for template in spec["teacher_fields"]:
                side = template["role"].removesuffix("_scale")
                wanted = teacher.has_image if side == "image" else teacher.has_text
                if wanted and (self.quantized or not template.get("scaled_dtypes_only")):
                    fields.append(arrow_field(template, variables))
        for captioner in self.captioners:
            variables = {**base, "id": captioner.id, "num_captions": captioner.num_captions}
            fields += [arrow_field(t, variables) for t in spec["captioner_fields"]]
        metadata = {"dr_gen.schema_version": SCHEMA_VERSION, "dr_gen.embedding_dtype": self.embedding_dtype}
        return pa.schema(fields, metadata=metadata)

    def embedding_shapes(self) -> dict[str, tuple[int, int]]:
        """Column name -> [rows, D] of every embedding column."""
        shapes: dict[str, tuple[int, int]] = {}
        for teacher in self.teachers:
            if teacher.image_column:
                shapes[teacher.image_column] = (self.num_views, teacher.dim)
            if teacher.text_column:
                shapes[teacher.text_column] = (self.num_texts, teacher.dim)
        return shapes

    def webdataset_members(self, keep_images: bool) -> list[dict[str, Any]]:
        """Member suffixes of one sample, with their columns and encoding, for this dataset's ids."""
        ids_per = {
            "sample": [None],
            "teacher_image": [t.id for t in self.teachers if t.has_image],
            "teacher_text": [t.id for t in self.teachers if t.has_text],
            "teacher_image_scale": [t.id for t in self.teachers if t.has_image and self.quantized],
            "teacher_text_scale": [t.id for t in self.teachers if t.has_text and self.quantized],
            "captioner": [c.id for c in self.captioners],
            "kept_image": [None] if keep_images else [],
        }
        members = []
        for member in schemas.load_spec()["webdataset"]["members"]:
            for id_ in ids_per[member["per"]]:
                variables = {"id": id_, "image_format": "{image_format}"}
                members.append({
                    "suffix": _fill(member["suffix"], variables),
                    "fields": [_fill(f, variables) for f in member["fields"] if self._has(f)],
                    "encoding": member["encoding"],
                })
        return members

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as stored in the manifest's "layout"."""
        return {
            "num_views": self.num_views,
            "embedding_dtype": self.embedding_dtype,
            "teachers": [asdict(t) for t in self.teachers],
            "captioners": [asdict(c) for c in self.captioners],
            "uid_column": self.uid_column,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DatasetLayout":
        return cls(
            num_views=data["num_views"],
            embedding_dtype=data["embedding_dtype"],
            teachers=tuple(TeacherColumns(**t) for t in data["teachers"]),
            captioners=tuple(CaptionerColumns(**c) for c in data["captioners"]),
            uid_column=data.get("uid_column", False),
        )


def is_quantized(embedding_dtype: str) -> bool:
    return "scale" in schemas.load_spec()["embedding_dtypes"][embedding_dtype]


def scale_column(embedding_column: str) -> str:
    """The column holding the per-row scales of a quantised embedding column."""
    return f"{embedding_column}_scale"


def transfer_dtype(embedding_dtype: str) -> str:
    """The dtype embeddings leave the model actor in: the storage dtype, or float32 for a
    quantised one (quantised where the unit is written, `storage_columns`)."""
    return "float32" if is_quantized(embedding_dtype) else embedding_dtype


def quantize_int8(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows [..., D] -> (int8 [..., D], float32 scale [...]): symmetric, each row's largest
    magnitude at 127, and the scale chosen so stored * scale keeps the row's L2 norm."""
    values = np.asarray(values, dtype=np.float32)
    peak = np.abs(values).max(axis=-1, keepdims=True)
    stored = np.rint(values * (127.0 / np.where(peak > 0, peak, 1.0))).astype(np.int8)
    stored_norm = np.linalg.norm(stored.astype(np.float32), axis=-1)
    norm = np.linalg.norm(values, axis=-1)
    scale = np.where(stored_norm > 0, norm / np.where(stored_norm > 0, stored_norm, 1.0), 0.0)
    return stored, scale.astype(np.float32)


def storage_columns(column: str, embeddings: np.ndarray, embedding_dtype: str) -> dict[str, np.ndarray]:
    """The stored columns of one embedding column's values (as they left the actor,
    `transfer_dtype`): the column itself, and its scale column when the dtype is quantised."""
    if not is_quantized(embedding_dtype):
        return {column: embeddings}
    stored, scale = quantize_int8(embeddings)
    return {column: stored, scale_column(column): scale}


def from_storage(stored: np.ndarray, embedding_dtype: str, scale: np.ndarray | None = None) -> np.ndarray:
    """Stored embeddings -> float32 (bfloat16 bits are widened exactly; int8 times its row scales)."""
    if embedding_dtype == "bfloat16":
        return (np.asarray(stored, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    if is_quantized(embedding_dtype):
        if scale is None:
            raise DatasetError(f"{embedding_dtype} embeddings need their scale column to be read")
        return np.asarray(stored, dtype=np.float32) * np.asarray(scale, dtype=np.float32)[..., None]
    return np.asarray(stored, dtype=np.float32)
