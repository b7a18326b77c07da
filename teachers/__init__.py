"""Teacher and captioner adapters, built from spec strings by a registry (see registry.py)."""

from teachers.base import Captioner, CaptionerCard, Teacher, TeacherCard
from teachers.flops import ModelCost
from teachers.registry import build_captioner, build_teacher, check_spec, model_cost, teacher_kinds

__all__ = [
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
