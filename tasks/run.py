"""One run of a planned job, without Prefect: check → chunks on the endpoints → consolidate → manifest and report.

`run_job` is the whole run. What an orchestrator adds comes in through `Steps`: the flow passes
Prefect tasks that hold the GPU slot, retry a chunk and publish artifacts (tasks/prefect_steps.py);
tests and the command line's pre-flight pass `Direct`, plain calls. Same order, same files either way.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import polars as pl

from tasks import stopping
from tasks.analysis.charts import timeline_png
from tasks.analysis.progress import Progress
from tasks.analysis.progress import Sink as ProgressSink
from tasks.analysis.report import build_evidence, chunk_row, level_readings, render_report, rounded
from tasks.analysis.telemetry import (
    FIRST_ANSWER,
    Sampler,
    chunks_busy_s,
    energy_wh,
    of_gpus,
    summarize,
    warm_ups,
    wh_per_1000_rows,
)
from tasks.analysis.verdict import judge
from tasks.inference.backends import Backend, ServerInfo, make_backend
from tasks.inference.backends.ollama import OllamaBackend
from tasks.inference.calibrate import AutoState
from tasks.inference.dispatch import Dispatcher, LaneFailed
from tasks.inference.endpoints import check_backends
from tasks.inference.runner import ChunkAborted, ChunkInterrupted, finished_chunk_stats, run_chunk
from tasks.io.openai_batch import write_output as write_openai_output
from tasks.io.sources import wants_openai_output
from tasks.plan.dataset import ChunkSpec, pinned_snapshot
from tasks.plan.job import ChunkInputs, Job, OutputModel
from tasks.schema import ChunkStats
from tasks.settings.model import JobSettings
from tasks.storage.files import read_parquet_or_none, write_atomic, write_parquet_atomic
from tasks.storage.journal import check_chunk_files, rows_on_disk
from tasks.storage.manifest import Attempt, Manifest
from tasks.storage.outdir import (
    OutputDirError,
    auto_memory_path,
    check_not_in_use,
    check_output_dir,
    claim_output_dir,
    join_output_dir,
    remember_level,
    remembered_level,
)
from tasks.storage.results import consolidate, error_kinds, server_timed
from tasks.storage.sink import ChunkSink, open_sink

Checks = tuple[list[JobSettings], list[str], list[ServerInfo]]  # endpoints up, problems of the others, servers


class Steps(Protocol):
    """What the orchestrator does for a run; every method has a plain version in `Direct`."""

    log: logging.Logger | logging.LoggerAdapter[Any]

    def check_sink(self, settings: JobSettings, output_model: OutputModel, *, create: bool) -> ChunkSink | None: ...

    def check_backends(self, settings: JobSettings) -> Checks: ...

    def run_chunk(
        self,
        lane: JobSettings,
        chunk: ChunkSpec,
        inputs: ChunkInputs,
        progress: Progress,
        sampler: Sampler,
        auto: dict[str, Any] | None,
    ) -> ChunkStats: ...

    def retrying(self, retries: int) -> Steps:
        """These steps with a failed chunk retried `retries` times on its endpoint (one endpoint only),
        chunk_retry_delay_s apart."""
        ...

    def slots_kept(self) -> contextlib.AbstractContextManager[None]:
        """Around all chunks: a chunk's GPU slot passes to the next one unless another job waits."""
        ...

    def publish(self, key: str, report: str, headline: str, table: list[dict[str, Any]] | None) -> None: ...


