"""The run's steps as Prefect tasks: what a flow hands `run_job` (tasks/run.py) so the UI shows each step.

Each task is a thin wrapper around a plain function: planning, the sink and backend checks, and one
chunk inside its endpoint's GPU slot (a Prefect global concurrency limit of 1, plus a machine lock,
see tasks/inference/gpu_slot.py), retried by Prefect after an outage. Reports become artifacts.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import date
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.runtime import flow_run

from tasks import stopping
from tasks.analysis.progress import Progress, Snapshot
from tasks.analysis.telemetry import Sampler
from tasks.inference.endpoints import check_backends
from tasks.inference.gpu_slot import ensure_gpu_limit, gpu_slot, keep_slots
from tasks.inference.runner import ChunkAborted
from tasks.plan.dataset import ChunkSpec, JobPlan, validate_input
from tasks.plan.job import ChunkInputs, OutputModel
from tasks.run import Checks, Steps, chunk_on_endpoint
from tasks.schema import ChunkStats
from tasks.settings.model import JobSettings
from tasks.storage.sink import ChunkSink, open_sink


@task(name="plan-chunks", cache_policy=NO_CACHE)
def plan_chunks(settings: JobSettings) -> JobPlan:
    """Validate the input (columns, ids) and cut it into chunks, before any request is sent."""
    return validate_input(settings)


@task(name="check-backend", cache_policy=NO_CACHE)
def check_backend(settings: JobSettings) -> Checks:
    """Fail fast when the backend is down or lacks the model, naming the host and model.

    With several endpoints the run goes on with those that answer; returns them, the problems
    of the others, and what each server that answered says of itself (slots, context).
    """
    return check_backends(settings)


@task(name="check-sink", cache_policy=NO_CACHE)
def check_sink(settings: JobSettings, output_model: OutputModel, create: bool) -> ChunkSink | None:
    """Before any request: the sink database answers and its table takes the result columns (created when missing)."""
    return open_sink(settings, output_model, create=create)


def _retry_unless_fatal(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a chunk after an outage; a missing model or a bug will not heal by waiting."""
    try:
        state.result()
    except stopping.Interrupted:
        return False  # a signal asked the run to stop: the rerun resumes this chunk, not a retry
    except ChunkAborted as exc:
        return exc.retryable
    except Exception:
        return False
    return False


@task(name="run-chunk", task_run_name="{chunk.name}", cache_policy=NO_CACHE, retry_condition_fn=_retry_unless_fatal)
def run_chunk_task(
    settings: JobSettings,
    chunk: ChunkSpec,
    inputs: ChunkInputs,
    progress: Progress,
    sampler: Sampler,
    auto: dict[str, Any] | None = None,
) -> ChunkStats:
    """One chunk inside its endpoint's GPU slot; a retry resumes after the rows already checkpointed.
    `auto`: where 'auto' in-flight left off on this endpoint (the last chunk's ChunkStats.auto)."""
    about = {"chunk": chunk.name, "output_dir": str(settings.output_dir), "flow_run": flow_run.name}
    say = get_run_logger().warning
    context = TaskRunContext.get()
    if context is not None and (tries := context.task_run.run_count) > 1:
        # A retry's delay is waited here, not in Prefect's retry_delay_seconds: Prefect's sleep cannot be
        # cut short, and a stop must not wait it out (a worker's cancel kills the run after 30 s).
        say(f"{chunk.name}: try {tries} starts in {settings.chunk_retry_delay_s:.0f} s")
        stopping.sleep(settings.chunk_retry_delay_s)
    stopping.check(f"before {chunk.name}")  # no chunk starts after a stop; one already running winds down
    # The endpoint names the GPU's machine lock: jobs of other Prefect servers on this machine wait too.
    with gpu_slot(settings.gpu_limit, settings.slot_timeout_s, say=say, about=about, endpoint=settings.server_label):
        return chunk_on_endpoint(settings, chunk, inputs, progress, sampler, auto)


def publish_artifacts(key: str, report: str, description: str, table: list[dict[str, Any]] | None = None) -> None:
    """The `<key>-chunks` table (when there is one) and the `<key>-report` markdown artifact."""
    if table:
        create_table_artifact(table=table, key=f"{key}-chunks", description=f"Per-chunk summary of {key}")
    create_markdown_artifact(markdown=report, key=f"{key}-report", description=description[:200])


class ArtifactSink:
    """The `<key>-progress` artifact: created with the first snapshot, updated after."""

    def __init__(self) -> None:
        self.artifact_id: Any = None

    def __call__(self, snap: Snapshot) -> None:
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(
                progress=snap.pct, key=f"{snap.key}-progress", description=snap.line()
            )
        else:
            update_progress_artifact(self.artifact_id, snap.pct, description=snap.line())


def scheduled_day() -> date:
    """The day a run fills `{date}` with: its scheduled start, so retries and reruns resume its own directory."""
    return flow_run.scheduled_start_time.astimezone().date()


class PrefectSteps:
    """`Steps` inside a flow run: task runs, the GPU slot, Prefect's retries, artifacts."""

    def __init__(self, retries: int = 0) -> None:
        self.log: logging.Logger | logging.LoggerAdapter[Any] = get_run_logger()
        self._chunk_task = run_chunk_task.with_options(retries=retries)  # the task waits its retry delay

    def check_sink(self, settings: JobSettings, output_model: OutputModel, *, create: bool) -> ChunkSink | None:
        return check_sink(settings, output_model, create)

    def check_backends(self, settings: JobSettings) -> Checks:
        up, problems, servers = check_backend(settings)
        for lane in up:  # made here, before a chunk waits on it: the UI lists it from the start
            ensure_gpu_limit(lane.gpu_limit)
        return up, problems, servers

    def run_chunk(
        self,
        lane: JobSettings,
        chunk: ChunkSpec,
        inputs: ChunkInputs,
        progress: Progress,
        sampler: Sampler,
        auto: dict[str, Any] | None,
    ) -> ChunkStats:
        return self._chunk_task(lane, chunk, inputs, progress, sampler, auto)

    def retrying(self, retries: int) -> Steps:
        return PrefectSteps(retries)

    def slots_kept(self) -> contextlib.AbstractContextManager[None]:
        return keep_slots()

    def publish(self, key: str, report: str, headline: str, table: list[dict[str, Any]] | None) -> None:
        publish_artifacts(key, report, headline, table)
