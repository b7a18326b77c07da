"""What every check of validate shares: the dataset under check, and problems grouped by message."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dr_pipeline.core.schema import DatasetLayout
from dr_pipeline.core.storage import Location
from dr_pipeline.dataset.formats import format_for
from dr_pipeline.dataset.formats.base import DatasetFormat
from dr_pipeline.dataset.sidecars import SidecarLayout, base_layout

NORM_TOLERANCE = {"float32": 1e-3, "float16": 4e-3, "bfloat16": 2e-2, "int8": 1e-3}
"""How far from 1 a stored L2 norm may be: the rounding of the storage dtype, with margin (int8's
scale keeps each row's norm, so only float32 rounding remains)."""

KEYS_SHOWN = 3


class CheckedDataset:
    """One dataset folder whose manifest passed its JSON Schema, as the checks read it."""

    def __init__(self, out: Location, manifest: dict[str, Any]):
        self.out = out
        self.manifest = manifest
        self.format: DatasetFormat = format_for(manifest["format"])
        self.full_layout = DatasetLayout.from_dict(manifest["layout"])
        self.sidecars = [SidecarLayout.from_dict(entry) for entry in manifest.get("extensions", [])]
        self.layout = base_layout(self.full_layout, self.sidecars)  # what the units' data files hold
        self.keep_images = manifest["config"]["output"].get("keep_images", False)
        self.normalized = {
            column: entry["card"].get("normalized", True)
            for entry, teacher in zip(manifest["teachers"], self.full_layout.teachers)
            for column in (teacher.image_column, teacher.text_column)
            if column
        }


@dataclass
class UnitResult:
    problems: list[str] = field(default_factory=list)
    key_hashes: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    keys: list[str] | None = None  # of the data file, in order; None when it could not be read
    rows: int = 0
    files: int = 0


class RowProblems:
    """Problems of single rows, grouped by message so a bad column is one line, not thousands."""

    def __init__(self) -> None:
        self.keys: dict[str, list[str]] = defaultdict(list)

    def add(self, message: str, key: str) -> None:
        self.keys[message].append(key)

    def lines(self, where: str) -> list[str]:
        lines = []
        for message, keys in self.keys.items():
            shown = ", ".join(keys[:KEYS_SHOWN]) + (", ..." if len(keys) > KEYS_SHOWN else "")
            lines.append(f"{where}: {message} ({len(keys)} row{'s' if len(keys) > 1 else ''}: {shown})")
        return lines
