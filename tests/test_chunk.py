"""The chunk's retry policy as pure functions, and the runner on the fake backend.

No server and no sleeps: the policy gets the time passed in, the fake answers or fails at once as
scripted (the `in_flight: auto` runs give it a few milliseconds a request; the controller itself is
tested in test_auto_in_flight.py). End-to-end runs over HTTP are in test_inference.py.
"""

from __future__ import annotations

import threading
from typing import Any

import polars as pl
import pytest

from tasks.inference.backends import BackendError
from tasks.inference.backends.fake import HANG, FakeBackend
from tasks.inference.calibrate import best_in_flight
from tasks.inference.policy import OOM_STREAK_LIMIT, RAISE_AFTER, ChunkPolicy, RowTries, Step
from tasks.inference.runner import ChunkAborted, run_chunk
from tasks.plan.dataset import validate_input
from tasks.schema import ChunkStats
from tasks.settings.load import load_settings
from tasks.settings.model import JobSettings
from tasks.storage.journal import chunk_path, finished_rows

OOM = BackendError("oom", "oom", "HTTP 500: CUDA error: out of memory")
CRASH = BackendError("runner_crash", "retry", "HTTP 500: llama runner process unexpectedly stopped")
DOWN = BackendError("unreachable", "unreachable", "cannot reach Ollama at http://127.0.0.1:9")


def policy(**kw: Any) -> ChunkPolicy:
    base: dict[str, Any] = {
        "max_attempts": 3,
        "outage_budget_s": 10.0,
        "stall_timeout_s": 60.0,
        "oom_backoff_s": 4.0,
        "num_ctx": 8192,
        "num_ctx_floor": None,
        "ceiling": 4,
        "limit": 4,
        "jitter": lambda: 1.0,  # the longest wait: 2^(attempt-1) x base exactly
    }
    return ChunkPolicy(**(base | kw))


def sent(tries: RowTries, at: int = 1) -> RowTries:
    """A request of the row went out, with `at` in flight allowed."""
    tries.attempts += 1
    tries.sent_at = at
    return tries


# --- the policy, pure ---------------------------------------------------------------------------


def test_transient_failure_retries_with_exponential_backoff_until_attempts_run_out() -> None:
    p, tries = policy(), RowTries()
    assert p.failed(CRASH, sent(tries), now=1.0) == Step("retry", wait_s=0.5)
    assert p.failed(CRASH, sent(tries), now=2.0) == Step("retry", wait_s=1.0)
    assert p.failed(CRASH, sent(tries), now=3.0) == Step("error_row")
    assert p.last_progress == 3.0  # an error is progress for the watchdog
    busy = BackendError("busy", "backoff", "HTTP 503: server busy")
    assert policy().failed(busy, sent(RowTries()), now=0.0) == Step("retry", wait_s=2.0)


def test_fatal_failures_end_the_row_or_the_chunk() -> None:
    p = policy()
    assert p.failed(BackendError("bad_request", "fatal_row", "HTTP 400"), sent(RowTries()), now=0) == Step("error_row")
    missing = BackendError("model_missing", "fatal_job", "model 'x' not found")
    assert p.failed(missing, sent(RowTries()), now=0) == Step("abort", retryable=False, message="model 'x' not found")


def test_an_outage_is_not_charged_to_the_row_and_ends_when_its_budget_is_spent() -> None:
    p, tries = policy(outage_budget_s=10.0), RowTries()
    assert p.failed(DOWN, sent(tries), now=100.0) == Step("retry", wait_s=0.5)
    assert p.failed(DOWN, sent(tries), now=104.0) == Step("retry", wait_s=1.5)  # 0.5 + 4 / 4
    assert p.failed(DOWN, sent(tries), now=109.0) == Step("retry", wait_s=1.0)  # capped by the budget left
    assert tries.attempts == 0 and p.notes == [f"backend unreachable, waiting up to 10s: {DOWN}"]
    assert p.stalled(now=1000.0) is None  # the watchdog leaves an outage to its budget
    step = p.failed(DOWN, sent(tries), now=110.0)
    assert step == Step("abort", retryable=True, message=f"{DOWN} (for 10s, outage_budget_s=10)")
    p.answered(now=111.0)
    assert p.unreachable_since is None


