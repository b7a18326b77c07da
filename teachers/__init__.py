"""Teacher and captioner adapters, built from spec strings by a registry (see registry.py).

What teachers use of dr_pipeline is a small, stable part of its core, and nothing else (a test,
tests/test_layers.py, holds it to that; nothing in dr_pipeline.core imports teachers):

- `dr_pipeline.core.config`: the job's teacher, captioner, sampler and postprocess settings;
- `dr_pipeline.core.errors`: `ConfigError`, and `error_line` to quote a library's error;
- `dr_pipeline.core.records`: the cards (`TeacherCard`, `CaptionerCard`) and `VIEW_RESIZE`;
- `dr_pipeline.core.seeding`: `derive_seed` (seeded random-init weights);
- `dr_pipeline.core.storage`: `redact_url` (weights URLs in messages);
- `dr_pipeline.core.accelerator`: `Acceleration` (channels-last, torch.compile).

A plugin (the `python:` kind, or a kind registered with `register_kind`) needs only this
package's names below and those core modules.
"""

from typing import Any

from dr_pipeline.core.records import VIEW_RESIZE, CaptionerCard, TeacherCard
from teachers.flops import ModelCost
from teachers.registry import build_captioner, build_teacher, check_spec, model_cost, teacher_kinds


def __getattr__(name: str) -> Any:
    """`Teacher` and `Captioner` (teachers/base.py imports torch) on first use: checking a job's
    specs imports this package and must not import torch."""
    if name in ("Captioner", "Teacher"):
        from teachers import base  # noqa: PLC0415

        return getattr(base, name)
    raise AttributeError(f"module 'teachers' has no attribute {name!r}")

__all__ = [
    "VIEW_RESIZE",
    "Captioner",
    "CaptionerCard",
    "ModelCost",
    "Teacher",
    "TeacherCard",
    "build_captioner",
    "build_teacher",
    "check_spec",
    "model_cost",
    "teacher_kinds",
]
