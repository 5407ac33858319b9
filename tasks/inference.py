"""Run one chunk: keep N requests in flight, retry by failure kind, checkpoint rows as they finish."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from tasks.backends import Backend, BackendError, Reply, make_backend, token_counter
from tasks.config import JobSettings
from tasks.dataset import ChunkSpec, PreparedRow, prepare_chunk
from tasks.schema import ResultRow, output_columns
from tasks.sources import output_model as job_output_model
from tasks.store import ChunkWriter, chunk_path, claim_chunk, clean_finished_parts, finished_rows

ProgressCallback = Callable[[int, int], None]  # (rows finished so far in this chunk, errors so far)


class ChunkAborted(RuntimeError):
    """The chunk cannot go on (backend unreachable past its budget, model missing).

    Rows finished before the abort are on disk; a retry or rerun resumes after them.
    """

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class ChunkStats(BaseModel):
    """What one chunk did in this run; the flow joins it with telemetry for the report."""

    index: int
    rows: int = Field(description="Rows in the chunk.")
    endpoint: str | None = Field(None, description="Where the chunk ran: an Ollama URL or 'embedded'.")
    resumed_rows: int = Field(0, description="Rows already on disk from an earlier run, not sent again.")
    sent_rows: int = Field(0, description="Rows processed in this run.")
    ok: int = 0
    errors: int = 0
    errors_by_kind: dict[str, int] = Field(default_factory=dict)
    requests: int = Field(0, description="Requests sent, retries included.")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    in_flight: int = Field(1, description="Requests kept in flight (what 'auto' chose, if it ran).")
    num_ctx: int | None = Field(None, description="options.num_ctx in force at the end (lowered by persistent OOM).")
    calibration: dict[int, float] | None = Field(None, description="'auto' measurements: level -> throughput.")
    started_at: float = 0.0
    finished_at: float = 0.0
    events: list[str] = Field(default_factory=list, description="Recoveries and back-offs, with times.")

    @property
    def seconds(self) -> float:
        return max(self.finished_at - self.started_at, 1e-9)


OOM_STREAK_LIMIT = 6  # out-of-memory answers in a row at 1 in flight before the chunk gives up
SYNC_GAP_S = 0.02  # journal fdatasyncs at most 50 times a second, however fast rows finish
RAISE_AFTER = 50  # answers in a row before a slot taken away by out-of-memory is given back


def _backoff(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Capped exponential back-off with jitter, so retries from many slots do not align."""
    return min(cap, base * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)


