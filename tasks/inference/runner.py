"""Run one chunk: keep N requests in flight, act on each failure as the policy says, journal rows as they finish."""

from __future__ import annotations

import asyncio
import functools
import signal
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ValidationError

from tasks import stopping
from tasks.inference.backends import Backend, BackendError, Reply, token_counter
from tasks.inference.calibrate import AutoState, InFlightAuto
from tasks.inference.modes import AutoProbe, RequestModes, decide, engine_of, needs_describe
from tasks.inference.policy import ChunkPolicy, RowTries, Step, watchdog_floor_s
from tasks.io.sources import output_model as job_output_model
from tasks.plan.dataset import ChunkSpec, job_snapshot, snapshot_response_format
from tasks.plan.job import ChunkInputs
from tasks.plan.prompts import PreparedRow, prepare_chunk
from tasks.schema import ChunkStats, ResultRow, output_columns, unstorable
from tasks.settings.model import GenerationOptions, JobSettings
from tasks.storage.journal import ChunkWriter, chunk_path, claim_chunk, clean_finished_parts, finished_rows

ProgressCallback = Callable[[int, int], None]  # (rows finished so far in this chunk, errors so far)

SYNC_GAP_S = 0.02  # journal fdatasyncs at most 50 times a second, however fast rows finish
AUTO_TICK_S = 0.5  # how often 'auto' hears the time while nothing comes back (a probe's early stop)


class ChunkAborted(RuntimeError):
    """The chunk cannot go on (backend unreachable past its budget, model missing).

    Rows finished before the abort are on disk; a retry or rerun resumes after them.
    """

    stats: ChunkStats | None = None  # what the try did before it was aborted

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable

    def __reduce__(self) -> tuple[object, ...]:
        # An exception pickles as cls(*args); retryable is keyword-only, so it travels in the partial.
        return (functools.partial(type(self), retryable=self.retryable), self.args, self.__dict__)


class ChunkInterrupted(stopping.Interrupted):
    """A signal stopped the chunk; `stats` counts the rows it journaled in this attempt (none retried)."""

    stats: ChunkStats | None = None


class _Stopped(Exception):
    """Inside the loop: a stop was asked before this row's next request went out; the row is left for a rerun."""