def test_out_of_memory_halves_in_flight_unloads_lowers_num_ctx_then_gives_up() -> None:
    p = policy(limit=4, num_ctx=8192, num_ctx_floor=2048, oom_backoff_s=4.0)
    steps = [p.failed(OOM, sent(RowTries(), at=p.limit), now=0) for _ in range(2)]
    assert p.limit == 1 and steps[0] == Step("retry", wait_s=4.0)  # the row is not charged: retried
    assert p.notes[:2] == [
        f"out of memory, in-flight lowered to 2, backing off: {OOM}",
        f"out of memory, in-flight lowered to 1, backing off: {OOM}",
    ]
    # Sent at 1 in flight: half-way to the limit the model is unloaded, at the limit num_ctx halves.
    unloads = [p.failed(OOM, sent(RowTries()), now=0).unload for _ in range(OOM_STREAK_LIMIT)]
    assert unloads == [False, False, True, False, False, False] and p.num_ctx == 4096 and p.oom_streak == 0
    for _ in range(OOM_STREAK_LIMIT):
        p.failed(OOM, sent(RowTries()), now=0)
    assert p.num_ctx == 2048  # the floor
    for _ in range(OOM_STREAK_LIMIT - 1):
        assert p.failed(OOM, sent(RowTries()), now=0).do == "retry"
    last = p.failed(OOM, sent(RowTries()), now=0)
    assert last.do == "abort" and not last.retryable
    assert last.message.startswith("persistent out of memory: 6 requests in a row failed with 1 in flight")
    assert "num_ctx 8192 -> 4096" in " ".join(p.notes) and "num_ctx 4096 -> 2048" in " ".join(p.notes)


def test_a_burst_of_out_of_memory_halves_once_and_only_requests_sent_at_1_count_towards_giving_up() -> None:
    # A runner that dies fails all 8 requests in flight at once: that is one event, not 8 in a row at 1.
    p = policy(limit=8, ceiling=8)
    steps = [p.failed(OOM, sent(RowTries(), at=8), now=0) for _ in range(8)]
    assert {s.do for s in steps} == {"retry"} and p.limit == 4 and p.oom_streak == 0
    assert p.notes == [f"out of memory, in-flight lowered to 4, backing off: {OOM}"]
    p.failed(OOM, sent(RowTries(), at=4), now=0)  # the level it left out of memory again: halve again
    assert p.limit == 2 and p.oom_streak == 0
    for _ in range(OOM_STREAK_LIMIT - 1):
        assert p.failed(OOM, sent(RowTries()), now=0).do == "retry"
    assert p.limit == 1 and p.oom_streak == OOM_STREAK_LIMIT - 1


def test_out_of_memory_is_not_charged_to_a_row_for_the_first_few() -> None:
    p, tries = policy(limit=1, max_attempts=1, num_ctx_floor=256), RowTries()
    assert p.failed(OOM, sent(tries), now=0).do == "retry"
    assert (tries.attempts, tries.free, tries.charged()) == (1, 1, 0)
    assert p.failed(CRASH, sent(tries), now=0) == Step("error_row")


def test_an_answer_resets_the_streak_and_enough_of_them_win_a_slot_back() -> None:
    p = policy(limit=4, ceiling=4)
    p.failed(OOM, sent(RowTries(), at=4), now=0)
    assert p.limit == 2
    for i in range(RAISE_AFTER - 1):
        p.answered(now=float(i))
    assert p.limit == 2 and p.oom_streak == 0
    p.answered(now=99.0)
    assert p.limit == 3 and p.notes[-1] == f"{RAISE_AFTER} answers in a row since out-of-memory: in-flight raised to 3"


def test_schema_invalid_answers_resample_until_attempts_run_out() -> None:
    p, tries = policy(max_attempts=2), RowTries()
    assert p.invalid_output(sent(tries)) == Step("retry")
    assert p.invalid_output(sent(tries)) == Step("error_row")
    assert tries.resamples == 2


