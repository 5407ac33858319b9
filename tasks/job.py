"""A job file read, its input validated and planned, and its backends checked: before anything is sent.

No Prefect here, so the command line can refuse a bad job in a second, before a Prefect server
starts; the flow runs the same steps again (its parameters may come from a deployment).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import date
from typing import Any, NamedTuple

from tasks.backends import BackendError, make_backend
from tasks.config import JobSettings, load_settings
from tasks.dataset import JobPlan, validate_input
from tasks.schema import load_output_model, output_columns


class BackendUnavailable(RuntimeError):
    """No endpoint answers, or none has the model: nothing can run."""


class Job(NamedTuple):
    settings: JobSettings
    plan: JobPlan
    fingerprint: str
    record: dict[str, Any]  # what job.json keeps about the configuration that owns output_dir


def plan_job(
    job_file: str | None,
    overrides: dict[str, Any] | None,
    day: date,
    validate: Callable[[JobSettings], JobPlan] = validate_input,
) -> Job:
    """Settings (with `{date}` filled), output schema, validated input and the job's fingerprint."""
    settings = load_settings(job_file, overrides).for_run_date(day)
    output_model = load_output_model(settings.output_schema) if settings.output_schema else None
    output_columns(output_model)  # a schema field colliding with a result column fails here, not mid-run
    plan = validate(settings)
    schema_json = None if output_model is None else str(output_model.model_json_schema())
    record = {
        "settings": settings.model_dump(mode="json"),
        "input_digest": plan.input_digest,
        "total_rows": plan.total_rows,
        "chunks": len(plan.chunks),
    }
    return Job(settings, plan, settings.answer_fingerprint(plan.input_digest, schema_json), record)


async def _check_one(settings: JobSettings) -> None:
    backend = make_backend(settings)
    try:
        await backend.open()
        await backend.check()
    finally:
        await backend.close()


def check_backends(settings: JobSettings) -> tuple[list[JobSettings], list[str]]:
    """The endpoints that answer and have the model, and the problems of the others.

    Raises BackendUnavailable, naming host and model, when none does.
    """
    up, problems = [], []
    for lane in settings.lanes():
        try:
            asyncio.run(_check_one(lane))
            up.append(lane)
        except BackendError as err:
            problems.append(str(err))
    if not up:
        raise BackendUnavailable(f"backend check failed: {'; '.join(problems)}")
    return up, problems
