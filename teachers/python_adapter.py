"""The `python:` kind: any class, named `python:package.module:ClassName`, as a teacher or captioner.

The class is called as `ClassName(config, device, precision)` with the job's config entry
(its `options` carry the class's own settings), the torch device and the requested precision
("auto", "fp32", "bf16" or "fp16"; `teachers.base.resolve_precision` turns it into what to
run at). The object it returns follows `teachers.base.Teacher` (a TeacherCard, encode_image,
encode_text) or `teachers.base.Captioner` (a CaptionerCard, caption), with the config entry's
id and spec in its card. The module must be importable where the model actors run (installed,
or on PYTHONPATH). See examples/timm_teacher.py.
"""

from __future__ import annotations

import importlib
import re
from typing import TYPE_CHECKING, Any

from dr_pipeline.core.config import CaptionerConfig, TeacherConfig
from dr_pipeline.core.errors import ConfigError
from dr_pipeline.core.records import CaptionerCard, TeacherCard
from teachers.registry import Role

if TYPE_CHECKING:  # the spec check (this module) imports neither torch nor the model libraries
    import torch

    from teachers.base import Captioner, Teacher

_TARGET = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def _target(rest: str) -> tuple[Any | None, str | None]:
    """(the named class or callable, None), or (None, what is wrong with the name)."""
    if not _TARGET.fullmatch(rest):
        return None, f"expected python:package.module:ClassName, got python:{rest}"
    module_name, _, attribute = rest.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        return None, f"cannot import {module_name} ({error}); is it installed or on PYTHONPATH?"
    target = getattr(module, attribute, None)
    if not callable(target):
        return None, f"{module_name} has no class or function {attribute!r}"
    return target, None


def spec_problem(rest: str, role: Role) -> str | None:
    """Imports the module (user code, but no model) so a misspelt name fails before any work."""
    return _target(rest)[1]


def _build(rest: str, config: TeacherConfig | CaptionerConfig, device: torch.device, precision: str, card_type):
    target, problem = _target(rest)
    if problem:
        raise ConfigError(f"spec {config.spec!r}: {problem}")
    built = target(config, device, precision)
    card = getattr(built, "card", None)
    if not isinstance(card, card_type):
        raise ConfigError(f"spec {config.spec!r}: {rest} must set .card to a teachers.{card_type.__name__}")
    if (card.id, card.spec) != (config.id, config.spec):
        raise ConfigError(
            f"spec {config.spec!r}: the card says id {card.id!r} and spec {card.spec!r}, "
            f"the config entry {config.id!r} and {config.spec!r}"
        )
    return built


def build_python_teacher(rest: str, config: TeacherConfig, device: torch.device, precision: str) -> Teacher:
    return _build(rest, config, device, precision, TeacherCard)


def build_python_captioner(rest: str, config: CaptionerConfig, device: torch.device, precision: str) -> Captioner:
    return _build(rest, config, device, precision, CaptionerCard)