def test_timeouts_are_not_progress_for_the_watchdog() -> None:
    p, timeout = policy(stall_timeout_s=60.0, last_progress=100.0), BackendError("timeout", "retry", "no answer")
    assert p.failed(timeout, sent(RowTries()), now=150.0).do == "retry"
    assert p.stalled(now=161.0) is not None
    p.failed(CRASH, sent(RowTries()), now=170.0)  # the server said something: it is alive
    assert p.stalled(now=200.0) is None


def test_watchdog_fires_after_the_stall_timeout() -> None:
    p = policy(stall_timeout_s=60.0, last_progress=100.0)
    assert p.stalled(now=160.0) is None
    step = p.stalled(now=161.0)
    assert step is not None and step.do == "abort" and step.retryable
    assert (
        step.message == "watchdog: no request finished or failed for 61s (stall_timeout_s=60); the backend looks hung"
    )


# --- the runner on the fake backend -------------------------------------------------------------


def settings_for(offline_job: Any, n: int, **overrides: Any) -> JobSettings:
    return load_settings(None, offline_job(n, chunk_size=n, **overrides))


def run(settings: JobSettings, fake: FakeBackend) -> tuple[pl.DataFrame, ChunkStats]:
    chunk = validate_input(settings).chunks[0]
    stats = run_chunk(settings, chunk, fake)
    return pl.read_parquet(chunk_path(settings.output_dir, chunk)), stats


def prompt(i: int) -> str:
    return f"Role: data engineer\nCandidate: candidate {i} writes Python"


def test_every_row_once_with_n_in_flight(offline_job: Any) -> None:
    fake = FakeBackend()
    frame, stats = run(settings_for(offline_job, 16, in_flight=4), fake)
    assert frame["response"].to_list() == [f"answer to: {prompt(i)}" for i in range(16)]
    assert sorted(r.prompt for r in fake.history) == sorted(prompt(i) for i in range(16))
    assert fake.peak_in_flight == 4 and fake.opened and fake.closed
    assert (stats.ok, stats.errors, stats.requests, stats.in_flight) == (16, 0, 16, 4)
    assert stats.completion_tokens == sum(len(f"answer to: {prompt(i)}".split()) for i in range(16))


def test_retries_run_out_into_an_error_row(offline_job: Any) -> None:
    fake = FakeBackend()
    fake.always(CRASH, match="candidate 1 writes")
    frame, stats = run(settings_for(offline_job, 3, max_attempts=3), fake)
    bad = frame.row(1, named=True)
    assert (bad["status"], bad["error_kind"], bad["attempts"], bad["error"]) == ("error", "runner_crash", 3, str(CRASH))
    assert frame["status"].to_list() == ["ok", "error", "ok"] and stats.requests == 5


def test_hung_request_times_out_and_is_retried(offline_job: Any) -> None:
    fake = FakeBackend()
    fake.enqueue(HANG, match="candidate 0 writes")
    frame, _ = run(settings_for(offline_job, 3, request_timeout_s=0.05), fake)
    assert frame["status"].to_list() == ["ok"] * 3 and frame["attempts"].to_list() == [2, 1, 1]
    assert [r.outcome for r in fake.requests_for("candidate 0 writes")] == ["hang", "ok"]


def test_outage_keeps_finished_rows_and_resume_sends_only_the_rest(offline_job: Any) -> None:
    settings = settings_for(offline_job, 40, in_flight=1, outage_budget_s=0)
    chunk = validate_input(settings).chunks[0]
    down = FakeBackend()
    down.always(DOWN, match="candidate 20 writes")
    with pytest.raises(ChunkAborted, match="cannot reach Ollama") as info:
        run_chunk(settings, chunk, down)
    assert info.value.retryable is True and down.closed
    assert finished_rows(settings.output_dir, chunk) == set(range(20))  # in order, one at a time
    up = FakeBackend()
    stats = run_chunk(settings, chunk, up)
    assert [r.prompt for r in up.history] == [prompt(i) for i in range(20, 40)]  # nothing answered twice
    assert (stats.resumed_rows, stats.sent_rows) == (20, 20)
    assert pl.read_parquet(chunk_path(settings.output_dir, chunk))["row_index"].to_list() == list(range(40))


