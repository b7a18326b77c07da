"""The built-in kinds, as the registry lists and checks them: name, description, examples, options
and offline spec check, none of which imports an adapter. Each adapter module (torch and its model
library) is imported by its builders' first call, in the model actor that builds the model.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from teachers import open_clip_spec, python_adapter
from teachers.registry import Role, TeacherKind
from teachers.weights import model_location_problem


def _builder(module: str, name: str) -> Callable[..., Any]:
    """`module.name`, imported when first called."""

    def build(*args: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args)

    return build


def _model_location_problem(rest: str, role: Role) -> str | None:
    return model_location_problem(rest)


BUILTIN_KINDS = (
    TeacherKind(
        name="open_clip",
        description="open_clip models by pretrained tag (MODEL/TAG), hub repository (hf-hub:ORG/NAME), checkpoint "
        "file (MODEL@/path, MODEL@hf-hub:ORG/NAME[/FILE], MODEL@s3://...) or seeded random init (MODEL); "
        "CoCa models can also caption",
        example="open_clip:ViT-L-14/datacomp_xl_s13b_b90k",
        captioner_example="open_clip:coca_ViT-L-14@hf-hub:apple/mobileclip2_coca_dfn2b_s13b_mscoco38k_s12m_context77",
        spec_problem=open_clip_spec.spec_problem,
        build_teacher=_builder("teachers.open_clip_adapter", "build_open_clip_teacher"),
        build_captioner=_builder("teachers.open_clip_adapter", "build_open_clip_captioner"),
        estimate_cost=open_clip_spec.estimate_cost,
        options={},
    ),
    TeacherKind(
        name="hf",
        description="transformers models (hub id or local folder; a folder with only a config gets seeded random "
        "weights): teachers with get_image_features / get_text_features (CLIP, SigLIP), captioners with a "
        "generate that takes pixel values (BLIP, GIT, VisionEncoderDecoder, image-text-to-text models)",
        example="hf:openai/clip-vit-large-patch14",
        captioner_example="hf:Salesforce/blip-image-captioning-large",
        spec_problem=_model_location_problem,
        build_teacher=_builder("teachers.hf_adapter", "build_hf_teacher"),
        build_captioner=_builder("teachers.hf_adapter", "build_hf_captioner"),
        options={"prompt": "captioner: text the processor puts before the caption (e.g. '<image> A photo of')"},
    ),
    TeacherKind(
        name="st",
        description="a sentence-transformers model (hub id or local folder) as a text-only teacher: it embeds the "
        "real and synthetic captions, and the dataset has no image embedding column for it",
        example="st:sentence-transformers/all-MiniLM-L6-v2",
        spec_problem=_model_location_problem,
        build_teacher=_builder("teachers.sentence_transformers_adapter", "build_sentence_transformer_teacher"),
        options={},
    ),
    TeacherKind(
        name="python",
        description="your own class, called as ClassName(config, device, precision); it returns an object with a "
        "card and encode_image / encode_text (a teacher) or caption (a captioner); the config entry's options "
        "are its settings",
        example="python:examples.timm_teacher:TimmImageTeacher",
        spec_problem=python_adapter.spec_problem,
        build_teacher=python_adapter.build_python_teacher,
        build_captioner=python_adapter.build_python_captioner,
        options=None,
    ),
)
