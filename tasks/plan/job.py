"""A job file read, its input validated and planned, and its fingerprint: before anything is sent."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel

from tasks.io.sources import output_model as job_output_model
from tasks.plan.dataset import JobPlan, validate_input
from tasks.schema import load_output_model, output_columns
from tasks.settings.load import load_settings
from tasks.settings.model import JobSettings, SettingsError

OutputModel = type[BaseModel] | None  # what answers parse into, when anything


class ChunkInputs(NamedTuple):
    """What every chunk of a run reads, worked out once at planning (Job.inputs)."""

    snapshot: Path  # the validated input rows
    output_model: OutputModel


class Job(NamedTuple):
    settings: JobSettings
    plan: JobPlan
    fingerprint: str
    record: dict[str, Any]  # what job.json keeps about the configuration that owns output_dir
    output_model: OutputModel  # output_schema, or an OpenAI batch file's response_format

    @property
    def inputs(self) -> ChunkInputs:
        """What every chunk reads, passed down rather than worked out again per chunk."""
        return ChunkInputs(self.plan.snapshot, self.output_model)


def plan_job(
    job_file: str | None,
    overrides: dict[str, Any] | None,
    day: date,
    validate: Callable[[JobSettings], JobPlan] = validate_input,
) -> Job:
    """Settings (with `{date}` filled), output schema, validated input and the job's fingerprint."""
    settings = load_settings(job_file, overrides)
    settings = settings.for_run_date(settings.run_date or day)
    if settings.output_schema:  # a bad schema is a settings mistake: said first, as one
        try:
            output_columns(load_output_model(settings.output_schema))
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
    plan = validate(settings)
    # An OpenAI batch file's response_format, when it has one, is the output model.
    output_model = job_output_model(settings, plan.response_format)
    output_columns(output_model)  # a schema field colliding with a result column fails here, not mid-run
    schema_json = None if output_model is None else str(output_model.model_json_schema())
    record = {
        "settings": settings.model_dump(mode="json"),
        "input": settings.input_label,
        "input_digest": plan.input_digest,
        "total_rows": plan.total_rows,
        "chunks": len(plan.chunks),
    }
    return Job(settings, plan, settings.answer_fingerprint(plan.input_digest, schema_json), record, output_model)