def test_out_of_memory_lowers_in_flight_and_no_row_is_charged(offline_job: Any) -> None:
    fake = FakeBackend()
    fake.enqueue(OOM, OOM)
    frame, stats = run(settings_for(offline_job, 12, in_flight=4, oom_backoff_s=0), fake)
    assert frame["status"].to_list() == ["ok"] * 12 and frame["attempts"].sum() == 14
    # Two requests that went out at 4 failing together are one event: half of 4, once.
    assert [e.split(": ", 1)[1] for e in stats.events] == [f"out of memory, in-flight lowered to 2, backing off: {OOM}"]
    assert stats.in_flight == 4 and stats.requests == 14
    assert [r.outcome for r in fake.history].count("ok") == 12
    # Once lowered, at most 2 at a time, retries of rows already under way included.
    assert max(r.concurrent for r in fake.history[4:]) == 2


def test_persistent_out_of_memory_unloads_once_then_stops_the_chunk_with_advice(offline_job: Any) -> None:
    fake = FakeBackend()
    fake.always(OOM)
    settings = settings_for(offline_job, 12, in_flight=2, oom_backoff_s=0, max_attempts=20)
    with pytest.raises(
        ChunkAborted, match=r"persistent out of memory: 6 requests in a row.*Lower options.num_ctx"
    ) as info:
        run(settings, fake)
    assert info.value.retryable is False
    assert fake.unloads == 1 and 6 <= len(fake.history) < 12  # it did not spin through every row


def test_a_row_whose_requests_all_time_out_is_an_error_row_not_a_hung_server(offline_job: Any) -> None:
    # At 1 in flight nothing else answers while one slow row is retried: the watchdog waits at least that
    # row's whole retry cycle (watchdog_floor_s), however low stall_timeout_s is set.
    fake = FakeBackend()
    fake.always(HANG, match="candidate 2 writes")
    settings = settings_for(offline_job, 4, in_flight=1, request_timeout_s=0.2, stall_timeout_s=0.1, max_attempts=3)
    frame, _ = run(settings, fake)
    assert frame["status"].to_list() == ["ok", "ok", "error", "ok"]
    slow = frame.row(2, named=True)
    assert (slow["error_kind"], slow["attempts"]) == ("timeout", 3)


def test_watchdog_fails_a_chunk_whose_every_request_times_out(offline_job: Any) -> None:
    # A wedged server times every request out: timeouts are no progress, so past the floor the watchdog
    # fails the chunk (a retry waits for the server) after one round of rows, not all of them.
    fake = FakeBackend()
    fake.always(HANG)
    settings = settings_for(offline_job, 12, in_flight=2, request_timeout_s=0.05, stall_timeout_s=0.5, max_attempts=3)
    chunk = validate_input(settings).chunks[0]
    with pytest.raises(ChunkAborted, match="watchdog: no request finished or failed") as info:
        run_chunk(settings, chunk, fake)
    assert info.value.retryable and 0 < len(finished_rows(settings.output_dir, chunk)) < 12


def test_watchdog_counts_from_the_end_of_an_outage_at_the_chunk_start(offline_job: Any) -> None:
    fake = FakeBackend(check_error=DOWN, delay=lambda in_flight: 0.2)
    threading.Timer(2.0, lambda: setattr(fake, "check_error", None)).start()  # down longer than the watchdog
    # The watchdog: max(0.6, its floor: 1 x 0.5 s + 1 s) = 1.5 s.
    settings = settings_for(
        offline_job, 6, in_flight=1, stall_timeout_s=0.6, request_timeout_s=0.5, max_attempts=1, outage_budget_s=30
    )
    frame, _ = run(settings, fake)
    assert frame["status"].to_list() == ["ok"] * 6


