"""The records a dataset is made of, in plain Python: no torch, torchvision, Ray or model library.

They sit at the bottom of the layers so that everything that only reads or checks a dataset
(`open_dataset`, `dr-gen inspect`, `dr-gen validate`) and the teachers alike can name them:

- `ViewParams`: one augmented view's parameters, as stored in the "aug" column (the
  renderer that turns them into pixels is `views.augment`).
- `TeacherCard`, `CaptionerCard`: how a model's embeddings or captions were produced, as
  the manifest records them (built by the adapters in `teachers/`).
- `UnitStats` (the `UNIT.stats.json` completion marker), `FileRecord` (one committed file)
  and `FailureRecord` (one line of `UNIT.failures.jsonl`), `Totals` (the manifest's totals) and
  `ViewRecord` (a stored `ViewParams`): JSON objects, typed as TypedDicts so
  they stay the very dicts that are written and read, byte for byte.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NotRequired, Sequence, TypedDict

from schemas import load_spec

RAND_AUGMENT_OPS: tuple[str, ...] = tuple(op["name"] for op in load_spec()["rand_augment_ops"])
"""RandAugment's ops in schema order: a stored op is an index into this tuple."""

VIEW_RESIZE = "bicubic"
"""How views whose size differs from a model's input size are resized (antialiased, in
float, clamped to [0, 255]); recorded in every card so a replay can do the same."""


class RandAugmentOpRecord(TypedDict):
    op: int
    magnitude: float


class ViewRecord(TypedDict):
    """One view's parameters as stored: an element of the "aug" column, an entry of aug.json."""

    crop: list[int]
    flip: bool
    rand_augment: list[RandAugmentOpRecord] | None
    erase: list[int] | None


@dataclass(frozen=True)
class ViewParams:
    """Everything needed to replay one view from the original image.

    crop: (top, left, height, width) in original pixels. flip: horizontal flip
    of the resized crop. rand_augment: (op index into RAND_AUGMENT_OPS, signed
    magnitude as applied) pairs, None when RandAugment was skipped. erase:
    (top, left, height, width) in view pixels set to 0, None when not erased.
    """

    crop: tuple[int, int, int, int]
    flip: bool
    rand_augment: tuple[tuple[int, float], ...] | None
    erase: tuple[int, int, int, int] | None

    def __post_init__(self) -> None:
        """Reject malformed parameters early: they usually come from a file."""
        _check_box(self.crop, "crop")
        if self.erase is not None:
            _check_box(self.erase, "erase")
        for op, _ in self.rand_augment or ():
            if not 0 <= op < len(RAND_AUGMENT_OPS):
                raise ValueError(f"RandAugment op index {op} outside 0..{len(RAND_AUGMENT_OPS) - 1}")

    def to_record(self) -> ViewRecord:
        """The value of one element of the schema's "aug" list<struct> column."""
        return {
            "crop": list(self.crop),
            "flip": self.flip,
            "rand_augment": None
            if self.rand_augment is None
            else [{"op": op, "magnitude": magnitude} for op, magnitude in self.rand_augment],
            "erase": None if self.erase is None else list(self.erase),
        }

    @classmethod
    def from_record(cls, record: ViewRecord) -> ViewParams:
        """Inverse of to_record; also takes pyarrow's to_pylist output and parsed aug.json."""
        rand_augment = record["rand_augment"]
        erase = record["erase"]
        return cls(
            crop=_int_box(record["crop"]),
            flip=bool(record["flip"]),
            rand_augment=None
            if rand_augment is None
            else tuple((int(entry["op"]), float(entry["magnitude"])) for entry in rand_augment),
            erase=None if erase is None else _int_box(erase),
        )

    def to_datacompdr(self) -> list[Any]:
        """The public DataCompDR `param_aug` entry. It has no place for flip or erasing:
        an exporter must only use it for jobs where both have p = 0."""
        ops = None if self.rand_augment is None else [[op, magnitude] for op, magnitude in self.rand_augment]
        return [list(self.crop), ops]


def _int_box(values: Sequence[Any]) -> tuple[int, int, int, int]:
    if len(values) != 4:
        raise ValueError(f"a box is [top, left, height, width], got {list(values)}")
    top, left, height, width = (int(v) for v in values)
    return top, left, height, width


def _check_box(box: tuple[int, int, int, int], name: str) -> None:
    if len(box) != 4:
        raise ValueError(f"{name} is (top, left, height, width), got {box}")
    top, left, height, width = box
    if top < 0 or left < 0 or height < 1 or width < 1:
        raise ValueError(f"{name} {box} needs top, left >= 0 and height, width >= 1")


class _Card:
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples become lists), so the dict equals its own JSON round trip."""
        return {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in dataclasses.asdict(self).items()
        }


@dataclass(frozen=True)
class TeacherCard(_Card):
    """How a teacher's embeddings were produced, as written to the manifest."""

    id: str
    spec: str
    kind: str
    model: str
    weights: str  # pretrained tag, file path, hf-hub id, or "random-init:<seed>"
    embedding_dim: int
    input_size: int | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    interpolation: str | None  # the model's own preprocessing interpolation
    view_resize: str  # used when a view's size differs from input_size
    context_length: int | None
    tokenizer: str | None
    logit_scale: float | None
    logit_bias: float | None
    normalized: bool = True
    has_image: bool = True
    has_text: bool = True


@dataclass(frozen=True)
class CaptionerCard(_Card):
    """How a captioner's captions were produced (the sampler is recorded next to it)."""

    id: str
    spec: str
    kind: str
    model: str
    weights: str
    input_size: int | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    interpolation: str | None
    context_length: int | None
    tokenizer: str | None
    decoding: str  # "kv-cache", or "full-recompute" for models whose blocks the cache does not mirror
    view_resize: str = VIEW_RESIZE


class ModelCards(TypedDict):
    """The cards of a job's models in their JSON form (`TeacherCard.to_dict`), in job order: what
    the manifest and an extension.json record, and what a model actor describes (with where it runs)."""

    teachers: list[dict[str, Any]]
    captioners: list[dict[str, Any]]
    node_id: NotRequired[str | None]
    device: NotRequired[str]


class FileRecord(TypedDict):
    """One committed file: its path relative to the dataset root, size and sha256 (hex)."""

    path: str
    bytes: int
    sha256: str


class FailureRecord(TypedDict):
    """One rejected input sample (a line of UNIT.failures.jsonl): a reason of the schema's list."""

    key: str
    reason: str
    detail: str


class Totals(TypedDict):
    """The manifest's "totals": sums over the committed units' stats markers."""

    units_planned: int
    units_done: int
    input_samples: int
    samples: int
    failures: int
    bytes: int
    failures_by_reason: dict[str, int]


class UnitStats(TypedDict):
    """A unit's completion marker (UNIT.stats.json), written last: the unit is committed when it
    exists. The manifest's "units" are these markers (input redacted), in plan order.

    A data unit records its input, config hash and failures by reason; a sidecar unit (`--extend`)
    its extension id instead. `storage_retries` is added to the stats a unit task returns, never
    to the marker.
    """

    id: str
    node_id: str | None
    input_samples: int
    samples: int
    failures: int
    files: dict[str, FileRecord]
    seconds: float
    seconds_by_stage: dict[str, float]
    input: NotRequired[str]
    config_hash: NotRequired[str]
    failures_by_reason: NotRequired[dict[str, int]]
    extension: NotRequired[str]
    storage_retries: NotRequired[int]
