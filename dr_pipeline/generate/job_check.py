"""The checks of a job that need no model, no torch and no Ray: a run makes them before starting Ray."""

from __future__ import annotations

from dr_pipeline.core.config import JobConfig
from dr_pipeline.dataset.formats import format_for
from teachers import check_spec


def check_job(job: JobConfig) -> None:
    """Everything about the job that can be checked without loading a model or starting Ray: its
    output format is registered, each teacher and captioner spec names a known kind with valid options."""
    format_for(job.output.format)
    for teacher in job.teachers:
        check_spec(teacher.spec, "teacher", teacher.options)
    for captioner in job.captioners:
        check_spec(captioner.spec, "captioner", captioner.options)
