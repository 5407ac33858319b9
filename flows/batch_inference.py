"""The batch inference flow: check → plan chunks → one GPU-slot task per chunk → consolidate → report.

Run locally:   python -m flows.batch_inference --config jobs/demo.yaml [--set in_flight=4 ...]
As deployed:   prefect deployment run 'batch-inference/nightly'
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from tasks.backends import BackendError, make_backend
from tasks.config import JobSettings, load_settings
from tasks.dataset import ChunkSpec, JobPlan, validate_input
from tasks.dispatch import Dispatcher, LaneFailed
from tasks.gpu_slot import ensure_gpu_limit, gpu_slot
from tasks.inference import ChunkAborted, ChunkStats, finished_chunk_stats, run_chunk
from tasks.openai_batch import write_output as write_openai_output
from tasks.report import RunReporter
from tasks.schema import output_columns
from tasks.sink import ChunkSink
from tasks.sources import input_kind
from tasks.sources import output_model as job_output_model
from tasks.store import (
    build_manifest,
    claim_output_dir,
    consolidate,
    finished_rows,
    join_output_dir,
    write_json_atomic,
)
from tasks.telemetry import Sampler


@task(name="plan-chunks", cache_policy=NO_CACHE)
def plan_chunks(settings: JobSettings) -> JobPlan:
    """Validate the input (columns, ids) and cut it into chunks, before any request is sent."""
    return validate_input(settings)


async def _check_backend(settings: JobSettings) -> None:
    backend = make_backend(settings)
    try:
        await backend.open()
        await backend.check()
    finally:
        await backend.close()


@task(name="check-backend", cache_policy=NO_CACHE)
def check_backend(settings: JobSettings) -> tuple[list[JobSettings], list[str]]:
    """Fail fast when the backend is down or lacks the model, naming the host and model.

    With several endpoints the run goes on with those that answer; returns them and the
    problems of the others.
    """
    up, problems = [], []
    for lane in settings.lanes():
        try:
            asyncio.run(_check_backend(lane))
            up.append(lane)
        except BackendError as err:
            problems.append(str(err))
    if not up:
        raise RuntimeError(f"backend check failed: {'; '.join(problems)}")
    for problem in problems:
        get_run_logger().warning("endpoint left out of this run: %s", problem)
    return up, problems


@task(name="check-sink", cache_policy=NO_CACHE)
def check_sink(settings: JobSettings, plan: JobPlan) -> ChunkSink | None:
    """Before any request: the sink database answers and its table takes the result columns."""
    if settings.sink is None:
        return None
    sink = ChunkSink(settings, output_columns(job_output_model(settings, plan.chunks[0].source)))
    sink.check()
    return sink


def _retry_unless_fatal(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a chunk after an outage; a missing model or a bug will not heal by waiting."""
    try:
        state.result()
    except ChunkAborted as exc:
        return exc.retryable
    except Exception:
        return False
    return False


@task(
    name="run-chunk",
    task_run_name="{chunk.name}",
    cache_policy=NO_CACHE,
    retry_condition_fn=_retry_unless_fatal,
)
def run_chunk_task(settings: JobSettings, chunk: ChunkSpec, reporter: RunReporter) -> ChunkStats:
    """One chunk inside its endpoint's GPU slot; a retry resumes after the rows already checkpointed."""
    with gpu_slot(settings.gpu_limit, settings.slot_timeout_s):
        reporter.chunk_started(chunk)
        return run_chunk(settings, chunk, on_progress=partial(reporter.progress, chunk.index))


class Job(NamedTuple):
    """A job file read, its input validated and planned, before anything is sent."""

    settings: JobSettings
    plan: JobPlan
    fingerprint: str
    record: dict[str, Any]


def prepare_job(job_file: str | None, overrides: dict[str, Any] | None) -> Job:
    # A scheduled run keeps its date through retries and reruns, so it resumes its own directory.
    scheduled = flow_run.scheduled_start_time
    settings = load_settings(job_file, overrides).for_run_date(scheduled.astimezone().date())
    plan = plan_chunks(settings)
    output_model = job_output_model(settings, plan.chunks[0].source)
    output_columns(output_model)  # a schema field colliding with a result column fails here, not mid-run
    schema_json = None if output_model is None else str(output_model.model_json_schema())
    record = {"settings": settings.model_dump(mode="json"), "total_rows": plan.total_rows, "chunks": len(plan.chunks)}
    return Job(settings, plan, settings.answer_fingerprint(plan.input_digest, schema_json), record)


