"""A job file read, its input validated and planned, and its backends checked: before anything is sent.

No Prefect here, so the command line can refuse a bad job in a second, before a Prefect server
starts; the flow runs the same steps again (its parameters may come from a deployment).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import date
from typing import Any, NamedTuple

from tasks.backends import BackendError, ServerInfo, make_backend
from tasks.config import JobSettings, SettingsError, load_settings
from tasks.dataset import JobPlan, validate_input
from tasks.schema import load_output_model, output_columns
from tasks.sources import output_model as job_output_model

log = logging.getLogger(__name__)


class BackendUnavailable(RuntimeError):
    """No endpoint answers, or none has the model: nothing can run."""

    def __init__(self, message: str, backend: str = "ollama") -> None:
        super().__init__(message)
        self.backend = backend  # the hint differs: an Ollama server, an OpenAI-compatible one, a GGUF file


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
    return Job(settings, plan, settings.answer_fingerprint(plan.input_digest, schema_json), record)


async def _check_one(settings: JobSettings) -> ServerInfo:
    backend = make_backend(settings)
    try:
        await backend.open()
        await backend.check()
        return await backend.describe()
    finally:
        await backend.close()


def check_backends(settings: JobSettings) -> tuple[list[JobSettings], list[str], list[ServerInfo]]:
    """The endpoints that answer and have the model, the problems of the others, and what each
    server that answered says of itself (slots, context per slot; see ServerInfo).

    Raises BackendUnavailable, naming host and model, when none does.
    """
    up, problems, servers = [], [], []
    for lane in settings.lanes():
        try:
            info = asyncio.run(_check_one(lane))
        except BackendError as err:
            problems.append(str(err))
            continue
        if lane.server_slots is None and info.parallel_slots:
            lane = lane.model_copy(update={"server_slots": info.parallel_slots})  # 'auto's ceiling
        up.append(lane)
        servers.append(info)
        if info.context_per_slot is not None and info.context_per_slot < lane.options.num_ctx:
            # The server's per-sequence context is fixed at its start: prompts the job thinks fit can fail.
            note = (
                f"{lane.server_label} gives each of its {info.parallel_slots} slots {info.context_per_slot} tokens "
                f"of context, less than options.num_ctx {lane.options.num_ctx}: longer prompts become "
                "context_length error rows; lower num_ctx or start the server with a larger context"
            )
            log.warning(note)
    if not up:
        raise BackendUnavailable(f"backend check failed: {'; '.join(problems)}", settings.backend)
    return up, problems, servers