class _ChunkRun:
    """One chunk's asyncio run: the pool of workers, the journal's timing and the tallies."""

    def __init__(
        self,
        settings: JobSettings,
        backend: Backend,
        writer: ChunkWriter,
        output_model: type[BaseModel] | None,
        on_progress: ProgressCallback | None,
        auto: AutoState | None = None,
    ) -> None:
        self.settings, self.backend, self.writer = settings, backend, writer
        self.chunk = writer.chunk
        self.output_model = output_model
        self.schema = output_model.model_json_schema() if output_model else None
        # Until the engine is known (decide_modes, after the backend check): the grammar, no backend sampling.
        self.modes = RequestModes("grammar" if self.schema else None, False, self.schema)
        self.backend_sampled = 0  # requests sent with llama.cpp's backend sampling
        self.probe: AutoProbe | None = None  # structured_output 'auto' trying validation first
        self.engine: str | None = None
        self.on_progress = on_progress
        # 'auto': the controller names the level, carried on from the last chunk (or run) when given.
        self.auto = (
            InFlightAuto.start(settings.in_flight_ceiling, time.monotonic(), auto)
            if settings.in_flight == "auto"
            else None
        )
        ceiling = self.auto.level if self.auto else int(settings.in_flight)
        self.policy = ChunkPolicy(
            max_attempts=settings.max_attempts,
            outage_budget_s=settings.outage_budget_s,
            stall_timeout_s=max(
                settings.stall_timeout_s, watchdog_floor_s(settings.max_attempts, settings.request_timeout_s)
            ),
            oom_backoff_s=settings.oom_backoff_s,
            num_ctx=settings.options.num_ctx,
            num_ctx_floor=settings.oom_num_ctx_floor,
            ceiling=ceiling,
            limit=ceiling,
            last_progress=time.monotonic(),
        )
        self.options: GenerationOptions = settings.options  # replaced when persistent out-of-memory lowers num_ctx
        # When each in-flight level came into force (wall clock, as telemetry): the report reads the GPU per level.
        self.level_changes: list[tuple[float, int]] = [(time.time(), self.policy.limit)]
        self.first_answer_at: float | None = None  # wall clock, as telemetry's marks
        self.answered_level: list[int] = []  # beside self.latencies: the level its request went out at
        # Woken whenever a row is taken or finished or the in-flight limit moved: parked workers wait on it.
        self.changed = asyncio.Condition()
        self.flush_lock = asyncio.Lock()
        self.unsynced = asyncio.Event()  # rows journaled since the last fdatasync
        self.sending = 0  # requests out now
        self.finished = 0
        self.errors = 0
        self.requests = 0
        self.latencies: list[float] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.events: list[str] = []

    def note(self, text: str) -> None:
        self.events.append(f"{datetime.now(UTC):%H:%M:%S} {self.chunk.name}: {text}")

    async def _changed(self) -> None:
        """Take the policy's notes, carry out 'auto's level, and wake whoever waits on the limit or the row counts."""
        for text in self.policy.notes:
            self.note(text)
        self.policy.notes.clear()
        self._follow_auto()
        if self.policy.limit != self.level_changes[-1][1]:
            self.level_changes.append((time.time(), self.policy.limit))
        if self.policy.num_ctx != self.options.num_ctx:
            self.options = self.options.model_copy(update={"num_ctx": self.policy.num_ctx})
        async with self.changed:
            self.changed.notify_all()

    def _follow_auto(self) -> None:
        """Out of memory wins: a limit the policy lowered caps the controller; else the policy keeps its level."""
        if self.auto is None:
            return
        if self.policy.limit < self.policy.ceiling:  # below the level last set: out of memory lowered it
            self.auto.capped(self.policy.limit, time.monotonic())
        for text in self.auto.notes:
            self.note(text)
        self.auto.notes.clear()
        self.policy.ceiling = self.policy.limit = self.auto.level

    def _sent(self) -> int:
        """'auto' hears each request go out (ticket 0 without it)."""
        return self.auto.started(time.monotonic()) if self.auto else 0

    def _back(self, ticket: int, reply: Reply | None) -> None:
        """... and come back, with the tokens it generated (None: it failed)."""
        if self.auto is not None:
            self.auto.finished(ticket, time.monotonic(), (reply.completion_tokens or 0) if reply else None)

    def _row(self, row: PreparedRow, **fields: Any) -> ResultRow:
        return ResultRow(
            row_index=row.row_index,
            id=row.id,
            chunk=self.chunk.index,
            trimmed=row.trimmed,
            model=self.settings.model,
            finished_at=datetime.now(UTC),
            **fields,
        )

    def _ok_row(
        self, row: PreparedRow, reply: Reply, attempts: int, latency_ms: float, parsed: dict[str, Any] | None
    ) -> ResultRow:
        num_ctx = self.options.num_ctx
        return self._row(
            row,
            status="ok",
            attempts=attempts,
            response=reply.content,
            parsed=parsed,
            done_reason=reply.done_reason,
            # Ollama front-truncates an overlong prompt and still answers 200 (ollama#3839):
            # a prompt that fills the context is the only trace.
            truncated=reply.prompt_tokens is not None and reply.prompt_tokens >= num_ctx - max(32, num_ctx // 64),
            incomplete=reply.done_reason == "length",
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
            latency_ms=latency_ms,
            load_ms=reply.load_ms,
            prompt_eval_ms=reply.prompt_eval_ms,
            eval_ms=reply.eval_ms,
            total_ms=reply.total_ms,
        )

    def _error_row(self, row: PreparedRow, err: BackendError, attempts: int, reply: Reply | None) -> ResultRow:
        return self._row(
            row,
            status="error",
            error_kind=err.kind,
            error=str(err),
            attempts=attempts,
            # What came back is kept: a malformed answer's body, a schema-invalid answer's text.
            response=err.raw if err.raw is not None else reply.content if reply else None,
            done_reason=reply.done_reason if reply else None,
            prompt_tokens=reply.prompt_tokens if reply else None,
            completion_tokens=reply.completion_tokens if reply else None,
        )

    def _parse(self, reply: Reply) -> tuple[dict[str, Any] | None, BackendError | None]:
        if self.output_model is None:
            return None, None
        try:
            parsed = self.output_model.model_validate_json(reply.content).model_dump(mode="json")
            if (why := unstorable(parsed, self.writer.parsed_columns)) is not None:
                return None, BackendError("invalid_output", "retry", f"answer does not fit its columns: {why}")
            self._probed(True)
            return parsed, None
        except ValidationError as exc:
            self._probed(False)
            first = exc.errors()[0]
            message = f"answer does not match the schema: {first['loc']}: {first['msg']}"
            return None, BackendError("invalid_output", "retry", message)

    async def _unload(self) -> None:
        """Half-way to giving up on out-of-memory: unload the model, so the next request loads it
        into a GPU freed of it (a runner that survived an OOM can keep fragmented memory)."""
        try:
            await self.backend.unload()
        except BackendError as err:  # the retry that follows reports what is wrong
            self.note(f"unload failed: {err}")

    async def _ask(self, row: PreparedRow, tries: RowTries) -> Reply:
        """One request under a total deadline: httpx's timeout is per read, a slow trickle never trips it.

        It waits for a slot first: the in-flight limit counts requests, so a retry of a row already
        under way also waits while out-of-memory has the limit lowered, and is sent with the
        options (num_ctx) in force when it goes out.
        """
        async with self.changed:
            await self.changed.wait_for(lambda: self.sending < self.policy.limit or stopping.requested())
            if stopping.requested():  # no new request after a stop, not even a retry of a row under way
                raise _Stopped
            self.sending += 1
            tries.sent_at = self.policy.limit  # out of memory judges the level the request went out at
            tries.sent_clock = time.perf_counter()
        ticket = self._sent()
        reply: Reply | None = None
        try:
            # A row's own sampling settings (an OpenAI batch line) sit over the job's; none reloads the model.
            options = (self.options.model_copy(update=row.options) if row.options else self.options).for_request(
                tries.resamples
            )
            assert row.messages is not None  # process() answers rows without messages itself
            modes = self.modes
            self.backend_sampled += modes.backend_sampling
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns a result that arrives in the
            # same step as a cancel, and a worker cancelled by an aborting chunk went on taking rows.
            async with asyncio.timeout(self.settings.request_timeout_s):
                reply = await self.backend.chat(
                    modes.messages(row.messages), options=modes.options(options), schema=modes.engine_schema
                )
            return reply
        except TimeoutError as exc:
            raise BackendError(
                "timeout", "retry", f"no answer within request_timeout_s={self.settings.request_timeout_s:.0f}"
            ) from exc
        except BackendError:
            raise
        except Exception as exc:
            # A failure the backend does not classify (a client's or an engine's surprise) is this
            # row's problem: retried, then an error row, never the end of the chunk. Engine-wide
            # conditions reach here as BackendErrors (unreachable, fatal_job) and still stop it.
            raise BackendError("unexpected", "retry", f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.sending -= 1
            self._back(ticket, reply)

    async def decide_modes(self) -> None:
        """Grammar or validation, backend sampling or not: from the settings and what the engine is."""
        described = (await self.backend.describe()).engine if needs_describe(self.settings) else None
        engine = engine_of(self.settings, described)
        self.modes = decide(self.settings, engine, self.schema)
        self.engine = engine
        if self.settings.structured_output == "auto" and self.modes.structured == "validate":
            self.probe = AutoProbe()

    def _probed(self, valid: bool) -> None:
        """'auto': the first answers sent without a grammar decide whether the rest need one."""
        if self.probe is None or (keep := self.probe.answered(valid)) is None:
            return
        said = f"{self.probe.valid} of {self.probe.answers} answers without a grammar matched the schema"
        self.probe = None
        if keep:
            self.note(f"structured_output auto: {said}: validating, no grammar")
            return
        self.modes = self.modes.with_grammar()
        self.note(f"structured_output auto: {said}: the grammar from now on, retries included")

    async def process(self, row: PreparedRow) -> ResultRow:
        """One row to one result row; only a chunk-wide failure escapes, as ChunkAborted."""
        if row.messages is None:
            return self._row(row, status="error", error_kind="empty_field", error=row.error, attempts=0)
        tries = RowTries()
        last_error: BackendError | None = None
        last_reply: Reply | None = None
        while tries.charged() < self.settings.max_attempts:
            tries.attempts += 1
            self.requests += 1
            step: Step
            try:
                reply = await self._ask(row, tries)
            except BackendError as err:
                last_error = err
                step = self.policy.failed(err, tries, time.monotonic())
            else:
                self.policy.answered(time.monotonic())
                latency_ms = (time.perf_counter() - tries.sent_clock) * 1000  # not the wait for a slot
                self.latencies.append(latency_ms)
                if self.first_answer_at is None:
                    self.first_answer_at = time.time()
                self.answered_level.append(tries.sent_at)
                self.prompt_tokens += reply.prompt_tokens or 0
                self.completion_tokens += reply.completion_tokens or 0
                parsed, invalid = self._parse(reply)
                if invalid is None:
                    await self._changed()
                    return self._ok_row(row, reply, tries.attempts, latency_ms, parsed)
                last_error, last_reply = invalid, reply
                step = self.policy.invalid_output(tries)  # the retry asks with the next seed
            await self._changed()
            if step.unload:
                await self._unload()
            if step.do == "abort":
                raise ChunkAborted(step.message, retryable=step.retryable) from last_error
            if step.do == "error_row":
                break
            await asyncio.sleep(step.wait_s)
        assert last_error is not None
        return self._error_row(row, last_error, tries.attempts, last_reply)

    async def flush(self) -> None:
        async with self.flush_lock:
            rows, seq = self.writer.take()
            if rows:
                await asyncio.to_thread(self.writer.write_part, rows, seq)
            if self.on_progress is not None:
                # In a thread: Prefect's sync client calls must not run inside this event loop.
                await asyncio.to_thread(self.on_progress, self.finished, self.errors)

    async def worker(self, index: int, queue: asyncio.Queue[PreparedRow]) -> None:
        while True:
            async with self.changed:  # parked by out-of-memory (or 'auto') until the limit comes up
                await self.changed.wait_for(lambda: index < self.policy.limit or queue.empty() or stopping.requested())
            if queue.empty() or stopping.requested():
                return
            row = queue.get_nowait()
            try:
                result = await self.process(row)
            except _Stopped:
                return
            self.finished += 1
            self.errors += result.status == "error"
            due = self.writer.add(result)
            self.unsynced.set()
            await self._changed()
            if due:
                await self.flush()

    async def watch_auto(self) -> None:
        """'auto' hears the time while nothing comes back, so a probe that is already too slow ends."""
        assert self.auto is not None
        while True:
            await asyncio.sleep(AUTO_TICK_S)
            self.auto.tick(time.monotonic())
            await self._changed()

    async def sync_journal(self) -> None:
        """Group commit: fdatasync the journal when rows were added, at most every SYNC_GAP_S. Rows
        that finish meanwhile ride on the next sync, so a machine crash loses only rows that finished
        in the last few tens of milliseconds (and the ones in flight), at a thread hop per sync."""
        while True:
            await self.unsynced.wait()
            self.unsynced.clear()
            await asyncio.to_thread(self.writer.sync)
            await asyncio.sleep(SYNC_GAP_S)

    async def periodic_flush(self) -> None:
        """Checkpoint on time, and be the watchdog: no answer and no error for too long means stuck."""
        while True:
            await asyncio.sleep(min(self.settings.checkpoint_every_s, self.policy.stall_timeout_s / 4))
            await self.flush()
            step = self.policy.stalled(time.monotonic())
            await self._changed()
            if step is not None:
                raise ChunkAborted(step.message, retryable=step.retryable)

    async def wind_down(self, signum: signal.Signals, senders: list[asyncio.Task[None]], total: int) -> None:
        """A stop was asked: no new request goes out, those in flight get stopping.GRACE_S to answer
        (their rows are kept), then the chunk ends; the rows not journaled are sent by a rerun."""
        await self._changed()  # wakes parked workers and requests waiting for a slot: they see the stop
        in_flight = self.sending
        _, cut = await asyncio.wait(senders, timeout=stopping.GRACE_S)
        self.note(
            f"stopped by {signum.name} with {in_flight} request(s) in flight"
            + (f", {len(cut)} cut after {stopping.GRACE_S:.0f} s" if cut else "")
        )
        left = total - self.finished
        raise ChunkInterrupted(
            signum, f"in {self.chunk.name}: {self.finished} row(s) journaled in this attempt, {left} left for a rerun"
        )

    async def run(self, rows: list[PreparedRow]) -> None:
        queue: asyncio.Queue[PreparedRow] = asyncio.Queue()
        for row in rows:
            queue.put_nowait(row)
        flusher = asyncio.create_task(self.periodic_flush())
        syncer = asyncio.create_task(self.sync_journal())
        helpers = [syncer] + ([asyncio.create_task(self.watch_auto())] if self.auto is not None else [])
        senders = [asyncio.create_task(self.worker(i, queue)) for i in range(self.settings.in_flight_ceiling)]
        workers = list(senders)
        work = asyncio.gather(*workers)
        stop = asyncio.create_task(stopping.wait())
        try:
            waiting: set[asyncio.Future[Any]] = {work, flusher, stop}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if flusher in done:
                flusher.result()  # the watchdog fired
            # The workers read the request too, and may all have returned before `stop` polled it.
            if (signum := stopping.requested()) is not None and self.finished < len(rows):
                await self.wind_down(signum, senders, len(rows))
            await work  # a worker's ChunkAborted surfaces here
        finally:
            for task in [*workers, flusher, *helpers]:
                task.cancel()
            stop.cancel()
            await asyncio.gather(work, flusher, stop, *helpers, return_exceptions=True)
            await self.flush()  # finished rows reach disk even when the chunk aborts


def level_windows(
    changes: list[tuple[float, int]], end: float, answered_level: list[int], latencies: list[float]
) -> dict[int, dict[str, Any]] | None:
    """Per in-flight level the chunk ran at: its time windows [start, end] and the p50 latency of the
    answers whose requests went out at that level (not those that came back under the next one). None
    when the chunk kept one level: there is nothing to compare."""
    if len({level for _, level in changes}) < 2:
        return None
    windows: dict[int, list[list[float]]] = {}
    for (start, level), (stop, _) in zip(changes, [*changes[1:], (end, 0)], strict=True):
        windows.setdefault(level, []).append([start, stop])
    return {
        level: {
            "windows": spans,
            "latency_p50_ms": _percentile(
                [ms for n, ms in zip(answered_level, latencies, strict=True) if n == level], 50
            ),
        }
        for level, spans in windows.items()
    }


def _percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def _run_async(run: _ChunkRun, rows: list[PreparedRow]) -> None:
    await run.backend.open()
    try:
        while True:  # an outage that began at the hand-over gets the same budget as one mid-chunk
            try:
                if (signum := stopping.requested() or await stopping.or_stop(run.backend.check())) is not None:
                    raise ChunkInterrupted(signum, f"in {run.chunk.name} before its first request")
                break
            except BackendError as err:
                if err.action in ("fatal_job", "fatal_row"):
                    raise ChunkAborted(str(err), retryable=False) from err
                # Down, dropping connections or busy at the hand-over: wait within the outage budget.
                step = run.policy.outage(err, time.monotonic())
                if step.do == "abort":
                    raise ChunkAborted(step.message or str(err), retryable=True) from err
                await stopping.sleep_async(step.wait_s)
        run.policy.reachable(time.monotonic())
        await run.decide_modes()
        await run.run(rows)
    finally:
        await run.backend.close()


def finished_chunk_stats(settings: JobSettings, chunk: ChunkSpec) -> ChunkStats | None:
    """Stats of a chunk an earlier run finished (its leftovers cleaned), or None if it has work left."""
    clean_finished_parts(settings.output_dir, chunk)
    if not chunk_path(settings.output_dir, chunk).exists():
        return None
    now = time.time()
    return ChunkStats(index=chunk.index, rows=chunk.length, resumed_rows=chunk.length, started_at=now, finished_at=now)


def inputs_of(settings: JobSettings) -> ChunkInputs:
    """A chunk run on its own, without its run's plan: the snapshot its output directory pins, and its output model."""
    snapshot = job_snapshot(settings)
    return ChunkInputs(snapshot, job_output_model(settings, snapshot_response_format(snapshot)))


def run_chunk(
    settings: JobSettings,
    chunk: ChunkSpec,
    backend: Backend,
    on_progress: ProgressCallback | None = None,
    auto: dict[str, Any] | None = None,
    inputs: ChunkInputs | None = None,
) -> ChunkStats:
    """Process every row of `chunk` not yet on disk with `backend` (opened and closed here); write the chunk file.

    `auto`: the 'auto' in-flight state the last chunk on this endpoint ended with (ChunkStats.auto).
    `inputs`: the run's (Job.inputs); a chunk run on its own works them out from its output directory.
    """
    with claim_chunk(settings.output_dir, chunk):
        if (finished := finished_chunk_stats(settings, chunk)) is not None:
            return finished
        state = AutoState.model_validate(auto) if auto else None
        return _run_claimed(settings, chunk, backend, on_progress, state, inputs or inputs_of(settings))


def _run_claimed(
    settings: JobSettings,
    chunk: ChunkSpec,
    backend: Backend,
    on_progress: ProgressCallback | None,
    auto: AutoState | None,
    inputs: ChunkInputs,
) -> ChunkStats:
    out = settings.output_dir
    started = time.time()
    snapshot, output_model = inputs
    writer = ChunkWriter(
        out, chunk, output_columns(output_model), settings.checkpoint_rows, settings.checkpoint_every_s
    )
    done = finished_rows(out, chunk)  # after the writer turned a killed run's journal into parts
    run = _ChunkRun(settings, backend, writer, output_model, on_progress, auto)
    try:
        try:
            rows = prepare_chunk(settings, chunk, skip=done, count_tokens=token_counter(settings), snapshot=snapshot)
        except BackendError as err:  # the server's tokenizer, for trimming, did not answer
            raise ChunkAborted(str(err), retryable=True) from err
        asyncio.run(_run_async(run, rows))
    except (ChunkInterrupted, ChunkAborted) as exc:
        # The figures of what this try did before the signal or the abort (its events reach the manifest,
        # its first answer and tokens the run's figures).
        exc.stats = _stats(
            run, settings, chunk, started, len(done), run.finished, run.finished - run.errors, run.errors
        )
        raise
    finally:
        writer.close()  # idempotent; on failure the finished rows are already journaled or checkpointed
    frame = writer.finish()
    by_status = frame["status"].value_counts()
    status_counts = dict(zip(by_status["status"].to_list(), by_status["count"].to_list(), strict=True))
    ok, errors = status_counts.get("ok", 0), status_counts.get("error", 0)
    # Rows answered without a request (an empty template field) are not the engine's work: left out of
    # the rates the ETA is built on.
    sent = sum(row.messages is not None for row in rows)
    return _stats(run, settings, chunk, started, len(done), sent, ok, errors)


def _stats(
    run: _ChunkRun,
    settings: JobSettings,
    chunk: ChunkSpec,
    started: float,
    resumed: int,
    sent: int,
    ok: int,
    errors: int,
) -> ChunkStats:
    return ChunkStats(
        index=chunk.index,
        rows=chunk.length,
        endpoint=settings.server_label,
        resumed_rows=resumed,
        sent_rows=sent,
        ok=ok,
        errors=errors,
        requests=run.requests,
        prompt_tokens=run.prompt_tokens,
        completion_tokens=run.completion_tokens,
        latency_p50_ms=_percentile(run.latencies, 50),
        latency_p95_ms=_percentile(run.latencies, 95),
        in_flight=run.auto.state.level if run.auto else run.policy.ceiling,
        num_ctx=run.options.num_ctx,
        calibration=(run.auto.curve() or None) if run.auto else None,
        levels=level_windows(run.level_changes, time.time(), run.answered_level, run.latencies),
        engine=run.engine,
        structured_output=run.modes.structured,
        backend_sampling_requests=run.backend_sampled,
        auto=run.auto.state.model_dump(mode="json") if run.auto else None,
        started_at=started,
        finished_at=time.time(),
        first_answer_at=run.first_answer_at,
        events=run.events,
    )