def test_a_failed_check_stops_the_chunk_before_any_row(offline_job: Any) -> None:
    fake = FakeBackend(check_error=BackendError("model_missing", "fatal_job", "model 'gemma3:27b' not found"))
    with pytest.raises(ChunkAborted, match="model 'gemma3:27b' not found") as info:
        run(settings_for(offline_job, 3), fake)
    assert info.value.retryable is False and fake.history == [] and fake.closed


def test_auto_in_flight_with_too_few_rows_to_judge_a_level_keeps_its_start(offline_job: Any) -> None:
    fake = FakeBackend()
    _, stats = run(settings_for(offline_job, 6, in_flight="auto", max_in_flight=8), fake)
    # Cold at a quarter of the ceiling (2); a level is judged on 8 answers, and there are 6.
    assert (stats.calibration, stats.in_flight, stats.ok, fake.peak_in_flight) == (None, 2, 6, 2)
    assert stats.auto is not None and stats.auto["rows"] == 6 and not stats.auto["settled"]


def past_8_slots(in_flight: int) -> float:
    """An engine with 8 slots: a request takes 10 ms, or 100 ms when it arrives with more than 8 out."""
    return 0.01 if in_flight <= 8 else 0.1


def test_auto_in_flight_searches_levels_on_the_real_rows_and_keeps_the_advised_one(offline_job: Any) -> None:
    fake = FakeBackend(delay=past_8_slots)
    frame, stats = run(settings_for(offline_job, 240, in_flight="auto", max_in_flight=16), fake)
    assert stats.ok == 240 and sorted(frame["row_index"].to_list()) == list(range(240))
    assert sorted(r.prompt for r in fake.history) == sorted(prompt(i) for i in range(240))  # every row once
    curve = stats.calibration
    # The readings of a fake whose delay is fixed on arrival are rough (test_auto_in_flight.py simulates
    # an engine exactly); here, the wiring: cold at 4 (a quarter of 16), then up, each change an event.
    assert curve is not None and {4, 8} <= set(curve), curve
    probes = [e.rsplit(": ", 1)[1] for e in stats.events if e.endswith(" in flight (probe)")]
    assert probes[0] == "8 in flight (probe)" and fake.peak_in_flight <= 16
    assert stats.auto is not None and stats.in_flight == best_in_flight(curve) == stats.auto["level"]
    assert any("auto in-flight: tokens/s by level {" in e for e in stats.events)


def test_auto_in_flight_respects_a_limit_lowered_by_out_of_memory(offline_job: Any) -> None:
    fake = FakeBackend(delay=past_8_slots)
    fake.enqueue(OOM)
    frame, stats = run(settings_for(offline_job, 120, in_flight="auto", max_in_flight=16, oom_backoff_s=0), fake)
    assert frame["status"].to_list() == ["ok"] * 120
    # Cold at 4; the out-of-memory answer halves it to 2, and 'auto' never goes above that again.
    assert stats.auto is not None and stats.auto["ceiling"] == 2 and stats.in_flight <= 2
    oom = next(i for i, r in enumerate(fake.history) if r.outcome == "oom")
    assert max(r.concurrent for r in fake.history[oom + 4 :]) <= 2  # the 3 others out at the time drain first
    assert any("out of memory, 2 in flight is the ceiling" in e for e in stats.events)


def test_auto_in_flight_carries_on_in_the_next_chunk(offline_job: Any) -> None:
    settings = load_settings(None, offline_job(240, chunk_size=120, in_flight="auto", max_in_flight=16))
    first, second = validate_input(settings).chunks
    one = run_chunk(settings, first, FakeBackend(delay=past_8_slots))
    two = run_chunk(settings, second, FakeBackend(delay=past_8_slots), auto=one.auto)
    assert one.auto is not None and two.auto is not None
    assert two.auto["rows"] == one.auto["rows"] + 120  # one controller over the run, not one per chunk
    assert set(one.calibration or {}) <= set(two.calibration or {})
    assert two.ok == 120