class Direct:
    """Plain calls: no GPU slot, no retries, no artifacts. For tests, embedding and the pre-flight."""

    log: logging.Logger | logging.LoggerAdapter[Any] = logging.getLogger("tasks.run")

    def check_sink(self, settings: JobSettings, output_model: OutputModel, *, create: bool) -> ChunkSink | None:
        return open_sink(settings, output_model, create=create)

    def check_backends(self, settings: JobSettings) -> Checks:
        return check_backends(settings)

    def run_chunk(
        self,
        lane: JobSettings,
        chunk: ChunkSpec,
        inputs: ChunkInputs,
        progress: Progress,
        sampler: Sampler,
        auto: dict[str, Any] | None,
    ) -> ChunkStats:
        return chunk_on_endpoint(lane, chunk, inputs, progress, sampler, auto)

    def retrying(self, retries: int) -> Steps:
        return self

    def slots_kept(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def publish(self, key: str, report: str, headline: str, table: list[dict[str, Any]] | None) -> None:
        pass


def chunk_on_endpoint(
    lane: JobSettings,
    chunk: ChunkSpec,
    inputs: ChunkInputs,
    progress: Progress,
    sampler: Sampler,
    auto: dict[str, Any] | None,
    backend: Backend | None = None,
) -> ChunkStats:
    """One chunk on its endpoint, reporting progress; whatever holds the GPU slot wraps this.

    The backend is made here, per chunk, by the one factory (make_backend) from the lane as it is now:
    an out-of-memory in an earlier chunk may have lowered num_ctx, which the embedded model is loaded
    with, and a client lives on the chunk's own event loop. `backend`: one made elsewhere (the tests' fake).
    """
    sampler.mark(f"{chunk.name} start")
    progress.chunk_started(chunk.index)  # a retry or another endpoint: earlier tries' rows stay counted
    stats: ChunkStats | None = None
    try:
        stats = run_chunk(
            lane,
            chunk,
            backend or make_backend(lane),
            on_progress=lambda done, errs: progress.update(chunk.index, done, errs),
            auto=auto,
            inputs=inputs,
        )
        return stats
    except (ChunkAborted, ChunkInterrupted) as exc:
        stats = exc.stats  # a failed or stopped try answered too
        raise
    finally:
        sampler.mark(f"{chunk.name} end")  # every try, failed ones too: the attempt's sending time
        if stats is not None and stats.first_answer_at is not None:
            sampler.mark(FIRST_ANSWER, at=stats.first_answer_at)


class Shard(NamedTuple):
    """A scale-out host's part of a job: its chunks, run in the parent's output directory."""

    chunks: list[int]
    label: str  # the host, as artifact keys take it (lowercase letters, digits, dashes)


class Checked(NamedTuple):
    sink: ChunkSink | None
    lanes: list[JobSettings]
    left_out: list[str]
    servers: list[ServerInfo]


def check_job(job: Job, steps: Steps, *, shard: bool = False, dry_run: bool = False, backends: bool = True) -> Checked:
    """Every check before a request is sent: the output directory, the sink, the backends.

    `dry_run` (the command line, before a Prefect server starts) changes nothing: a live run holding
    the directory is refused, and a missing sink table is left for the run to make. `backends=False`:
    a scale-out parent's, whose hosts each check their own backend when their shard starts.
    """
    out = job.settings.output_dir
    if dry_run:
        check_not_in_use(out)
    # A refused directory or an unreachable backend leaves output_dir as it was: planning pinned this
    # run's input there, which goes again unless it is the owning run's.
    try:
        check_output_dir(out, job.fingerprint, job.record, joining=shard)
    except OutputDirError:
        if job.plan.snapshot != pinned_snapshot(out):
            job.plan.snapshot.unlink(missing_ok=True)
        raise
    sink = steps.check_sink(job.settings, job.output_model, create=not dry_run)  # a refused sink sends nothing
    if not backends:
        return Checked(sink, [], [], [])
    lanes, left_out, servers = steps.check_backends(job.settings)
    for problem in left_out:
        steps.log.warning("endpoint left out of this run: %s", problem)
    return Checked(sink, lanes, left_out, servers)


def auto_key(lane: JobSettings) -> str:
    """What a remembered 'auto' level is for: the job, the server and the model."""
    return f"{lane.name} | {lane.server_label} | {lane.model}"


def auto_starts(lanes: list[JobSettings], history: Manifest | None) -> dict[int, dict[str, Any]]:
    """Where 'auto' starts on each endpoint: where an earlier attempt of this run left it, else at the
    level the last run of the same job settled on (watching, not searching), else nowhere (cold)."""
    earlier = sorted(
        (ChunkStats.model_validate(s) for s in (history.chunk_stats if history else []) if s.get("auto")),
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
            starts[i] = AutoState(
                ceiling=lane.in_flight_ceiling, level=min(level, lane.in_flight_ceiling), settled=True
            ).model_dump()
    return starts


def run_chunks(
    steps: Steps,
    settings: JobSettings,
    inputs: ChunkInputs,
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

    One endpoint: a failing chunk is retried on it (chunk_retries, by the steps). Several: the chunk
    moves to another endpoint at once, and the failing one sits out chunk_retry_delay_s before it
    may take another (chunk_retries times, then it is retired for the run).

    'auto' in-flight lives across an endpoint's chunks: each starts from the state the last one ended
    with (`auto`, by lane, holds the starting states), and the level it settles on is remembered
    beside output_dir for the next run of the job.
    """
    states = dict(auto or {})
    several = len(lanes) > 1
    chunk_steps = steps.retrying(0 if several else settings.chunk_retries)

    def run(lane: int, batch: list[ChunkSpec]) -> ChunkStats:
        try:
            return chunk_steps.run_chunk(lanes[lane], batch[0], inputs, progress, sampler, states.get(lane))
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
            # The endpoint's first answers without a grammar failed (tasks/inference/modes.py): its later
            # chunks start with the grammar instead of wasting requests to find that out again.
            lanes[lane] = lanes[lane].model_copy(update={"structured_output": "grammar"})
        if stats.num_ctx is not None and stats.num_ctx != lanes[lane].options.num_ctx:
            # Persistent out-of-memory lowered it: later chunks start there instead of failing again.
            options = lanes[lane].options.model_copy(update={"num_ctx": stats.num_ctx})
            lanes[lane] = lanes[lane].model_copy(update={"options": options})

    names = [lane.server_label for lane in lanes]
    dispatcher = Dispatcher(
        names,
        run,
        done,
        retries=settings.chunk_retries if several else 0,
        retry_delay_s=settings.chunk_retry_delay_s,
        sleep=partial(stopping.pause, where="while every endpoint sits out a failure"),
    )
    try:
        with steps.slots_kept():
            dispatcher(chunks)
    finally:
        notes.extend(dispatcher.events)


def _merged(previous: pl.DataFrame | None, new: pl.DataFrame) -> pl.DataFrame:
    return new if previous is None else pl.concat([previous, new], how="diagonal_relaxed")


def write_report(
    steps: Steps,
    job: Job,
    manifest: Manifest,
    stats: list[ChunkStats],
    sampler: Sampler,
    servers: list[ServerInfo],
    *,
    key: str,
    report_dir: Path,
) -> None:
    """Telemetry, chart and report of the whole job in report_dir (every attempt), then its artifacts;
    the figures a scale-out parent reads per host go into `manifest`."""
    settings, plan = job.settings, job.plan
    samples = _merged(read_parquet_or_none(report_dir / "telemetry" / "samples.parquet"), sampler.frame())
    marks = _merged(read_parquet_or_none(report_dir / "telemetry" / "marks.parquet"), sampler.marks())
    write_parquet_atomic(samples, report_dir / "telemetry" / "samples.parquet")
    write_parquet_atomic(marks, report_dir / "telemetry" / "marks.parquet")
    # A run stopped by a signal has seconds to exit: no chart (loading matplotlib and drawing takes
    # one to several seconds); the next run draws the whole job's, this attempt included.
    samples = of_gpus(samples, settings.gpus)  # from here on: the job's GPUs only
    chart = None if manifest.interrupted else timeline_png(samples, marks)
    if chart:
        write_atomic(report_dir / "timeline.png", lambda tmp: tmp.write_bytes(chart))
    first = manifest.attempts[0].started_at
    telemetry = summarize(samples, first, time.time(), warm_ups(marks)) if samples.height else {}
    # This run's energy: its own samples and the rows it finished (earlier attempts' are in their manifests).
    wh = energy_wh(of_gpus(sampler.frame(), settings.gpus))
    manifest.energy_wh = manifest.attempts[-1].energy_wh = rounded(wh, 3)
    manifest.wh_per_1000_rows = rounded(wh_per_1000_rows(wh, manifest.rows_sent), 3)
    evidence = build_evidence(
        settings,
        stats,
        plan.total_rows,
        manifest.rows_ok + manifest.rows_error,
        telemetry,
        error_kinds(settings.output_dir, plan.chunks),
        servers,
        level_readings(list(stats), samples) if samples.height else None,
        server_timed(settings.output_dir, plan.chunks),
    )
    verdict = judge(evidence)
    energy = {"energy_wh": manifest.energy_wh, "wh_per_1000_rows": manifest.wh_per_1000_rows}
    text = lambda image: render_report(  # noqa: E731
        settings,
        manifest,
        verdict,
        evidence,
        telemetry,
        samples,
        stats=stats,
        events=manifest.recoveries,
        report_dir=report_dir,
        image=image,
        energy=energy,
    )
    write_atomic(report_dir / "report.md", lambda tmp: tmp.write_text(text("timeline.png" if chart else None)))
    # The UI shows images given as data URIs inside markdown, so the chart travels with the artifact.
    inline = f"data:image/png;base64,{base64.b64encode(chart).decode()}" if chart else None
    table = [chunk_row(st, samples) for st in sorted(stats, key=lambda st: st.index)]
    steps.publish(key, text(inline), verdict.headline, table)
    manifest.verdict, manifest.headline = verdict.kind, verdict.headline
    manifest.requests_per_s = round(evidence.requests_per_s, 3)
    manifest.tokens_per_s = round(evidence.tokens_per_s, 1)
    manifest.telemetry = telemetry


def run_job(
    job: Job,
    steps: Steps,
    progress_sinks: list[ProgressSink],
    *,
    shard: Shard | None = None,
    checked: Checked | None = None,
) -> Manifest:
    """Score every row of the planned job (or of its `shard`); returns the manifest it wrote.

    A rerun resumes: finished chunks are skipped, a chunk cut short resumes after its journaled rows,
    and the manifest and report cover every attempt. `checked`: check_job's result when the caller
    ran it already. A stop (SIGINT, SIGTERM) raises stopping.Interrupted once the manifest is
    written, saying how many rows are on disk.
    """
    started = time.time()
    settings, plan, fingerprint, record = job.settings, job.plan, job.fingerprint, job.record
    out = settings.output_dir
    if shard is None:
        key, report_dir = settings.name, out
    else:
        plan = plan.shard(shard.chunks)
        job = job._replace(plan=plan)
        key, report_dir = f"{settings.name}-{shard.label}", out / "shards" / f"{shard.label}-{plan.chunks[0].name}"
    sink, lanes, left_out, servers = checked or check_job(job, steps, shard=shard is not None)
    hold = claim_output_dir(out, fingerprint, record) if shard is None else join_output_dir(out, fingerprint, record)
    with hold:
        history = Manifest.previous(report_dir, fingerprint)
        # What earlier runs left: damaged or foreign files set aside, torn journal lines counted.
        findings = [*plan.notes, *check_chunk_files(out, plan.chunks)]
        for finding in findings:
            steps.log.warning(finding)
        # Per chunk: a chunk's end then adds to the progress only the rows and error rows this attempt made.
        found = {c.index: rows_on_disk(out, c) for c in plan.chunks}
        rows_before = {i: rows.height for i, rows in found.items()}
        errors_before = {i: int((rows["status"] == "error").sum()) for i, rows in found.items()}
        done_before = sum(rows_before.values())
        tokens_before = sum(int(rows["completion_tokens"].sum() or 0) for rows in found.values())
        steps.log.info(
            "%d rows in %d chunks, %d already done; backend %s, model %s, %s in flight; each chunk holds the "
            "Prefect concurrency limit %s",
            plan.total_rows,
            len(plan.chunks),
            done_before,
            settings.backend,
            settings.model,
            settings.in_flight,
            ", ".join(f"'{lane.gpu_limit}'" for lane in lanes),
        )
        # Ollama's /api/ps says whether the model spilled to the CPU; the sampler polls each endpoint's.
        ollamas = [b for b in map(make_backend, lanes) if isinstance(b, OllamaBackend)]
        sampler = Sampler(interval_s=settings.telemetry_interval_s, model_memory=ollamas)
        progress = Progress(key, plan.total_rows, done_before, sum(errors_before.values()), sinks=progress_sinks)
        # Chunks an earlier attempt ran keep the figures it measured; this attempt's replace them.
        stats = {s["index"]: ChunkStats.model_validate(s) for s in (history.chunk_stats if history else [])}
        notes = [f"{time.strftime('%H:%M:%S')} left out at the start: {problem}" for problem in left_out]
        notes += [f"{time.strftime('%H:%M:%S')} {finding}" for finding in findings]
        ran: list[ChunkStats] = []  # chunk tries of this attempt that finished or were stopped: their events

        def deliver(chunk: ChunkSpec) -> None:
            """Hand a finished chunk to the sink's thread; a refusal is noted, and the next run delivers it."""
            if sink is None:
                return

            def delivered(future: Any) -> None:
                if future.exception() is not None or not future.result():
                    problem = f"sink: {chunk.name} not delivered, a rerun delivers it: "
                    problem += str(future.exception() or sink.failures.get(chunk.index))
                    steps.log.warning(problem)
                    notes.append(f"{time.strftime('%H:%M:%S')} {problem}")

            sink.deliver_later(chunk).add_done_callback(delivered)

        def chunk_done(chunk: ChunkSpec, st: ChunkStats) -> None:
            stats[st.index] = st
            ran.append(st)
            progress.chunk_done(st.index, st.rows - rows_before[st.index], st.errors - errors_before[st.index])
            deliver(chunk)

        sampler.start()
        sampler.mark(f"attempt {len(history.attempts) + 1 if history else 1} start")
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
                steps,
                settings,
                job.inputs,
                lanes,
                todo,
                progress,
                sampler,
                chunk_done,
                notes,
                auto_starts(lanes, history),
                ran.append,
            )
            if shard is None:
                steps.log.info("wrote %s", results := consolidate(out, plan.chunks, plan.total_rows))
                if wants_openai_output(settings):
                    target = out / "openai-output.jsonl"
                    steps.log.info("wrote %s", write_openai_output(results, target, settings.model, fingerprint))
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
            manifest = Manifest.counted(settings, plan, fingerprint, started, failure)
            if sink is not None:
                sink.close()  # deliveries of chunks that finished before a failure still count
                manifest.sink = sink.summary(plan.chunks)
            # Counted on disk, so a chunk try that failed (retried, moved to another endpoint, or the
            # run's end) counts its journaled rows, and the time while any chunk ran counts once.
            manifest.rows_sent = manifest.rows_ok + manifest.rows_error - done_before
            manifest.tokens_sent = manifest.tokens_on_disk - tokens_before
            manifest.sending_s = round(chunks_busy_s(sampler.marks()), 3)
            attempt = Attempt(
                started_at=started,
                finished_at=manifest.finished_at,
                wall_s=manifest.wall_s,
                rows_sent=manifest.rows_sent,
                complete=manifest.complete,
                error=manifest.error,
            )
            manifest.attempts = [*(history.attempts if history else []), attempt]
            manifest.recoveries = [
                *(history.recoveries if history else []),
                *notes,
                *(e for st in ran for e in st.events),
            ]
            manifest.servers = [dataclasses.asdict(info) for info in servers]
            manifest.chunk_stats = [st.model_dump(mode="json", exclude={"events"}) for _, st in sorted(stats.items())]
            manifest.interrupted = failure.signum.name if isinstance(failure, stopping.Interrupted) else None
            if shard is not None:
                manifest.results, manifest.host, manifest.shard_chunks = None, shard.label, shard.chunks
            manifest.write(report_dir)  # first without the report: drawing it may fail or be cut short
            write_report(steps, job, manifest, list(stats.values()), sampler, servers, key=key, report_dir=report_dir)
            manifest.write(report_dir)
            if isinstance(failure, stopping.Interrupted):
                # Counted by the manifest: the finished chunks, and the others' parts and journals.
                on_disk = manifest.rows_ok + manifest.rows_error
                failure.on_disk = f"{on_disk:,} rows on disk in {out}"
    return manifest
