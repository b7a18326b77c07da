"""Sidecars: columns added to an existing dataset, stored beside its units and joined by key.

`dr-gen run JOB --extend OUT` (extend.py) writes one sidecar file per unit under
OUT/sidecars/<extension>/: a `key` column and the new columns, one row per row of the unit's
data file, in the same order. dataset.json lists the extensions in the order they were made,
each as a `SidecarLayout`; a column either adds a new column or appends rows to an existing
teacher's text embeddings (its embeddings of new captions), so every text_emb column keeps
following the manifest's text_rows. The layout and its meaning are data in
schemas/v1/schema.json ("sidecars"); `reader.ReinforcedDataset` returns the joined rows.
"""

from __future__ import annotations

import posixpath
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

import schemas
from dr_pipeline.core.errors import DatasetError
from dr_pipeline.dataset.formats import format_for
from dr_pipeline.core.schema import SCHEMA_VERSION, DatasetLayout, arrow_field, is_quantized

_SPEC = schemas.load_spec()
_JOINS = frozenset(_SPEC["sidecars"]["joins"])
_WEBDATASET_PER_ROLE = {"image": "teacher_image", "text": "teacher_text", "captions": "captioner",
                        "image_scale": "teacher_image_scale", "text_scale": "teacher_text_scale"}
_COLUMN_ROLES = ("image", "text", "captions")


def sidecar_folder(extension: str) -> str:
    return _SPEC["sidecars"]["folder"].format(extension=extension)


def _template(role: str) -> dict[str, Any]:
    """The schema template of a column role (teacher_fields by role, or the captions field)."""
    templates = _SPEC["teacher_fields"] + _SPEC["captioner_fields"]
    return next(template for template in templates if template["role"] == role)


@dataclass(frozen=True)
class SidecarColumn:
    id: str  # the teacher or captioner the column belongs to
    role: str  # "image", "text" or "captions": which schema template it instantiates
    join: str  # "add" (a new column) or "append_rows" (rows appended to an existing text_emb column)
    rows: int  # K views, text rows or S captions per sample
    dim: int | None = None  # embedding dimension; None for captions

    def __post_init__(self) -> None:
        if self.join not in _JOINS or self.role not in _COLUMN_ROLES:
            raise ValueError(f"unknown sidecar column role {self.role!r} or join {self.join!r}")

    @property
    def name(self) -> str:
        return _template(self.role)["name"].format(id=self.id)

    def stored_roles(self, embedding_dtype: str) -> tuple[str, ...]:
        """The schema roles this column is stored as: itself, and its scales when quantised."""
        return (self.role, f"{self.role}_scale") if self.dim and is_quantized(embedding_dtype) else (self.role,)

    def stored_names(self, embedding_dtype: str) -> list[str]:
        return [_template(role)["name"].format(id=self.id) for role in self.stored_roles(embedding_dtype)]

    def arrow_fields(self, embedding_dtype: str) -> list[pa.Field]:
        variables = {"id": self.id, "dim": self.dim, "dtype": _SPEC["embedding_dtypes"][embedding_dtype]["arrow"],
                     "num_views": self.rows, "num_texts": self.rows, "num_captions": self.rows}
        return [arrow_field(_template(role), variables) for role in self.stored_roles(embedding_dtype)]


@dataclass(frozen=True)
class SidecarLayout:
    """The columns one extension added, as the manifest's "extensions" entries record them."""

    extension: str
    embedding_dtype: str
    columns: tuple[SidecarColumn, ...]

    def data_file(self, unit_id: str, output_format: str) -> str:
        return posixpath.join(sidecar_folder(self.extension), f"{unit_id}.{format_for(output_format).suffix}")

    def stats_file(self, unit_id: str) -> str:
        """Written last: its presence marks the sidecar unit as committed."""
        return posixpath.join(sidecar_folder(self.extension), f"{unit_id}.stats.json")

    @property
    def extension_file(self) -> str:
        return posixpath.join(sidecar_folder(self.extension), "extension.json")

    def arrow_schema(self) -> pa.Schema:
        fields = [arrow_field(f, {}) for f in _SPEC["sidecars"]["fields"]]
        fields += [field for column in self.columns for field in column.arrow_fields(self.embedding_dtype)]
        metadata = {"dr_gen.schema_version": SCHEMA_VERSION, "dr_gen.sidecar": self.extension}
        return pa.schema(fields, metadata=metadata)

    def webdataset_members(self, keep_images: bool = False) -> list[dict[str, Any]]:
        """Member suffixes of one sample, as the dataset's own members name these columns."""
        members = {member["per"]: member for member in _SPEC["webdataset"]["members"]}
        result = []
        for column in self.columns:
            for role in column.stored_roles(self.embedding_dtype):
                member = members[_WEBDATASET_PER_ROLE[role]]
                result.append({
                    "suffix": member["suffix"].format(id=column.id),
                    "fields": [field.format(id=column.id) for field in member["fields"]],
                    "encoding": member["encoding"],
                })
        return result

    def join(self, row: dict[str, Any], sidecar_row: dict[str, Any], where: str) -> None:
        """Add this sidecar's values for one row to it (embeddings still as stored)."""
        if sidecar_row["key"] != row["key"]:
            raise DatasetError(f"{where}: sidecar row {sidecar_row['key']!r} does not align with row {row['key']!r}")
        for column in self.columns:
            for name in column.stored_names(self.embedding_dtype):
                value = sidecar_row[name]
                row[name] = np.concatenate([row[name], value]) if column.join == "append_rows" else value

    def to_dict(self) -> dict[str, Any]:
        return {"extension": self.extension, "embedding_dtype": self.embedding_dtype,
                "columns": [asdict(column) for column in self.columns]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SidecarLayout":
        columns = tuple(SidecarColumn(**column) for column in data["columns"])
        return cls(data["extension"], data["embedding_dtype"], columns)


def base_layout(layout: DatasetLayout, sidecars: list[SidecarLayout]) -> DatasetLayout:
    """What the units' own data files hold: `layout` (the manifest's, extensions included)
    without the teachers and captioners the sidecars added. Text embeddings of the base
    teachers then have the base text rows, as their appended rows live in sidecars too."""
    added = {(column.role, column.id) for sidecar in sidecars for column in sidecar.columns if column.join == "add"}
    teachers = tuple(t for t in layout.teachers if ("image", t.id) not in added and ("text", t.id) not in added)
    captioners = tuple(c for c in layout.captioners if ("captions", c.id) not in added)
    return replace(layout, teachers=teachers, captioners=captioners)