def run_chunks(
    settings: JobSettings,
    lanes: list[JobSettings],
    chunks: list[ChunkSpec],
    reporter: RunReporter,
    sink: ChunkSink | None = None,
) -> None:
    """Each chunk on whichever endpoint is free, one chunk per endpoint at a time.

    One endpoint: a failing chunk is retried by Prefect on it (chunk_retries). Several: the chunk
    moves to another endpoint at once, and the failing one sits out chunk_retry_delay_s before it
    may take another (chunk_retries times, then it is retired for the run).
    """
    several = len(lanes) > 1
    task = run_chunk_task.with_options(
        retries=0 if several else settings.chunk_retries, retry_delay_seconds=settings.chunk_retry_delay_s
    )

    def run(lane: int, batch: list[ChunkSpec]) -> ChunkStats:
        try:
            return task(lanes[lane], batch[0], reporter)
        except ChunkAborted as exc:
            if not several:
                raise
            raise LaneFailed(str(exc), retryable=exc.retryable) from exc

    def done(lane: int, batch: list[ChunkSpec], stats: ChunkStats) -> None:
        reporter.chunk_done(stats)
        if sink is not None:
            chunk, logger = batch[0], get_run_logger()

            def delivered(future: Any) -> None:
                if future.exception() is not None or not future.result():
                    why = future.exception() or sink.failures.get(chunk.index)
                    problem = f"sink: {chunk.name} not delivered, a rerun delivers it: {why}"
                    logger.warning(problem)
                    reporter.notes.append(problem)

            sink.deliver_later(chunk).add_done_callback(delivered)
        if lanes[lane].in_flight == "auto" and stats.calibration:
            # Measured once per endpoint, on its first rows; its later chunks keep the chosen level.
            lanes[lane] = lanes[lane].model_copy(update={"in_flight": stats.in_flight})
        if stats.num_ctx is not None and stats.num_ctx != lanes[lane].options.num_ctx:
            # Persistent out-of-memory lowered it: later chunks start there instead of failing again.
            options = lanes[lane].options.model_copy(update={"num_ctx": stats.num_ctx})
            lanes[lane] = lanes[lane].model_copy(update={"options": options})

    names = [lane.ollama_base_url if lane.backend == "ollama" else "embedded" for lane in lanes]
    dispatcher = Dispatcher(
        names, run, done, retries=settings.chunk_retries if several else 0, retry_delay_s=settings.chunk_retry_delay_s
    )
    try:
        dispatcher(chunks)
    finally:
        reporter.notes.extend(dispatcher.events)


@flow(name="batch-inference", log_prints=True)
def batch_inference(
    job_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    chunks: list[int] | None = None,
    host: str | None = None,
) -> dict[str, Any]:
    """Score every row of the job's input; returns the manifest.

    `chunks` and `host` are set by the scale-out flow: this run is then one host's shard, runs
    only those chunks inside the parent's output directory, and reports under `<name>-<host>`.
    """
    logger = get_run_logger()
    started = time.time()
    settings, plan, fingerprint, record = prepare_job(job_file, overrides)
    out = settings.output_dir
    if chunks is None:
        hold, key, report_dir = claim_output_dir(out, fingerprint, record), settings.name, out
    else:
        plan = plan.shard(chunks)
        # Artifact keys take lowercase letters, digits and dashes only.
        label = re.sub(r"[^a-z0-9-]+", "-", (host or socket.gethostname()).lower())
        hold, key = join_output_dir(out, fingerprint), f"{settings.name}-{label}"
        report_dir = out / "shards" / f"{label}-{plan.chunks[0].name}"
    with hold:
        sink = check_sink(settings, plan)
        lanes, left_out = check_backend(settings)
        for lane in lanes:
            ensure_gpu_limit(lane.gpu_limit)
        done_before = sum(len(finished_rows(out, c)) for c in plan.chunks)
        logger.info(
            "%d rows in %d chunks, %d already done; backend %s, model %s, %s in flight, on %s",
            plan.total_rows,
            len(plan.chunks),
            done_before,
            settings.backend,
            settings.model,
            settings.in_flight,
            ", ".join(lane.gpu_limit for lane in lanes),
        )
        sampler = Sampler(
            interval_s=settings.telemetry_interval_s,
            ollama_hosts=[lane.ollama_base_url for lane in lanes if lane.backend == "ollama"],
        )
        sampler.start()
        reporter = RunReporter(settings, plan, done_before, sampler, key=key, report_dir=report_dir)
        reporter.notes.extend(f"left out at the start: {problem}" for problem in left_out)
        failure: BaseException | None = None
        try:
            todo = []
            for chunk in plan.chunks:
                if (finished := finished_chunk_stats(settings, chunk)) is not None:
                    reporter.chunk_done(finished)  # done by an earlier run: no task, no GPU slot
                    if sink is not None:
                        sink.deliver(chunk)  # catches up what a sink that was down missed
                else:
                    todo.append(chunk)
            run_chunks(settings, lanes, todo, reporter, sink)
            if sink is not None:
                sink.drain()
            if chunks is None:
                logger.info("wrote %s", results := consolidate(out, plan.chunks, plan.total_rows))
                wants_openai = settings.openai_output
                if wants_openai or (wants_openai is None and input_kind(settings) == "openai_batch"):
                    target = write_openai_output(results, out / "openai-output.jsonl", settings.model, fingerprint)
                    logger.info("wrote %s", target)
            if sink is not None:
                sink.raise_if_behind(plan.chunks)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            sampler.stop()
            manifest = build_manifest(settings, plan, fingerprint, started, failure)
            if sink is not None:
                sink.drain()  # deliveries of chunks that finished before a failure still count
                manifest["sink"] = sink.summary(plan.chunks)
            if chunks is not None:
                manifest |= {"results": None, "host": label, "shard_chunks": chunks}
            write_json_atomic(manifest, report_dir / "manifest.json")
            manifest |= reporter.finish(manifest)  # throughput, verdict, telemetry: for a scale-out parent
            write_json_atomic(manifest, report_dir / "manifest.json")
    return manifest


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set options.num_ctx=8192` → {"options": {"num_ctx": 8192}}; values parse as YAML."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        node = overrides
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML job file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    args = parser.parse_args(argv)
    manifest = batch_inference(job_file=str(args.config) if args.config else None, overrides=parse_overrides(args.set))
    print(f"{manifest['rows_ok']} ok, {manifest['rows_error']} error rows → {manifest['results']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
