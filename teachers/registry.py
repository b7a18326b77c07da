"""Teachers and captioners named by a spec string `KIND:REST`, built by the adapter of KIND.

The built-in kinds are declared in teachers/builtin_kinds.py, registered on first use: their
offline checks and option lists import no adapter, so checking a job's specs imports neither
torch nor any model library (the run starts Ray only after them); each adapter module is
imported when a model of its kind is built. Adding a kind means writing its adapter and
declaring it there; a plug-in kind calls `register_kind`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

from dr_pipeline.core.config import CaptionerConfig, TeacherConfig
from dr_pipeline.core.errors import ConfigError
from teachers.flops import ModelCost

if TYPE_CHECKING:
    import torch

    from teachers.base import Captioner, Teacher

Role = Literal["teacher", "captioner"]


@dataclass(frozen=True)
class TeacherKind:
    """One spec prefix: how to check a spec's REST offline and how to build from it.

    `spec_problem(rest, role)` returns a one-line problem, or None when the spec looks usable;
    it must load no model and touch no network. The builders receive REST, the job's config
    entry, the device and the requested precision; a kind without a captioner builder
    cannot caption. `estimate_cost(rest, role)`, when given, returns per-item forward
    FLOPs from the architecture alone (no weights), for `dr-gen plan`. `options` names the
    keys a config entry's `options` may hold, with what each does (None: any keys, passed on
    as they are).
    """

    name: str
    description: str
    example: str
    spec_problem: Callable[[str, Role], str | None]
    build_teacher: Callable[[str, TeacherConfig, torch.device, str], Teacher]
    build_captioner: Callable[[str, CaptionerConfig, torch.device, str], Captioner] | None = None
    estimate_cost: Callable[[str, Role], ModelCost | None] | None = None
    options: Mapping[str, str] | None = None
    captioner_example: str | None = None

    @property
    def roles(self) -> list[Role]:
        return ["teacher", "captioner"] if self.build_captioner is not None else ["teacher"]


_KINDS: dict[str, TeacherKind] = {}
_builtins_loaded = False


def register_kind(kind: TeacherKind) -> None:
    if kind.name in _KINDS:
        raise ValueError(f"teacher kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind


def _kinds() -> dict[str, TeacherKind]:
    global _builtins_loaded
    if not _builtins_loaded:
        from teachers.builtin_kinds import BUILTIN_KINDS  # noqa: PLC0415 - it imports this module

        for kind in BUILTIN_KINDS:
            register_kind(kind)
        _builtins_loaded = True
    return _KINDS


def _kind_of(spec: str, role: Role) -> tuple[TeacherKind, str]:
    """The kind of `spec` and its REST; ConfigError when no kind can take it in this role."""
    if not spec.strip():
        raise ConfigError(f"empty {role} spec: expected KIND:NAME, e.g. open_clip:ViT-B-32/openai")
    kind_name, colon, rest = spec.partition(":")
    kinds = _kinds()
    if not colon:
        raise ConfigError(f"{role} spec {spec!r}: expected KIND:NAME, e.g. open_clip:{spec}")
    if kind_name not in kinds:
        raise ConfigError(f"{role} spec {spec!r}: unknown kind {kind_name!r} (known: {', '.join(sorted(kinds))})")
    kind = kinds[kind_name]
    if role not in kind.roles:
        raise ConfigError(f"{role} spec {spec!r}: kind {kind_name!r} cannot be a {role}")
    return kind, rest


def _resolve(spec: str, role: Role, options: Mapping[str, Any] | None = None) -> tuple[TeacherKind, str]:
    """The kind of `spec` and its REST, after the offline checks; ConfigError on any problem."""
    kind, rest = _kind_of(spec, role)
    problem = kind.spec_problem(rest, role)
    if problem:
        raise ConfigError(f"{role} spec {spec!r}: {problem}")
    unknown = sorted(set(options or {}) - set(kind.options)) if kind.options is not None else []
    if unknown:
        known = ", ".join(sorted(kind.options or {})) or "none"
        raise ConfigError(
            f"{role} spec {spec!r}: unknown option {unknown[0]!r} for kind {kind.name!r} (known: {known})"
        )
    return kind, rest


def check_spec(spec: str, role: Role, options: Mapping[str, Any] | None = None) -> None:
    """Fail fast on a spec that cannot work, with one line; loads no model, uses no network."""
    _resolve(spec, role, options)


def build_teacher(config: TeacherConfig, device: str | torch.device = "cpu", precision: str = "fp32") -> Teacher:
    import torch  # noqa: PLC0415 - only building needs it: checking specs stays free of torch

    kind, rest = _resolve(config.spec, "teacher", config.options)
    return kind.build_teacher(rest, config, torch.device(device), precision)


def build_captioner(
    config: CaptionerConfig, device: str | torch.device = "cpu", precision: str = "fp32"
) -> Captioner:
    import torch  # noqa: PLC0415 - only building needs it: checking specs stays free of torch

    kind, rest = _resolve(config.spec, "captioner", config.options)
    assert kind.build_captioner is not None  # _resolve checked the role
    return kind.build_captioner(rest, config, torch.device(device), precision)


def model_cost(spec: str, role: Role) -> ModelCost | None:
    """Per-item cost of the model a spec names, from its architecture; None when its kind cannot tell.

    The spec's own checks are not run: a weights file missing on the planning machine does not
    change what the model costs."""
    kind, rest = _kind_of(spec, role)
    return kind.estimate_cost(rest, role) if kind.estimate_cost is not None else None


def teacher_kinds() -> list[dict]:
    """The known kinds, for the `dr-gen teachers` listing."""
    return [
        {
            "kind": kind.name,
            "roles": kind.roles,
            "example": kind.example,
            "captioner_example": kind.captioner_example,
            "description": kind.description,
            "options": dict(kind.options) if kind.options is not None else None,
        }
        for kind in _kinds().values()
    ]
