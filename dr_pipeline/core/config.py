"""The job config: a YAML file validated with pydantic before Ray or any model starts.

Every field that changes what is written (seed, input, augmentation, teachers,
captioners, output layout) is part of `JobConfig.output_hash()`; execution
settings (batch sizes, actor counts, precision) are not, so a dataset can be
resumed or extended with other resources.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from dr_pipeline.core.errors import ConfigError
from dr_pipeline.core.storage import url_credentials_problem

Slug = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,47}$")]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Interpolation = Literal["nearest", "bilinear", "bicubic"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _ordered_pair(value: tuple[float, float], name: str) -> tuple[float, float]:
    low, high = value
    if not 0 < low <= high:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {list(value)}")
    return value


class RandomResizedCropConfig(StrictModel):
    size: int = Field(224, ge=8, le=4096)
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: Interpolation = "bicubic"

    @field_validator("scale")
    @classmethod
    def _scale(cls, value: tuple[float, float]) -> tuple[float, float]:
        _ordered_pair(value, "scale")
        if value[1] > 1.0:
            raise ValueError(f"scale must stay within (0, 1], got {list(value)}")
        return value

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, value: tuple[float, float]) -> tuple[float, float]:
        return _ordered_pair(value, "ratio")


class RandAugmentConfig(StrictModel):
    num_ops: int = Field(2, ge=0, le=14)
    magnitude: int = Field(9, ge=0)
    num_magnitude_bins: int = Field(31, ge=2, le=1024)
    p: Probability = 1.0
    interpolation: Literal["nearest", "bilinear"] = "nearest"

    @model_validator(mode="after")
    def _magnitude_in_bins(self) -> "RandAugmentConfig":
        if self.magnitude >= self.num_magnitude_bins:
            raise ValueError(
                f"magnitude {self.magnitude} must be below num_magnitude_bins {self.num_magnitude_bins}"
            )
        return self


class HorizontalFlipConfig(StrictModel):
    p: Probability = 0.0


class RandomErasingConfig(StrictModel):
    p: Probability = 0.0
    scale: tuple[float, float] = (0.02, 0.33)
    ratio: tuple[float, float] = (0.3, 3.3)

    @field_validator("scale", "ratio")
    @classmethod
    def _pairs(cls, value: tuple[float, float], info: Any) -> tuple[float, float]:
        return _ordered_pair(value, info.field_name)


class AugmentationConfig(StrictModel):
    """K views per image, stored as parameters; the order of operations is fixed:
    random resized crop, horizontal flip, RandAugment, random erasing."""

    num_views: int = Field(10, ge=1, le=1024)
    random_resized_crop: RandomResizedCropConfig = RandomResizedCropConfig()
    horizontal_flip: HorizontalFlipConfig = HorizontalFlipConfig()
    rand_augment: RandAugmentConfig = RandAugmentConfig()
    random_erasing: RandomErasingConfig = RandomErasingConfig()


class SamplerConfig(StrictModel):
    """How a captioner samples tokens; seeds come from (run seed, key, caption index)."""

    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = 0.9
    top_k: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(gt=0.0)] = 1.0
    max_length: int = Field(30, ge=2, le=1024)
    min_length: int = Field(5, ge=0)
    repetition_penalty: Annotated[float, Field(gt=0.0)] = 1.0

    @model_validator(mode="after")
    def _lengths(self) -> "SamplerConfig":
        if self.min_length >= self.max_length:
            raise ValueError(f"min_length {self.min_length} must be below max_length {self.max_length}")
        return self


class CaptionPostprocessConfig(StrictModel):
    strip_special_tokens: bool = True
    cut_at_first_period: bool = True


class ModelConfig(StrictModel):
    """A teacher or captioner: a spec string, the options of its kind, how to batch and run it."""

    id: Slug
    spec: str = Field(min_length=3)
    options: dict[str, Any] = Field(default_factory=dict)  # settings of the spec's kind (see `dr-gen teachers`)
    precision: Precision = "auto"

    @field_validator("spec")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        _refuse_credentials(value, "give the weights' storage its credentials through its environment or config files")
        return value


class TeacherConfig(ModelConfig):
    batch_size: int | Literal["auto"] = "auto"  # views per forward; "auto": from free GPU memory (256 on a CPU)

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, value: int | str) -> int | str:
        if value != "auto" and not 1 <= value <= 65536:
            raise ValueError(f"batch_size must be 'auto' or between 1 and 65536, got {value}")
        return value


class CaptionerConfig(ModelConfig):
    num_captions: int = Field(5, ge=1, le=64)
    sampler: SamplerConfig = SamplerConfig()
    postprocess: CaptionPostprocessConfig = CaptionPostprocessConfig()
    batch_size: int = Field(64, ge=1, le=65536)


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")


def _refuse_credentials(text: str, remedy: str) -> None:
    """URLs (also inside a teacher spec) are recorded in the dataset and in logs, so none may
    carry credentials; `remedy` says where they go instead."""
    for url in _URL.findall(text):
        if problem := url_credentials_problem(url):
            raise ValueError(f"{problem}; URLs are recorded in the dataset, so {remedy}")


def _storage_options_remedy(section: str) -> str:
    return (
        f"pass credentials in {section}.storage_options "
        "(e.g. key/secret for s3, token for gcs, headers or params for http)"
    )


class InputConfig(StrictModel):
    """Input shards: an fsspec URL, a brace/glob pattern, or a list of them."""

    urls: str | list[str]
    format: Literal["webdataset", "parquet"] | None = None
    image_column: str | None = None
    text_column: str | None = None
    key_column: str | None = None
    url_column: str | None = None
    max_image_pixels: int = Field(89_478_485, ge=1)
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)

    @field_validator("urls")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        items = [value] if isinstance(value, str) else value
        if not items or any(not item.strip() for item in items):
            raise ValueError("input urls must be a non-empty URL, pattern or list of them")
        for item in items:
            _refuse_credentials(item, _storage_options_remedy("input"))
        return value

    @property
    def url_list(self) -> list[str]:
        return [self.urls] if isinstance(self.urls, str) else list(self.urls)


FORMAT_RECORDED_AS = {"parquet": "arrow"}
"""Output formats recorded under an older name: Parquet was named "arrow" until dr-gen 0.x, and
config hashes and dataset.json (schema v1) record it so, which keeps every existing dataset's hash
(reruns, `--extend`) and manifest. Job files may give either name."""


class OutputConfig(StrictModel):
    url: str = Field(min_length=1)
    format: str = Field("parquet", min_length=1)  # a registered output format (dataset/formats)
    embedding_dtype: Literal["float16", "bfloat16", "float32", "int8"] = "float16"
    keep_images: bool = False
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)

    @field_validator("url")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        _refuse_credentials(value, _storage_options_remedy("output"))
        return value

    @field_validator("format")
    @classmethod
    def _current_name(cls, value: str) -> str:
        return {recorded: name for name, recorded in FORMAT_RECORDED_AS.items()}.get(value, value)

    @field_serializer("format")
    def _recorded_name(self, value: str) -> str:
        return FORMAT_RECORDED_AS.get(value, value)


class ActorRange(StrictModel):
    """An elastic number of model actors: the run starts once `min` are up and adds actors as
    GPUs (on a CPU cluster, CPUs) join, up to `max` (runner.ModelActors)."""

    min: int = Field(ge=1, le=100_000)
    max: int = Field(ge=1, le=100_000)

    @model_validator(mode="after")
    def _ordered(self) -> "ActorRange":
        if self.min > self.max:
            raise ValueError(f"actors: min ({self.min}) must not exceed max ({self.max})")
        return self


class ResourcesConfig(StrictModel):
    actors: int | ActorRange = 1  # a fixed number, or {min: M, max: N}
    gpus_per_actor: float | Literal["auto"] = "auto"
    cpus_per_actor: float = Field(1.0, ge=0.0)
    model_threads: int | None = Field(None, ge=1, le=1024)  # torch CPU threads of a model actor; None: cpus_per_actor
    cpu_workers: int = Field(2, ge=1, le=1_000_000)
    batch_size: int = Field(16, ge=1, le=100_000)
    batches_in_flight: int = Field(2, ge=1, le=64)
    max_batch_retries: int = Field(2, ge=0, le=100)
    # The GPU path (dr_pipeline/core/accelerator.py); speed only, none of these is part of output_hash.
    channels_last: bool = True  # teacher weights and views channels-last on CUDA
    compile: str | None = None  # a torch.compile backend for teacher forwards, e.g. "inductor"; None: eager
    pin_memory: bool = True  # views staged in pinned memory, copied to the GPU without blocking
    render_views_on: Literal["cpu", "accelerator"] = "cpu"  # where views are rendered (augment.py)

    @field_validator("actors", mode="before")
    @classmethod
    def _actors(cls, value: Any) -> Any:
        """One message for either form (pydantic would report the int and the range form both)."""
        usage = "actors must be a whole number from 1 to 100000 or {min: M, max: N} with 1 <= M <= N"
        if isinstance(value, dict):
            whole = all(isinstance(v, int) and not isinstance(v, bool) for v in value.values())
            if set(value) != {"min", "max"} or not whole or not 1 <= value["min"] <= value["max"] <= 100_000:
                raise ValueError(f"{usage}, got {value}")
            return ActorRange(**value)
        whole = isinstance(value, int) and not isinstance(value, bool)
        if not isinstance(value, ActorRange) and not (whole and 1 <= value <= 100_000):
            raise ValueError(f"{usage}, got {value!r}")
        return value

    @property
    def actor_range(self) -> ActorRange:
        """`actors` as a range; a fixed number N is the range N..N."""
        if isinstance(self.actors, ActorRange):
            return self.actors
        return ActorRange(min=self.actors, max=self.actors)

    @field_validator("gpus_per_actor")
    @classmethod
    def _gpus(cls, value: float | str) -> float | str:
        if value != "auto" and value < 0:
            raise ValueError("gpus_per_actor must be 'auto' or >= 0")
        return value

    @field_validator("compile")
    @classmethod
    def _compile_backend(cls, value: str | None) -> str | None:
        from dr_pipeline.core.accelerator import compile_backends  # noqa: PLC0415 - imports torch

        if value is not None and value not in compile_backends():
            known = ", ".join(compile_backends())
            raise ValueError(f"compile must be a torch.compile backend ({known}), got {value!r}")
        return value


class JobConfig(StrictModel):
    name: str = "dr-gen-job"
    seed: int = Field(0, ge=0, lt=2**63)
    input: InputConfig
    output: OutputConfig
    augmentation: AugmentationConfig = AugmentationConfig()
    teachers: list[TeacherConfig] = Field(min_length=1)
    captioners: list[CaptionerConfig] = Field(default_factory=list)
    resources: ResourcesConfig = ResourcesConfig()

    @model_validator(mode="after")
    def _unique_ids(self) -> "JobConfig":
        ids = [t.id for t in self.teachers] + [c.id for c in self.captioners]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"teacher and captioner ids must be unique, repeated: {', '.join(duplicates)}")
        return self

    @property
    def num_captions(self) -> int:
        """S_total: synthetic captions per sample, over all captioners."""
        return sum(c.num_captions for c in self.captioners)

    def output_defining(self) -> dict[str, Any]:
        """The part of the config that determines the dataset's content (no secrets, no resources)."""
        data = self.model_dump(mode="json")
        data.pop("resources")
        data.pop("name")
        data["input"].pop("storage_options")
        data["output"].pop("storage_options")
        data["output"].pop("url")
        for entry in data["teachers"] + data["captioners"]:
            entry.pop("batch_size")
            entry.pop("precision")
        return data

    def output_hash(self) -> str:
        text = json.dumps(self.output_defining(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def public_dump(self) -> dict[str, Any]:
        """The resolved config as written to the manifest: storage options (credentials) removed."""
        data = self.model_dump(mode="json")
        data["input"]["storage_options"] = {}
        data["output"]["storage_options"] = {}
        return data


def _format_validation_error(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "required key missing"
    more = len(error.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {where}: {message}{suffix}"


def parse_job(data: Any, source: str = "config") -> JobConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of job settings, got {type(data).__name__}")
    try:
        return JobConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


def load_job(
    path: str | Path,
    *,
    input_urls: str | list[str] | None = None,
    output_url: str | None = None,
) -> JobConfig:
    """Read and validate a job YAML file; command-line overrides replace input/output URLs."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read job file ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {error.start}): save the job file as UTF-8 YAML"
                          ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(error, 'problem', error)})") from None
    if isinstance(data, dict):
        if input_urls is not None:
            data.setdefault("input", {})
            if isinstance(data["input"], dict):
                data["input"]["urls"] = input_urls
        if output_url is not None:
            data.setdefault("output", {})
            if isinstance(data["output"], dict):
                data["output"]["url"] = output_url
    return parse_job(data, str(path))


def with_storage_options(job: JobConfig, options: dict[str, Any]) -> JobConfig:
    """`job` with `options` (from the command line or the environment) under its input's and
    output's storage options; what the job file sets wins, key by key."""
    if not options:
        return job
    sections = {
        name: section.model_copy(update={"storage_options": {**options, **section.storage_options}})
        for name, section in (("input", job.input), ("output", job.output))
    }
    return job.model_copy(update=sections)