class _ChunkRun:
    """State of one chunk's asyncio run: the pool of workers and what they share."""

    def __init__(
        self,
        settings: JobSettings,
        backend: Backend,
        chunk: ChunkSpec,
        writer: ChunkWriter,
        output_model: type[BaseModel] | None,
        on_progress: ProgressCallback | None,
    ) -> None:
        self.settings = settings
        self.options = settings.options  # replaced when persistent out-of-memory lowers num_ctx
        self.backend = backend
        self.chunk = chunk
        self.writer = writer
        self.output_model = output_model
        self.schema = output_model.model_json_schema() if output_model else None
        self.on_progress = on_progress
        # The level the chunk aims for (what 'auto' chose), and the one in force (lowered on OOM).
        self.ceiling = settings.workers if settings.in_flight == "auto" else int(settings.in_flight)
        self.limit = 1 if settings.in_flight == "auto" else self.ceiling
        self.calibration: dict[int, float] | None = None
        self.calibrating = settings.in_flight == "auto"
        self.unreachable_since: float | None = None
        self.flush_lock = asyncio.Lock()
        self.unsynced = asyncio.Event()  # rows journaled since the last fdatasync
        self.finished = 0
        self.errors = 0
        self.requests = 0
        self.latencies: list[float] = []
        self.kinds: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.events: list[str] = []
        self.oom_streak = 0
        self.ok_streak = 0
        self.last_progress = time.monotonic()  # any answer or error from the backend counts

    def _on_success(self) -> None:
        """After out-of-memory, win back one in-flight slot per RAISE_AFTER answers in a row."""
        self.ok_streak += 1
        if self.limit < self.ceiling and self.ok_streak >= RAISE_AFTER and not self.calibrating:
            self.limit += 1
            self.ok_streak = 0
            self.note(f"{RAISE_AFTER} answers in a row since out-of-memory: in-flight raised to {self.limit}")

    def _on_oom(self, err: BackendError) -> None:
        """Fewer sequences need less KV cache: halve in-flight; give up when even one keeps failing."""
        self.oom_streak += 1
        self.ok_streak = 0
        if self.limit > 1:
            self.limit = max(1, self.limit // 2)
            self.note(f"out of memory, in-flight lowered to {self.limit}, backing off: {err}")
        else:
            self.note(f"out of memory at 1 in flight ({self.oom_streak} in a row), backing off: {err}")
        if self.limit == 1 and self.oom_streak >= OOM_STREAK_LIMIT:
            floor, old = self.settings.oom_num_ctx_floor, self.options.num_ctx
            if floor is not None and old // 2 >= floor:
                # Ollama sizes the KV cache as num_ctx x OLLAMA_NUM_PARALLEL at load: a smaller
                # context is the one lever left, at the price of a reload and of longer prompts.
                self.options = self.options.model_copy(update={"num_ctx": old // 2})
                self.oom_streak = 0
                self.note(
                    f"out of memory persists at 1 in flight: num_ctx {old} -> {old // 2} (the model reloads; "
                    "prompts longer than that are now cut and flagged truncated)"
                )
                return
            raise ChunkAborted(
                f"persistent out of memory: {self.oom_streak} requests in a row failed with 1 in flight ({err}). "
                "Lower options.num_ctx, OLLAMA_NUM_PARALLEL or the model size, or free the GPU, then rerun: "
                "finished rows are kept.",
                retryable=False,
            )

    def note(self, text: str) -> None:
        self.events.append(f"{datetime.now(UTC):%H:%M:%S} {self.chunk.name}: {text}")

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

    async def _unload(self) -> None:
        """Half-way to giving up on out-of-memory: unload the model, so the next request loads it
        into a GPU freed of it (a runner that survived an OOM can keep fragmented memory)."""
        self.note("out of memory persists: unloading the model (keep_alive 0); the next request loads it")
        try:
            await self.backend.unload()
        except BackendError as err:  # the retry that follows reports what is wrong
            self.note(f"unload failed: {err}")

    async def _wait_for_backend(self, err: BackendError) -> None:
        """Server down: wait with capped back-off, fail the chunk once the outage budget is spent."""
        now = time.monotonic()
        if self.unreachable_since is None:
            self.unreachable_since = now
            self.note(f"backend unreachable, waiting up to {self.settings.outage_budget_s:.0f}s: {err}")
        down_for = now - self.unreachable_since
        if down_for >= self.settings.outage_budget_s:
            raise ChunkAborted(
                f"{err} (for {down_for:.0f}s, outage_budget_s={self.settings.outage_budget_s:g})", retryable=True
            )
        await asyncio.sleep(min(5.0, self.settings.outage_budget_s - down_for, 0.5 + down_for / 4))

    async def _ask(self, row: PreparedRow, resamples: int) -> Reply:
        """One request under a total deadline: httpx's timeout is per read, a slow trickle never trips it."""
        # A row's own sampling settings (an OpenAI batch line) sit over the job's; none reloads the model.
        options = (self.options.model_copy(update=row.options) if row.options else self.options).for_request(resamples)
        messages = row.messages
        assert messages is not None
        try:
            return await asyncio.wait_for(
                self.backend.chat(messages, options=options, schema=self.schema), self.settings.request_timeout_s
            )
        except TimeoutError as exc:
            raise BackendError(
                "timeout", "retry", f"no answer within request_timeout_s={self.settings.request_timeout_s:.0f}"
            ) from exc

    async def process(self, row: PreparedRow) -> ResultRow:
        """One row to one result row; only a job-wide failure escapes as an exception."""
        if row.messages is None:
            self.kinds["empty_field"] += 1
            return self._row(row, status="error", error_kind="empty_field", error=row.error, attempts=0)
        attempts = 0
        free = 0  # out-of-memory answers not charged to the row (the GPU's state, not the row's)
        resamples = 0  # schema-invalid answers so far: each retry samples differently
        last_error: BackendError | None = None
        last_reply: Reply | None = None
        while attempts - free < self.settings.max_attempts:
            attempts += 1
            self.requests += 1
            started = time.perf_counter()
            try:
                reply = await self._ask(row, resamples)
            except BackendError as err:
                last_error = err
                if err.action == "fatal_job":
                    raise ChunkAborted(str(err), retryable=False) from err
                if err.action == "fatal_row":
                    break
                if err.action == "unreachable":
                    attempts -= 1  # an outage is not the row's fault; the outage budget bounds it
                    await self._wait_for_backend(err)
                    continue
                self.unreachable_since = None
                self.last_progress = time.monotonic()
                if err.action == "oom":
                    self._on_oom(err)
                    if self.oom_streak == OOM_STREAK_LIMIT // 2:
                        await self._unload()
                    # While the chunk adapts (fewer in flight, a smaller num_ctx) a row is not
                    # charged for the first few; the chunk's OOM streak bounds the whole.
                    if free < OOM_STREAK_LIMIT:
                        free += 1
                if attempts - free < self.settings.max_attempts:
                    # A GPU that ran out of memory needs the model reloaded (seconds for a 12B model).
                    base = {"oom": self.settings.oom_backoff_s, "backoff": 2.0}.get(err.action, 0.5)
                    await asyncio.sleep(_backoff(attempts, base=base))
                continue
            self.unreachable_since = None
            self.oom_streak = 0
            self.last_progress = time.monotonic()
            self._on_success()
            latency_ms = (time.perf_counter() - started) * 1000
            self.latencies.append(latency_ms)
            self.prompt_tokens += reply.prompt_tokens or 0
            self.completion_tokens += reply.completion_tokens or 0
            parsed = None
            if self.output_model is not None:
                try:
                    parsed = self.output_model.model_validate_json(reply.content).model_dump(mode="json")
                except ValidationError as exc:
                    # Ollama does not always honour `format` (ollama#8063); retry with the next seed.
                    last_reply = reply
                    resamples += 1
                    first = exc.errors()[0]
                    last_error = BackendError(
                        "invalid_output", "retry", f"answer does not match the schema: {first['loc']}: {first['msg']}"
                    )
                    continue
            return self._ok_row(row, reply, attempts, latency_ms, parsed)
        assert last_error is not None
        self.kinds[last_error.kind] += 1
        return self._row(
            row,
            status="error",
            error_kind=last_error.kind,
            error=str(last_error),
            attempts=attempts,
            response=last_reply.content if last_reply else None,
            done_reason=last_reply.done_reason if last_reply else None,
            prompt_tokens=last_reply.prompt_tokens if last_reply else None,
            completion_tokens=last_reply.completion_tokens if last_reply else None,
        )

    async def flush(self) -> None:
        async with self.flush_lock:
            rows, seq = self.writer.take()
            if rows:
                await asyncio.to_thread(self.writer.write_part, rows, seq)
            if self.on_progress is not None:
                # In a thread: Prefect's sync client calls must not run inside this event loop.
                await asyncio.to_thread(self.on_progress, self.finished, self.errors)

    async def worker(self, index: int, queue: asyncio.Queue[PreparedRow]) -> None:
        while not queue.empty():
            if index >= self.limit:  # parked by out-of-memory until the limit comes back up
                await asyncio.sleep(0.2)
                continue
            row = queue.get_nowait()
            result = await self.process(row)
            self.finished += 1
            self.errors += result.status == "error"
            due = self.writer.add(result)
            self.unsynced.set()
            if due:
                await self.flush()

    async def calibrate(self, queue: asyncio.Queue[PreparedRow]) -> None:
        """'auto' in-flight: raise the level 1, 2, 4 ... while total throughput still grows.

        Each level is measured over 8 x level rows of the real work (nothing is wasted), with
        the pool kept full, and the smallest level within 3 % of the best one wins: more
        in flight only adds latency (and KV cache) once the backend's slots are saturated.
        """
        curve: dict[int, float] = {}
        level = 1
        while True:
            self.limit = level
            tokens, rows, started = self.completion_tokens, self.finished, time.monotonic()
            while self.finished - rows < 8 * level and not queue.empty() and self.limit == level:
                await asyncio.sleep(0.01)
            if self.limit != level or self.finished - rows < 8 * level:
                break  # out of memory changed the level, or the rows ran out: keep what was measured
            elapsed = time.monotonic() - started
            generated = self.completion_tokens - tokens
            curve[level] = generated / elapsed if generated else (self.finished - rows) / elapsed
            previous = curve.get(level // 2)
            if level * 2 > self.ceiling or (previous is not None and curve[level] < previous * 1.05):
                break
            level *= 2
        self.calibrating = False
        if not curve:  # too few rows to measure even one level: stay where we are
            self.ceiling = self.limit
        else:
            best = max(curve.values())
            self.ceiling = min(n for n, v in curve.items() if v >= 0.97 * best)
            oom_lowered = self.limit != level
            self.limit = min(self.limit, self.ceiling) if oom_lowered else self.ceiling
            self.calibration = curve
            unit = "tokens/s" if self.completion_tokens else "rows/s"
            shown = ", ".join(f"{n}: {v:.1f}" for n, v in curve.items())
            self.note(f"auto in-flight: {unit} by level {{{shown}}} -> {self.ceiling} in flight")

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
        stall_s = self.settings.stall_timeout_s
        while True:
            await asyncio.sleep(min(self.settings.checkpoint_every_s, stall_s / 4))
            await self.flush()
            quiet = time.monotonic() - self.last_progress
            if quiet > stall_s and self.unreachable_since is None:
                self.note(f"watchdog: nothing came back for {quiet:.0f}s")
                raise ChunkAborted(
                    f"watchdog: no request finished or failed for {quiet:.0f}s (stall_timeout_s={stall_s:.0f}); "
                    "the backend looks hung",
                    retryable=True,
                )

    async def run(self, rows: list[PreparedRow]) -> None:
        queue: asyncio.Queue[PreparedRow] = asyncio.Queue()
        for row in rows:
            queue.put_nowait(row)
        flusher = asyncio.create_task(self.periodic_flush())
        syncer = asyncio.create_task(self.sync_journal())
        workers = [asyncio.create_task(self.worker(i, queue)) for i in range(self.settings.workers)]
        if self.settings.in_flight == "auto":
            workers.append(asyncio.create_task(self.calibrate(queue)))
        work = asyncio.gather(*workers)
        try:
            done, _ = await asyncio.wait({work, flusher}, return_when=asyncio.FIRST_COMPLETED)
            if flusher in done:
                flusher.result()  # the watchdog fired
            await work  # a worker's ChunkAborted surfaces here
        finally:
            for task in workers:
                task.cancel()
            flusher.cancel()
            syncer.cancel()
            await asyncio.gather(work, flusher, syncer, return_exceptions=True)
            await self.flush()  # finished rows reach disk even when the chunk aborts


def _percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def _run_chunk_async(
    settings: JobSettings,
    chunk: ChunkSpec,
    rows: list[PreparedRow],
    writer: ChunkWriter,
    output_model: type[BaseModel] | None,
    on_progress: ProgressCallback | None,
) -> _ChunkRun:
    backend = make_backend(settings)
    await backend.open()
    run = _ChunkRun(settings, backend, chunk, writer, output_model, on_progress)
    try:
        try:
            await backend.check()
        except BackendError as err:
            raise ChunkAborted(str(err), retryable=err.action == "unreachable") from err
        await run.run(rows)
    finally:
        await backend.close()
    return run


def finished_chunk_stats(settings: JobSettings, chunk: ChunkSpec) -> ChunkStats | None:
    """Stats of a chunk an earlier run finished (its leftovers cleaned), or None if it has work left."""
    clean_finished_parts(settings.output_dir, chunk)
    if not chunk_path(settings.output_dir, chunk).exists():
        return None
    now = time.time()
    return ChunkStats(index=chunk.index, rows=chunk.length, resumed_rows=chunk.length, started_at=now, finished_at=now)


def run_chunk(settings: JobSettings, chunk: ChunkSpec, on_progress: ProgressCallback | None = None) -> ChunkStats:
    """Process every row of `chunk` not yet on disk and write the chunk file."""
    with claim_chunk(settings.output_dir, chunk):
        if (finished := finished_chunk_stats(settings, chunk)) is not None:
            return finished
        return _run_claimed(settings, chunk, on_progress)


def _run_claimed(settings: JobSettings, chunk: ChunkSpec, on_progress: ProgressCallback | None) -> ChunkStats:
    out = settings.output_dir
    started = time.time()
    output_model = job_output_model(settings, chunk.source)
    writer = ChunkWriter(
        out, chunk, output_columns(output_model), settings.checkpoint_rows, settings.checkpoint_every_s
    )
    done = finished_rows(out, chunk)  # after the writer turned a killed run's journal into parts
    rows = prepare_chunk(settings, chunk, skip=done, count_tokens=token_counter(settings))
    try:
        run = asyncio.run(_run_chunk_async(settings, chunk, rows, writer, output_model, on_progress))
    finally:
        writer.close()  # idempotent; on failure the finished rows are already journaled or checkpointed
    frame = writer.finish()
    by_status = frame["status"].value_counts()
    status_counts = dict(zip(by_status["status"].to_list(), by_status["count"].to_list(), strict=True))
    return ChunkStats(
        index=chunk.index,
        rows=chunk.length,
        endpoint=settings.ollama_base_url if settings.backend == "ollama" else "embedded",
        resumed_rows=len(done),
        sent_rows=len(rows),
        ok=status_counts.get("ok", 0),
        errors=status_counts.get("error", 0),
        errors_by_kind=dict(run.kinds),
        requests=run.requests,
        prompt_tokens=run.prompt_tokens,
        completion_tokens=run.completion_tokens,
        latency_p50_ms=_percentile(run.latencies, 50),
        latency_p95_ms=_percentile(run.latencies, 95),
        in_flight=run.ceiling,
        num_ctx=run.options.num_ctx,
        calibration=run.calibration,
        started_at=started,
        finished_at=time.time(),
        events=run.events,
    )
