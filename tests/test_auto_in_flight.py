"""`in_flight: auto`: the pure controller, alone and driven by a simulated engine in virtual time."""

from __future__ import annotations

import functools

import pytest

from tasks.inference.calibrate import MIN_COHORT, AutoState, InFlightAuto, best_in_flight, cohort_size, levels
from tests.support.engine_sim import (
    H100_LONG,
    H100_LONG_C,
    H100_LONG_D,
    H100_SHORT,
    H100_SHORT_B,
    H200_270M,
    best_fixed,
    simulate,
)

CURVES = {
    "h100-short": H100_SHORT,
    "h100-short-b": H100_SHORT_B,
    "h100-long": H100_LONG,
    "h100-long-c": H100_LONG_C,
    "h100-long-d": H100_LONG_D,
    "h200-270m": H200_270M,
}

# The GPU sitting's sizes (600 short-answer rows, 300 long-answer rows, 128 in its unattended steps) and 2,000.
CASES = [
    ("h100-short", 600),
    ("h100-short", 2000),
    ("h100-short-b", 600),
    ("h100-short-b", 2000),
    ("h100-long", 300),
    ("h100-long", 2000),
    ("h100-long-c", 128),
    ("h100-long-c", 2000),
    ("h100-long-d", 128),
    ("h100-long-d", 2000),
    ("h200-270m", 600),
    ("h200-270m", 2000),
]

# Out of reach: 300 long answers from cold. Before 64 in flight can be ruled out its requests must
# be out ~26 s (64 / (0.92 x 2.47 rows/s)), then drain, at 2/3 of 32's rate, in a 121 s run: 0.90.
# The same on fresh records, 128 rows (about 65 s at 32): the probe of 64 is out 35 s before it can be
# ruled out, then drains, most of the job: 0.82.
# And the curve that rises to 64: the climb 16 -> 32 -> 64 is most of a 128-row job (0.78 here; the H100
# read 0.67, its climb 51 s of a 61 s run).
FLOOR = {("h100-long", 300, "cold"): 0.89, ("h100-long-c", 128, "cold"): 0.8, ("h100-long-d", 128, "cold"): 0.75}


@functools.cache
def best_rows_per_s(curve: str, rows: int, spread: float, chunk_rows: int | None) -> tuple[int, float]:
    """The best fixed level and its whole run's rows/s (each case is asked twice: cold and remembered)."""
    best = best_fixed(rows, *CURVES[curve], spread=spread, chunk_rows=chunk_rows)
    return best.levels[0][1], best.rows_per_s


