"""The batch inference flow: check → plan chunks → one GPU-slot task per chunk → consolidate → report.

Run locally:   python -m flows.batch_inference --config jobs/demo.yaml [--set in_flight=4 ...]
As deployed:   prefect deployment run 'batch-inference/nightly'
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # the command line checks the job before Prefect is even imported
    from flows.cli import main

    sys.exit(main("batch", sys.argv[1:]))

import asyncio
import base64
import dataclasses
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Cancelled

from tasks import stopping
from tasks.backends import ServerInfo, make_backend
from tasks.backends.ollama import OllamaBackend
from tasks.bottleneck import judge
from tasks.charts import timeline_png
from tasks.chunk import ChunkAborted, ChunkInterrupted, finished_chunk_stats, run_chunk
from tasks.chunk.calibrate import AutoState
from tasks.config import JobSettings
from tasks.dataset import ChunkSpec, JobPlan, validate_input
from tasks.dispatch import Dispatcher, LaneFailed
from tasks.gpu_slot import ensure_gpu_limit, gpu_slot, keep_slots
from tasks.job import Job, check_backends, plan_job
from tasks.openai_batch import write_output as write_openai_output
from tasks.progress import (
    ARTIFACT_CHUNK_END_EVERY_S,
    ARTIFACT_EVERY_S,
    ArtifactSink,
    Progress,
    Throttled,
    terminal_sink,
)
from tasks.report import build_evidence, chunk_row, level_readings, publish_artifacts, render_report
from tasks.schema import ChunkStats
from tasks.sink import ChunkSink, open_sink
from tasks.sources import wants_openai_output
from tasks.store import (
    auto_memory_path,
    build_manifest,
    check_chunk_files,
    check_output_dir,
    claim_output_dir,
    consolidate,
    error_kinds,
    error_rows,
    finished_rows,
    join_output_dir,
    previous_manifest,
    read_parquet_or_none,
    remember_level,
    remembered_level,
    write_atomic,
    write_json_atomic,
    write_parquet_atomic,
)
from tasks.telemetry import Sampler, energy_wh, summarize, wh_per_1000_rows


@task(name="plan-chunks", cache_policy=NO_CACHE)
def plan_chunks(settings: JobSettings) -> JobPlan:
    """Validate the input (columns, ids) and cut it into chunks, before any request is sent."""
    return validate_input(settings)


@task(name="check-backend", cache_policy=NO_CACHE)
def check_backend(settings: JobSettings) -> tuple[list[JobSettings], list[str], list[ServerInfo]]:
    """Fail fast when the backend is down or lacks the model, naming the host and model.

    With several endpoints the run goes on with those that answer; returns them, the problems
    of the others, and what each server that answered says of itself (slots, context).
    """
    up, problems, servers = check_backends(settings)
    for problem in problems:
        get_run_logger().warning("endpoint left out of this run: %s", problem)
    return up, problems, servers


@task(name="check-sink", cache_policy=NO_CACHE)
def check_sink(settings: JobSettings, plan: JobPlan) -> ChunkSink | None:
    """Before any request: the sink database answers and its table takes the result columns (created when missing)."""
    return open_sink(settings, plan, create=True)


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


@task(
    name="run-chunk",
    task_run_name="{chunk.name}",
    cache_policy=NO_CACHE,
    retry_condition_fn=_retry_unless_fatal,
)
def run_chunk_task(
    settings: JobSettings, chunk: ChunkSpec, progress: Progress, sampler: Sampler, auto: dict[str, Any] | None = None
) -> ChunkStats:
    """One chunk inside its endpoint's GPU slot; a retry resumes after the rows already checkpointed.
    `auto`: where 'auto' in-flight left off on this endpoint (the last chunk's ChunkStats.auto)."""
    about = {"chunk": chunk.name, "output_dir": str(settings.output_dir), "flow_run": flow_run.name}
    stopping.check(f"before {chunk.name}")  # no chunk starts after a stop; one already running winds down
    say = get_run_logger().warning
    # The endpoint names the GPU's machine lock: jobs of other Prefect servers on this machine wait too.
    with gpu_slot(settings.gpu_limit, settings.slot_timeout_s, say=say, about=about, endpoint=settings.server_label):
        sampler.mark(f"{chunk.name} start")
        progress.chunk_started(chunk.index)  # a retry or another endpoint: earlier tries' rows stay counted
        return run_chunk(
            settings,
            chunk,
            make_backend(settings),
            on_progress=lambda done, errs: progress.update(chunk.index, done, errs),
            auto=auto,
        )


def prepare_job(job_file: str | None, overrides: dict[str, Any] | None) -> Job:
    # A scheduled run keeps its date through retries and reruns, so it resumes its own directory.
    day = flow_run.scheduled_start_time.astimezone().date()
    return plan_job(job_file, overrides, day, validate=plan_chunks)


def auto_key(lane: JobSettings) -> str:
    """What a remembered 'auto' level is for: the job, the server and the model."""
    return f"{lane.name} | {lane.server_label} | {lane.model}"


def auto_starts(lanes: list[JobSettings], history: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Where 'auto' starts on each endpoint: where an earlier attempt of this run left it, else at the
    level the last run of the same job settled on (watching, not searching), else nowhere (cold)."""
    earlier = sorted(
        (ChunkStats.model_validate(s) for s in history.get("chunk_stats", []) if s.get("auto")),
        key=lambda st: st.finished_at,
    )
    starts: dict[int, dict[str, Any]] = {}
    for i, lane in enumerate(lanes):
        if lane.in_flight != "auto":
            continue
        mine = [st.auto for st in earlier if st.endpoint == lane.server_label and st.auto]
        level = remembered_level(auto_memory_path(lane.output_dir), auto_key(lane))
        if mine:
            starts[i] = mine[-1]
        elif level is not None:
            starts[i] = AutoState(ceiling=lane.workers, level=min(level, lane.workers), settled=True).model_dump()
    return starts


def run_chunks(
    settings: JobSettings,
    lanes: list[JobSettings],
    chunks: list[ChunkSpec],
    progress: Progress,
    sampler: Sampler,
    on_done: Callable[[ChunkSpec, ChunkStats], None],
    notes: list[str],
    auto: dict[int, dict[str, Any]] | None = None,
    on_interrupted: Callable[[ChunkStats], None] = lambda stats: None,
) -> None:
    """Each chunk on whichever endpoint is free, one chunk per endpoint at a time.

    One endpoint: a failing chunk is retried by Prefect on it (chunk_retries). Several: the chunk
    moves to another endpoint at once, and the failing one sits out chunk_retry_delay_s before it
    may take another (chunk_retries times, then it is retired for the run).

    'auto' in-flight lives across an endpoint's chunks: each starts from the state the last one ended
    with (`auto`, by lane, holds the starting states), and the level it settles on is remembered
    beside output_dir for the next run of the job.
    """
    states = dict(auto or {})
    several = len(lanes) > 1
    task = run_chunk_task.with_options(
        retries=0 if several else settings.chunk_retries, retry_delay_seconds=settings.chunk_retry_delay_s
    )

    def run(lane: int, batch: list[ChunkSpec]) -> ChunkStats:
        try:
            return task(lanes[lane], batch[0], progress, sampler, states.get(lane))
        except ChunkInterrupted as exc:
            if exc.stats is not None:  # every lane's, not only the one whose exception ends the dispatch
                on_interrupted(exc.stats)
            raise
        except ChunkAborted as exc:
            if not several:
                raise
            raise LaneFailed(str(exc), retryable=exc.retryable) from exc

    def done(lane: int, batch: list[ChunkSpec], stats: ChunkStats) -> None:
        on_done(batch[0], stats)
        if stats.auto:
            states[lane] = stats.auto
            if stats.auto.get("settled"):
                memory = auto_memory_path(lanes[lane].output_dir)
                remember_level(memory, auto_key(lanes[lane]), stats.in_flight, stats.calibration)
        if lanes[lane].structured_output == "auto" and stats.structured_output == "grammar":
            # The endpoint's first answers without a grammar failed (tasks/chunk/modes.py): its later
            # chunks start with the grammar instead of wasting requests to find that out again.
            lanes[lane] = lanes[lane].model_copy(update={"structured_output": "grammar"})
        if stats.num_ctx is not None and stats.num_ctx != lanes[lane].options.num_ctx:
            # Persistent out-of-memory lowered it: later chunks start there instead of failing again.
            options = lanes[lane].options.model_copy(update={"num_ctx": stats.num_ctx})
            lanes[lane] = lanes[lane].model_copy(update={"options": options})

    names = [lane.server_label for lane in lanes]
    dispatcher = Dispatcher(
        names, run, done, retries=settings.chunk_retries if several else 0, retry_delay_s=settings.chunk_retry_delay_s
    )
    try:
        # One chunk's GPU slot passes to the run's next chunk unless another job waits: no hand-over gap.
        with keep_slots():
            dispatcher(chunks)
    finally:
        notes.extend(dispatcher.events)


def _merged(previous: pl.DataFrame | None, new: pl.DataFrame) -> pl.DataFrame:
    return new if previous is None else pl.concat([previous, new], how="diagonal_relaxed")


def _round3(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def write_report(
    job: Job,
    manifest: dict[str, Any],
    stats: list[ChunkStats],
    sampler: Sampler,
    servers: list[ServerInfo],
    *,
    key: str,
    report_dir: Path,
) -> dict[str, Any]:
    """Telemetry, chart and report of the whole job in report_dir (every attempt), then its artifacts.

    Returns the figures the manifest keeps: a scale-out parent reads them per host.
    """
    settings, plan = job.settings, job.plan
    samples = _merged(read_parquet_or_none(report_dir / "telemetry" / "samples.parquet"), sampler.frame())
    marks = _merged(read_parquet_or_none(report_dir / "telemetry" / "marks.parquet"), sampler.marks())
    write_parquet_atomic(samples, report_dir / "telemetry" / "samples.parquet")
    write_parquet_atomic(marks, report_dir / "telemetry" / "marks.parquet")
    # A run stopped by a signal has seconds to exit: no chart (loading matplotlib and drawing takes
    # one to several seconds); the next run draws the whole job's, this attempt included.
    chart = None if manifest.get("interrupted") else timeline_png(samples, marks)
    if chart:
        write_atomic(report_dir / "timeline.png", lambda tmp: tmp.write_bytes(chart))
    first = manifest["attempts"][0]["started_at"]
    telemetry = summarize(samples, first, time.time()) if samples.height else {}
    # This run's energy: its own samples and the rows it finished (earlier attempts' are in their manifests).
    wh = energy_wh(sampler.frame())
    energy = {
        "energy_wh": None if wh is None else round(wh, 3),
        "wh_per_1000_rows": _round3(wh_per_1000_rows(wh, manifest["rows_sent"])),
    }
    evidence = build_evidence(
        settings,
        stats,
        plan.total_rows,
        manifest["rows_ok"] + manifest["rows_error"],
        telemetry,
        error_kinds(settings.output_dir, plan.chunks),
        servers,
        level_readings(list(stats), samples) if samples.height else None,
    )
    verdict = judge(evidence)
    text = lambda image: render_report(  # noqa: E731
        settings,
        manifest,
        verdict,
        evidence,
        telemetry,
        samples,
        stats=stats,
        events=manifest["recoveries"],
        report_dir=report_dir,
        image=image,
        energy=energy,
    )
    write_atomic(report_dir / "report.md", lambda tmp: tmp.write_text(text("timeline.png" if chart else None)))
    # The UI shows images given as data URIs inside markdown, so the chart travels with the artifact.
    inline = f"data:image/png;base64,{base64.b64encode(chart).decode()}" if chart else None
    table = [chunk_row(st, samples) for st in sorted(stats, key=lambda st: st.index)]
    publish_artifacts(key, text(inline), verdict.headline, table)
    return {
        "verdict": verdict.kind,
        "headline": verdict.headline,
        "requests_per_s": round(evidence.requests_per_s, 3),
        "tokens_per_s": round(evidence.tokens_per_s, 1),
        "telemetry": telemetry,
        **energy,
    }


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
    # SIGINT or SIGTERM (Ctrl-C, `kill`, a Prefect worker cancelling the run) stops the run within
    # seconds, and the manifest and report say "interrupted".
    with stopping.signals_stop_the_run():
        try:
            stopping.check("before the run began")
            return _score_rows(job_file, overrides, chunks, host)
        except stopping.Interrupted as exc:
            # The flow run ends Cancelled with the reason, not Failed: someone stopped it, nothing
            # broke, and a worker's cancellation must end Cancelled anyway (Prefect lets a Cancelling
            # run go nowhere else). Returned as a state, not raised: Prefect then logs one line, not
            # a traceback, and the caller still gets `exc` (a state's result() raises the exception
            # it carries), with how far the run got.
            return cast(dict[str, Any], Cancelled(message=str(exc), data=exc))


def _score_rows(
    job_file: str | None, overrides: dict[str, Any] | None, chunks: list[int] | None, host: str | None
) -> dict[str, Any]:
    logger = get_run_logger()
    started = time.time()
    job = prepare_job(job_file, overrides)
    settings, plan, fingerprint, record = job
    out = settings.output_dir
    if chunks is None:
        key, report_dir = settings.name, out
    else:
        plan = plan.shard(chunks)
        job = job._replace(plan=plan)
        # Artifact keys take lowercase letters, digits and dashes only.
        label = re.sub(r"[^a-z0-9-]+", "-", (host or socket.gethostname()).lower())
        key, report_dir = f"{settings.name}-{label}", out / "shards" / f"{label}-{plan.chunks[0].name}"
    # Pre-flight first: a refused directory or an unreachable backend leaves output_dir untouched.
    check_output_dir(out, fingerprint, record if chunks is None else None)
    sink = check_sink(settings, plan)  # a refused sink sends nothing, not even to the backend
    lanes, left_out, servers = check_backend(settings)
    hold = claim_output_dir(out, fingerprint, record) if chunks is None else join_output_dir(out, fingerprint)
    with hold:
        for lane in lanes:
            ensure_gpu_limit(lane.gpu_limit)
        history = previous_manifest(report_dir, fingerprint)
        # What earlier runs left: damaged or foreign files set aside, torn journal lines counted.
        findings = [*plan.notes, *check_chunk_files(out, plan.chunks)]
        for finding in findings:
            logger.warning(finding)
        # Per chunk: a chunk's end then adds to the progress only the rows and error rows this attempt made.
        rows_before = {c.index: len(finished_rows(out, c)) for c in plan.chunks}
        errors_before = {c.index: error_rows(out, [c]) for c in plan.chunks}
        done_before = sum(rows_before.values())
        limits = ", ".join(f"'{lane.gpu_limit}'" for lane in lanes)
        logger.info(
            "%d rows in %d chunks, %d already done; backend %s, model %s, %s in flight; each chunk holds the "
            "Prefect concurrency limit %s",
            plan.total_rows,
            len(plan.chunks),
            done_before,
            settings.backend,
            settings.model,
            settings.in_flight,
            limits,
        )
        # Ollama's /api/ps says whether the model spilled to the CPU; the sampler polls each endpoint's.
        ollamas = [b for b in map(make_backend, lanes) if isinstance(b, OllamaBackend)]
        sampler = Sampler(interval_s=settings.telemetry_interval_s, model_memory=ollamas)
        progress = Progress(
            key,
            plan.total_rows,
            done_before,
            sum(errors_before.values()),
            sinks=[Throttled(ArtifactSink(), ARTIFACT_EVERY_S, ARTIFACT_CHUNK_END_EVERY_S), terminal_sink()],
        )
        # Chunks an earlier attempt ran keep the figures it measured; this attempt's replace them.
        stats = {s["index"]: ChunkStats.model_validate(s) for s in history.get("chunk_stats", [])}
        notes = [f"{time.strftime('%H:%M:%S')} left out at the start: {problem}" for problem in left_out]
        notes += [f"{time.strftime('%H:%M:%S')} {finding}" for finding in findings]
        ran: list[ChunkStats] = []  # chunks this attempt sent rows of: finished, or interrupted by a signal

        def deliver(chunk: ChunkSpec) -> None:
            """Hand a finished chunk to the sink's thread; a refusal is noted, and the next run delivers it."""
            if sink is None:
                return

            def delivered(future: Any) -> None:
                if future.exception() is not None or not future.result():
                    problem = f"sink: {chunk.name} not delivered, a rerun delivers it: "
                    problem += str(future.exception() or sink.failures.get(chunk.index))
                    logger.warning(problem)
                    notes.append(f"{time.strftime('%H:%M:%S')} {problem}")

            sink.deliver_later(chunk).add_done_callback(delivered)

        def chunk_done(chunk: ChunkSpec, st: ChunkStats) -> None:
            sampler.mark(f"chunk-{st.index:05d} end")
            stats[st.index] = st
            ran.append(st)
            progress.chunk_done(st.index, st.rows - rows_before[st.index], st.errors - errors_before[st.index])
            deliver(chunk)

        sampler.start()
        sampler.mark(f"attempt {len(history.get('attempts', [])) + 1} start")
        progress.start()
        failure: BaseException | None = None
        try:
            todo = []
            for chunk in plan.chunks:
                if (finished := finished_chunk_stats(settings, chunk)) is None:
                    todo.append(chunk)
                    continue
                if chunk.index not in stats:  # done by an earlier run whose figures are gone
                    stats[chunk.index] = finished
                deliver(chunk)  # catches up what a sink that was down missed (none if it has it)
            run_chunks(
                settings, lanes, todo, progress, sampler, chunk_done, notes, auto_starts(lanes, history), ran.append
            )
            if chunks is None:
                logger.info("wrote %s", results := consolidate(out, plan.chunks, plan.total_rows))
                if wants_openai_output(settings):
                    target = out / "openai-output.jsonl"
                    logger.info("wrote %s", write_openai_output(results, target, settings.model, fingerprint))
            if sink is not None:
                sink.drain()
                sink.raise_if_behind(plan.chunks)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            sampler.stop()
            progress.finish()
            for ollama in ollamas:
                asyncio.run(ollama.close())
            manifest = build_manifest(settings, plan, fingerprint, started, failure)
            if sink is not None:
                sink.close()  # deliveries of chunks that finished before a failure still count
                manifest["sink"] = sink.summary(plan.chunks)
            attempt = {
                "started_at": started,
                "finished_at": manifest["finished_at"],
                "wall_s": manifest["wall_s"],
                "rows_sent": sum(st.sent_rows for st in ran),
                "complete": manifest["complete"],
                "error": manifest["error"],
            }
            manifest |= {
                # This attempt's rows and sending time: a scale-out parent adds them up per host.
                "rows_sent": attempt["rows_sent"],
                "sending_s": round(sum(st.seconds for st in ran if st.sent_rows), 3),
                "attempts": [*history.get("attempts", []), attempt],
                "recoveries": [*history.get("recoveries", []), *notes, *(e for st in ran for e in st.events)],
                "servers": [dataclasses.asdict(info) for info in servers],
                "chunk_stats": [st.model_dump(mode="json", exclude={"events"}) for _, st in sorted(stats.items())],
            }
            # The signal that stopped this attempt (SIGINT, SIGTERM), null when none did.
            manifest["interrupted"] = failure.signum.name if isinstance(failure, stopping.Interrupted) else None
            if chunks is not None:
                manifest |= {"results": None, "host": label, "shard_chunks": chunks}
            write_json_atomic(manifest, report_dir / "manifest.json")
            manifest |= write_report(
                job, manifest, list(stats.values()), sampler, servers, key=key, report_dir=report_dir
            )
            write_json_atomic(manifest, report_dir / "manifest.json")
            if isinstance(failure, stopping.Interrupted):  # finished chunks and the rows journaled in the others
                on_disk = sum(len(finished_rows(out, c)) for c in plan.chunks)
                failure.on_disk = f"{on_disk:,} rows on disk in {out}"
    return manifest
