"""What a chunk does after each answer or failure: wait, lower in-flight, resample, give up.

Pure: no I/O, no asyncio, no clock. The runner passes the time in and carries out the Step.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from tasks.inference.backends.protocol import BackendError

OOM_STREAK_LIMIT = 6  # out-of-memory answers in a row at 1 in flight before the chunk gives up
RAISE_AFTER = 50  # answers in a row before a slot taken away by out-of-memory is given back


def backoff(attempt: int, base: float, jitter: float, cap: float = 30.0) -> float:
    """Capped exponential back-off; `jitter` in [0, 1) spreads retries so many slots do not align."""
    return min(cap, base * 2 ** (attempt - 1)) * (0.5 + jitter / 2)


def watchdog_floor_s(max_attempts: int, request_timeout_s: float) -> float:
    """The least time the watchdog waits: as long as a row whose every request times out takes to become an
    error row (its requests and the longest back-offs between them). Timeouts are not progress, and at 1 in
    flight nothing else answers meanwhile: one slow row must end as an error row, not fail the chunk."""
    return max_attempts * request_timeout_s + sum(backoff(a, 0.5, 1.0) for a in range(1, max_attempts)) + 1.0


@dataclass(frozen=True)
class Step:
    """What to do next with the row: send it again after `wait_s`, give it an error row, or stop the chunk."""

    do: Literal["retry", "error_row", "abort"]
    wait_s: float = 0.0
    unload: bool = False  # unload the model before the retry (out-of-memory, half-way to giving up)
    retryable: bool = False  # for "abort": whether waiting (a Prefect retry, a rerun) can help
    message: str = ""


@dataclass
class RowTries:
    """One row's attempts: out-of-memory answers are not charged to it (the GPU's state, not the row's)."""

    attempts: int = 0  # requests sent for the row
    free: int = 0  # of those, out-of-memory answers not charged
    resamples: int = 0  # schema-invalid answers so far: each retry samples with the next seed
    sent_at: int = 1  # the in-flight limit in force when its last request went out
    sent_clock: float = 0.0  # time.perf_counter() when its last request went out (after waiting for a slot)

    def charged(self) -> int:
        return self.attempts - self.free


