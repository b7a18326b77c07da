"""A unit's counts and its failures file: input = samples + failures, every failure recorded by reason."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from dr_pipeline.core.schema import FAILURE_REASONS
from dr_pipeline.core.storage import Location


def count_problems(unit: dict[str, Any]) -> list[str]:
    """The unit entry's counts against each other."""
    where = f"unit {unit['id']}"
    problems = []
    if unit["input_samples"] != unit["samples"] + unit["failures"]:
        problems.append(
            f"{where}: input_samples {unit['input_samples']} != samples {unit['samples']} "
            f"+ failures {unit['failures']}"
        )
    if sum(unit["failures_by_reason"].values()) != unit["failures"]:
        problems.append(
            f"{where}: failures_by_reason sums to {sum(unit['failures_by_reason'].values())}, "
            f"failures is {unit['failures']}"
        )
    return problems


def failures_problems(out: Location, unit: dict[str, Any]) -> list[str]:
    """The failures file against the unit entry: JSON lines of known reasons, as many as recorded."""
    where = f"unit {unit['id']}: {unit['files']['failures']['path']}"
    try:
        text = out.read_bytes(unit["files"]["failures"]["path"]).decode()
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (UnicodeDecodeError, ValueError) as error:
        return [f"{where}: not JSON lines ({error})"]
    problems = []
    if any(not isinstance(r, dict) or not {"key", "reason", "detail"} <= r.keys() for r in records):
        problems.append(f"{where}: a record lacks key, reason or detail")
        return problems
    unknown = sorted({r["reason"] for r in records} - FAILURE_REASONS.keys())
    if unknown:
        problems.append(f"{where}: unknown failure reasons {', '.join(unknown)}")
    if len(records) != unit["failures"]:
        problems.append(f"{where}: {len(records)} records, the manifest says {unit['failures']} failures")
    by_reason = dict(sorted(Counter(r["reason"] for r in records).items()))
    if by_reason != unit["failures_by_reason"]:
        problems.append(f"{where}: failures by reason {by_reason}, the manifest says {unit['failures_by_reason']}")
    return problems