@pytest.mark.parametrize("start", ["cold", "remembered"])
@pytest.mark.parametrize(("curve", "rows"), CASES)
def test_auto_holds_0_95_of_the_best_fixed_level_on_measured_curves(curve: str, rows: int, start: str) -> None:
    shape, tokens = CURVES[curve]
    for spread, chunk_rows in [(0.0, None), (0.3, rows // 4)]:  # equal answers in one chunk; varied, in four
        kept, best = best_rows_per_s(curve, rows, spread, chunk_rows)
        remembered = kept if start == "remembered" else None
        auto = simulate(rows, shape, tokens, remembered=remembered, spread=spread, chunk_rows=chunk_rows)
        ratio = auto.rows_per_s / best
        assert ratio >= FLOOR.get((curve, rows, start), 0.95), (spread, chunk_rows, ratio, auto.levels)
        assert auto.states[-1].level == kept and auto.states[-1].settled


def test_auto_follows_a_best_level_that_moves_mid_run() -> None:
    later = {1: 2.0, 2: 3.5, 4: 5.0, 8: 6.0, 16: 8.0, 32: 11.0, 64: 10.0}  # from 8 to 32 once half is done
    shape, tokens = H200_270M
    auto = simulate(4000, shape, tokens, remembered=8, later_curve=later)
    fixed = best_fixed(4000, shape, tokens, later_curve=later)
    assert auto.states[-1].level == 32
    assert auto.rows_per_s >= 0.95 * fixed.rows_per_s
    half = next(t for t, n in auto.levels if n == 32)
    assert half < 0.8 * auto.seconds  # it moved well before the end


def test_the_level_kept_is_the_one_the_report_advises() -> None:
    assert simulate(600, *H200_270M).states[-1].level == 8
    later = {1: 2.0, 2: 3.5, 4: 5.0, 8: 6.0, 16: 8.0, 32: 11.0, 64: 10.0}
    run = simulate(1500, *H200_270M, later_curve=later, chunk_rows=150, spread=0.3)
    # At every chunk's end, what the report shows (and advises from) agrees with the level kept.
    assert all(best_in_flight(state.shown) == state.level for state in run.states if state.shown)


# --- the rules, event by event ---------------------------------------------------------------


def test_levels_double_up_to_the_ceiling_and_cold_start_is_a_quarter_of_it() -> None:
    assert levels(64) == [1, 2, 4, 8, 16, 32, 64] and levels(48) == [1, 2, 4, 8, 16, 32, 48] and levels(1) == [1]
    assert [InFlightAuto.start(c, 0.0).level for c in (64, 16, 4, 2, 1)] == [16, 4, 1, 1, 1]
    assert cohort_size(2) == MIN_COHORT and cohort_size(64) == 32


def drive(auto: InFlightAuto, now: float, n: int) -> list[int]:
    return [auto.started(now) for _ in range(n)]


def test_a_window_judges_only_requests_that_went_out_under_its_level() -> None:
    auto = InFlightAuto.start(16, 0.0)  # cold at 4; a cohort is 8 requests
    early = drive(auto, 0.0, 4)
    for i, ticket in enumerate(early):  # the first four answers, then four more go out as they return
        auto.finished(ticket, 1.0 + i * 0.1, 10)
    assert auto.level == 4 and not auto.state.curve
    late = drive(auto, 1.5, 4)
    for ticket in late:
        auto.finished(ticket, 2.5, 10)
    # Judged: 8 answers of 10 tokens, each out 1-1.3 s, 4 in flight on average.
    assert auto.state.curve[4] == pytest.approx(4 * 80 / (1.0 + 1.1 + 1.2 + 1.3 + 4 * 1.0), rel=0.15)
    assert auto.level == 8  # the search goes up


def test_requests_out_above_the_level_after_a_lowering_are_left_out() -> None:
    auto = InFlightAuto.start(64, 0.0, AutoState(ceiling=64, level=8, settled=True))
    assert auto.level == 8
    over = drive(auto, 0.0, 12)  # more out than the level: they went out before it came down
    window = auto._window
    assert window is not None and window.joined == 8 and set(window.out) == set(over[:8])


def test_a_probe_that_cannot_reach_the_kept_level_stops_early() -> None:
    auto = InFlightAuto.start(64, 0.0, AutoState(ceiling=64, level=32, curve={32: 300.0}, settled=True))
    auto._open(64, probe=True)
    kept = drive(auto, 0.0, 1)
    auto.finished(kept[0], 1.0, 128)  # tokens a row: 128
    drive(auto, 1.0, 40)
    auto.tick(10.0)
    assert auto.level == 64  # 64 x 128 / 9 s could still beat 300 tokens/s
    auto.tick(40.0)  # out 39 s: at best 64 x 128 / 39 = 210 tokens/s
    assert auto.level == 32 and auto.state.curve[64] < 0.92 * 300
    assert any("cannot reach" in note for note in auto.notes)


def test_out_of_memory_caps_the_level_for_good() -> None:
    auto = InFlightAuto.start(64, 0.0)
    auto.capped(8, 1.0)
    assert (auto.level, auto.state.ceiling) == (8, 8)
    carried = InFlightAuto.start(64, 2.0, auto.state)  # the next chunk keeps the cap
    assert carried.state.ceiling == 8 and carried.level <= 8


def test_the_next_chunk_carries_on_where_the_last_stopped() -> None:
    state = AutoState(ceiling=64, level=16, curve={16: 617.0, 32: 593.0}, settled=False)
    auto = InFlightAuto.start(64, 0.0, state)
    assert auto.level == 64  # 32 was flat: the search goes on past it
    settled = AutoState(ceiling=64, level=8, curve={8: 674.0}, settled=True, watched_s=12.0)
    assert InFlightAuto.start(64, 0.0, settled).level == 8


@pytest.mark.parametrize(("curve", "remembered", "rows"), [("h100-short", 8, 2000), ("h100-short-b", 8, 20_000)])
def test_a_stale_remembered_level_climbs_past_flat_steps(curve: str, remembered: int, rows: int) -> None:
    """Last run's level is no longer the best: its watch probes go on past a flat neighbour (8 -> 16 on
    one H100 curve) instead of turning back there, which kept 8, or walked down to 2 on the other."""
    shape, tokens = CURVES[curve]
    auto = simulate(rows, shape, tokens, remembered=remembered, spread=0.3, chunk_rows=rows // 4)
    best = best_fixed(rows, shape, tokens, spread=0.3, chunk_rows=rows // 4)
    assert auto.states[-1].level == 64
    assert auto.rows_per_s >= 0.95 * best.rows_per_s, auto.levels


def test_a_failed_requests_time_counts_and_a_probe_that_only_fails_reads_nothing() -> None:
    auto = InFlightAuto.start(64, 0.0, AutoState(ceiling=64, level=8, settled=True))
    tickets = drive(auto, 0.0, 8)
    for ticket in tickets[:4]:
        auto.finished(ticket, 2.0, 20)
    for ticket in tickets[4:]:
        auto.finished(ticket, 2.0, None)  # out as long, no answer
    assert auto.state.curve[8] == pytest.approx(8 * 80 / 16.0)  # half the work in the same time: 40, not 80
    auto._open(16, probe=True)
    for ticket in drive(auto, 3.0, 8):
        auto.finished(ticket, 4.0, None)
    assert auto.state.curve[16] == 0.0 and auto.level == 8  # judged, and back at the kept level


def test_a_re_measure_behind_the_kept_level_does_not_walk_back_into_it() -> None:
    """Kept 16 reads lower, so 4 wins on an old reading and is measured again; it reads flat. The probe was
    behind the kept level, not on the side the watch heads: no further probe (8, then 16 as a probe)."""
    state = AutoState(ceiling=64, level=16, curve={4: 98.0, 8: 90.0, 16: 105.0, 32: 80.0}, settled=True)
    auto = InFlightAuto.start(64, 0.0, state)

    def window(level: int, start: float, tokens_each: int) -> float:
        """Rounds of `level` requests, each out 1 s, until the cohort is judged; returns the time."""
        window = auto._window
        while auto._window is window:
            assert auto.level == level
            for ticket in drive(auto, start, level):
                auto.finished(ticket, start + 1.0, tokens_each)
            start += 1.0
        return start

    now = window(16, 0.0, 6)  # 16 x 6 tokens a second: 96, below 16's old 105, so smoothed ~100
    assert auto.level == 4 and auto._window is not None and auto._window.probe  # 4 wins on its old reading
    window(4, now, 24)  # 4 x 24 = 96 tokens/s: flat against 16's ~100, and 16 is kept again
    assert auto.state.curve[4] == pytest.approx(96.0)
    assert auto.level == 16 and auto._window is not None and not auto._window.probe