@dataclass
class ChunkPolicy:
    """The chunk's shared state for retries: in-flight level, OOM streak, outage start, last progress."""

    max_attempts: int
    outage_budget_s: float
    stall_timeout_s: float
    oom_backoff_s: float
    num_ctx: int  # lowered by persistent out-of-memory when num_ctx_floor allows
    num_ctx_floor: int | None
    ceiling: int  # the level the chunk aims for ('auto' sets it, and the limit, to its level)
    limit: int  # the level in force (lowered on out-of-memory)
    last_progress: float = 0.0  # an answer or an error from the backend; a timeout is neither
    jitter: Callable[[], float] = random.random
    unreachable_since: float | None = None
    oom_streak: int = 0
    ok_streak: int = 0
    notes: list[str] = field(default_factory=list)  # what changed, in order; the runner stamps and keeps them

    def answered(self, now: float) -> None:
        """A reply came back; after out-of-memory, win back one slot per RAISE_AFTER answers in a row."""
        self.unreachable_since = None
        self.oom_streak = 0
        self.last_progress = now
        self.ok_streak += 1
        if self.limit < self.ceiling and self.ok_streak >= RAISE_AFTER:
            self.limit += 1
            self.ok_streak = 0
            self.notes.append(f"{RAISE_AFTER} answers in a row since out-of-memory: in-flight raised to {self.limit}")

    def invalid_output(self, tries: RowTries) -> Step:
        """The answer did not match the schema (Ollama does not always honour `format`, ollama#8063)."""
        tries.resamples += 1
        return Step("retry") if tries.charged() < self.max_attempts else Step("error_row")

    def failed(self, err: BackendError, tries: RowTries, now: float) -> Step:
        """A request of `tries` (already counted in it) failed with `err`."""
        if err.action == "fatal_job":
            return Step("abort", message=str(err))
        if err.action == "fatal_row":
            return Step("error_row")
        if err.action == "unreachable":
            tries.attempts -= 1  # an outage is not the row's fault; the outage budget bounds it
            return self.outage(err, now)
        self.unreachable_since = None
        if err.kind != "timeout":  # a server that answers nothing times every request out: the watchdog's case
            self.last_progress = now
        unload = False
        if err.action == "oom":
            if (stop := self._oom(err, tries.sent_at)) is not None:
                return stop
            unload = self.oom_streak == OOM_STREAK_LIMIT // 2
            if unload:
                self.notes.append(
                    "out of memory persists: unloading the model (keep_alive 0); the next request loads it"
                )
            # While the chunk adapts (fewer in flight, a smaller num_ctx) a row is not charged for
            # the first few; the chunk's OOM streak bounds the whole.
            if tries.free < OOM_STREAK_LIMIT:
                tries.free += 1
        if tries.charged() >= self.max_attempts:
            return Step("error_row", unload=unload)
        # A GPU that ran out of memory needs the model reloaded (seconds for a 12B model).
        base = {"oom": self.oom_backoff_s, "backoff": 2.0}.get(err.action, 0.5)
        return Step("retry", wait_s=backoff(tries.attempts, base, self.jitter()), unload=unload)

    def reachable(self, now: float) -> None:
        """The backend answered its check: an outage is over, and the watchdog counts from now."""
        self.unreachable_since = None
        self.last_progress = now

    def outage(self, err: BackendError, now: float) -> Step:
        """Server down: wait with capped back-off; stop the chunk once the outage budget is spent."""
        if self.unreachable_since is None:
            self.unreachable_since = now
            self.notes.append(f"backend unreachable, waiting up to {self.outage_budget_s:.0f}s: {err}")
        down_for = now - self.unreachable_since
        if down_for >= self.outage_budget_s:
            message = f"{err} (for {down_for:.0f}s, outage_budget_s={self.outage_budget_s:g})"
            return Step("abort", retryable=True, message=message)
        return Step("retry", wait_s=min(5.0, self.outage_budget_s - down_for, 0.5 + down_for / 4))

    def _oom(self, err: BackendError, sent_at: int) -> Step | None:
        """Fewer sequences need less KV cache: halve in-flight; give up when even one keeps failing.

        `sent_at`: the limit when the failed request went out. A runner that dies fails every request in
        flight at once: the burst halves the level once (to half the level they went out at), and only
        requests that went out at 1 in flight count towards giving up."""
        self.ok_streak = 0
        if sent_at > 1:
            if (lowered := max(1, sent_at // 2)) < self.limit:
                self.limit = lowered
                self.notes.append(f"out of memory, in-flight lowered to {self.limit}, backing off: {err}")
            return None
        self.oom_streak += 1
        self.limit = 1
        self.notes.append(f"out of memory at 1 in flight ({self.oom_streak} in a row), backing off: {err}")
        if self.oom_streak < OOM_STREAK_LIMIT:
            return None
        old = self.num_ctx
        if self.num_ctx_floor is not None and old // 2 >= self.num_ctx_floor:
            # Ollama sizes the KV cache as num_ctx x OLLAMA_NUM_PARALLEL at load: a smaller context
            # is the one lever left, at the price of a reload and of longer prompts.
            self.num_ctx = old // 2
            self.oom_streak = 0
            self.notes.append(
                f"out of memory persists at 1 in flight: num_ctx {old} -> {self.num_ctx} (the model reloads; "
                "prompts longer than that are now cut and flagged truncated)"
            )
            return None
        return Step(
            "abort",
            message=f"persistent out of memory: {self.oom_streak} requests in a row failed with 1 in flight ({err}). "
            "Lower options.num_ctx, OLLAMA_NUM_PARALLEL or the model size, or free the GPU, then rerun: "
            "finished rows are kept.",
        )

    def stalled(self, now: float) -> Step | None:
        """The watchdog: no answer and no error but timeouts for stall_timeout_s (an outage has its own budget)."""
        quiet = now - self.last_progress
        if quiet <= self.stall_timeout_s or self.unreachable_since is not None:
            return None
        self.notes.append(f"watchdog: nothing came back for {quiet:.0f}s")
        return Step(
            "abort",
            retryable=True,
            message=f"watchdog: no request finished or failed for {quiet:.0f}s "
            f"(stall_timeout_s={self.stall_timeout_s:.0f}); the backend looks hung",
        )
