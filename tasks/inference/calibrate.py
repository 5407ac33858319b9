"""`in_flight: auto` as a pure controller: told when each request goes out and comes back (with the
time, passed in), it names the level to keep in flight, for the whole run. No asyncio, no I/O, no clock.

Why it is built this way (issue 24): on llama.cpp's server the throughput-by-level curve is bumpy
(flat 4 -> 8, then +28 % at 16 on an H100) and host-bound, and a one-shot search from 1 at the start
of the first chunk kept 1 in flight on an H200 (0.45x the best fixed level): its windows judged
requests that began under one level by another level's clock, and its time at low levels was most
of the loss on a job of a few thousand rows.

The rules:
- Levels: 1, 2, 4 ... doubling, and the ceiling (the server's slots when known: more in flight than
  slots only queues). Start: the level the last run of the same job kept (watching at once), else
  cold at the level below the ceiling and search.
- Window: a level is judged on a cohort, the first `cohort_size(level)` requests that went out while
  it was the level and no more than `level` were in flight; it closes when all of them came back.
  Throughput by Little's law: mean in-flight count over the window x sum(tokens) / sum(latency) (rows
  when the server counts no tokens). A cohort fixed by start order is not biased to the quick
  answers, and equal-length answers that come back in bursts, or a pipeline still filling, do not
  sway it the way completions-per-second over a short window do.
- Search: from the start level, up one level at a time while the highest level measured is not
  clearly worse (FLAT) than the best, so a flat step does not end the climb; then down the same way.
  Keep bottleneck.best_in_flight(curve), the level the report advises too.
- Early stop: a level whose cohort has been out so long that, even if every member came back now,
  it could not reach FLAT x the level it is compared with, is judged at once on that bound.
- Watch: the kept level is measured window after window (smoothed). After PROBE_GAP x the cost of a
  probe spent at it, a neighbour is probed (up, then down, in turn); if it is better it is kept, and
  the next level the same way is probed at once; if it is flat, the next level the same way is
  probed too. Probing costs about 1/PROBE_GAP of the time at most.
  The level kept is always best_in_flight of the readings; one that wins only on an old reading (the
  kept level got slower) is measured again before it is kept.
- Failures: a failed request's time counts in its window's latency (time spent on no work); a probe
  whose requests all failed reads 0.
- Out of memory: the runner's policy halves the limit; the controller takes the lowered limit as its
  ceiling for the rest of the run and never goes above it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, Field

NEAR_BEST = 0.97  # in-flight levels within 3 % of the best tokens/s count as the best: more only adds latency


def best_in_flight(curve: dict[int, float]) -> int:
    """The in-flight level to keep: the smallest within NEAR_BEST of the best calibrated throughput.
    `in_flight: auto` keeps this one, and the report advises it, so the two never disagree."""
    top = max(curve.values())
    return min(n for n, v in curve.items() if v >= NEAR_BEST * top)


def calibration_knee(curve: dict[int, float]) -> int | None:
    """The level to keep when a higher level was measured and did not beat it (the engine is saturated
    there); None while the highest level measured is the best (still scaling). A dip at one level
    does not make a knee: on a real server a low reading at 2 in flight preceded +117 % at 8."""
    if not curve:
        return None
    knee = best_in_flight(curve)
    return knee if knee < max(curve) else None


MIN_COHORT = 8  # completions a window holds at least: fewer and one slow prompt sways the reading
FLAT = 0.92  # a level at or above FLAT x the best is "flat", not worse: the search goes on past it
PROBE_GAP = 10.0  # seconds at the kept level per second a probe costs: probing takes ~1/11 of the time at most
MIN_GAP_S = 30.0  # never probe more often than this
SMOOTHING = 0.5  # weight of a new window in the kept level's reading


def cohort_size(level: int) -> int:
    """Completions that judge `level`: half the level (a raise from level/2 starts them at once), at least MIN_COHORT."""
    return max(MIN_COHORT, level // 2)


def cold_start(grid: list[int]) -> int:
    """A quarter of the ceiling: the climb to it is two windows, and the search spends little time
    at the low levels, where a job of a few thousand rows loses most (simulated on the measured curves)."""
    return grid[max(0, len(grid) - 3)]


def levels(ceiling: int) -> list[int]:
    """1, 2, 4 ... below the ceiling, then the ceiling."""
    grid = [1]
    while grid[-1] * 2 < ceiling:
        grid.append(grid[-1] * 2)
    return grid + [ceiling] if ceiling > 1 else grid


class AutoState(BaseModel):
    """What the controller carries from one chunk to the next, and one run to the next (manifest, state file)."""

    ceiling: int = Field(ge=1, description="Highest level: the server's slots, max_in_flight, or what OOM left.")
    level: int = Field(ge=1, description="The level kept (the search's best so far while it runs).")
    curve: dict[int, float] = Field(default_factory=dict, description="Latest reading per level (tokens/s or rows/s).")
    unit: Literal["tokens/s", "rows/s"] = "tokens/s"
    settled: bool = Field(False, description="The search is over: the level is kept and watched.")
    probe_s: float = Field(0.0, description="How long the last probe took (its window and the drain before it).")
    window_s: float = Field(0.0, description="How long the kept level's last window took.")
    watched_s: float = Field(0.0, description="Seconds at the kept level since the last probe.")
    direction: Literal[1, -1] = Field(1, description="Which neighbour the next probe tries: up (1) or down (-1).")
    rows: int = Field(0, description="Rows that came back under auto in this run.")
    search_rows: int | None = Field(None, description="Rows that came back before the search was over.")
    shown: dict[int, float] = Field(
        default_factory=dict, description="The readings when the level kept was last their best: what the report shows."
    )

    def gap_s(self) -> float:
        """Seconds at the kept level before the next probe: a probe costs about its own time, or two of
        the kept level's windows (a drain and a window) when none was timed yet."""
        return max(MIN_GAP_S, PROBE_GAP * max(self.probe_s, 2 * self.window_s))


@dataclass
class _Window:
    level: int
    size: int
    probe: bool  # a level being tried, not the kept one: it may be stopped early
    out: dict[int, float] = field(default_factory=dict)  # cohort ticket -> start time, still out
    joined: int = 0
    latency_s: float = 0.0
    tokens: int = 0
    rows: int = 0
    first_start: float | None = None
    area_at_start: float = 0.0  # in-flight-count x seconds when the first member went out


@dataclass
class InFlightAuto:
    """The controller; `level` is what the runner keeps in flight (policy.limit)."""

    state: AutoState
    now: float  # the time of the last event
    notes: list[str] = field(default_factory=list)  # level changes, in order; the runner stamps and keeps them
    in_flight: int = 0
    _tickets: int = 0
    _area: float = 0.0  # integral of the in-flight count over time
    _rows: int = 0
    _tokens: int = 0
    _window: _Window | None = None
    _probe_started: float = 0.0

    @classmethod
    def start(cls, ceiling: int, now: float, previous: AutoState | None = None) -> InFlightAuto:
        """Carry on from `previous` (the last chunk, or the last run of this job), else start cold."""
        if previous is not None:
            state = previous.model_copy(deep=True)
            state.ceiling = min(state.ceiling, ceiling)  # out of memory lowered it in an earlier chunk
            state.curve = {n: v for n, v in state.curve.items() if n <= state.ceiling}
            state.shown = {n: v for n, v in state.shown.items() if n <= state.ceiling}
            state.level = min(state.level, state.ceiling)
            auto = cls(state, now)
        else:
            grid = levels(ceiling)
            auto = cls(AutoState(ceiling=ceiling, level=cold_start(grid)), now)
        auto._probe_started = now
        searching = not auto.state.settled and bool(auto.state.curve)
        following = auto._search_next() if searching else None
        auto._open(following or auto.state.level, probe=following is not None)
        return auto

    @classmethod
    def remembered(cls, ceiling: int, level: int, now: float) -> InFlightAuto:
        """Start at the level an earlier run settled on, watching (its neighbours are probed in time)."""
        return cls.start(ceiling, now, AutoState(ceiling=ceiling, level=min(level, ceiling), settled=True))

    @property
    def level(self) -> int:
        return self._window.level if self._window else self.state.level

    def curve(self) -> dict[int, float]:
        """Level -> reading, as of the last time the level kept was their best_in_flight (so the report,
        which advises that, agrees with what auto keeps)."""
        return dict(sorted(self.state.shown.items()))

    # --- events -------------------------------------------------------------------------------

    def started(self, now: float) -> int:
        """A request went out; returns its ticket for `finished`."""
        self._advance(now)
        self.in_flight += 1
        self._tickets += 1
        w = self._window
        if w is not None and w.joined < w.size and self.in_flight <= w.level:
            if w.first_start is None:
                w.first_start, w.area_at_start = now, self._area
            w.out[self._tickets] = now
            w.joined += 1
        return self._tickets

    def finished(self, ticket: int, now: float, tokens: int | None) -> None:
        """A request came back: `tokens` generated, or None when it failed (it then judges nothing)."""
        self._advance(now)
        self.in_flight = max(0, self.in_flight - 1)
        if tokens is not None:
            self._rows += 1
            self._tokens += tokens
            self.state.rows += 1
        w = self._window
        if w is None or (start := w.out.pop(ticket, None)) is None:
            return
        w.latency_s += now - start  # a failed request's time was spent too, on no work
        if tokens is not None:
            w.tokens += tokens
            w.rows += 1
        if w.joined == w.size and not w.out:
            if w.rows:
                self._judged(self._reading(w, now), now)
            elif w.probe:
                self._judged(0.0, now)  # every member of a probe failed: that level does not do
            else:
                self._open(w.level, w.probe)  # every member at the kept level failed: measure again

    def tick(self, now: float) -> None:
        """Time passes with nothing coming back: a probe whose cohort is already too slow ends here."""
        self._advance(now)
        w = self._window
        if w is None or not w.probe or not w.out:
            return
        reference = self._reference()
        by_tokens = self.state.unit == "tokens/s"
        if reference is None or (by_tokens and not self._tokens):  # no answer yet says how long a row's is
            return
        # Even if every member came back now, latencies only grow: an upper bound on the reading.
        waited = w.latency_s + sum(now - s for s in w.out.values())
        per_row = self._tokens / self._rows if by_tokens else 1.0
        bound = w.level * per_row * w.size / waited
        if bound < FLAT * reference:
            self.notes.append(f"auto in-flight: {w.level} in flight cannot reach {FLAT:.0%} of {reference:.1f}")
            self._judged(bound, now)

    def capped(self, limit: int, now: float) -> None:
        """Out of memory lowered the limit to `limit`: that is the ceiling from now on."""
        self._advance(now)
        if limit >= self.state.ceiling:
            return
        self.state.ceiling = limit
        self.state.curve = {n: v for n, v in self.state.curve.items() if n <= limit}
        self.state.shown = {n: v for n, v in self.state.shown.items() if n <= limit}
        self.state.level = min(self.state.level, limit)
        self.notes.append(f"auto in-flight: out of memory, {limit} in flight is the ceiling from now on")
        self._open(min(self.level, limit), probe=False)

    # --- the rules ------------------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        elapsed = max(0.0, now - self.now)
        self._area += self.in_flight * elapsed
        if self.state.settled and self.level == self.state.level:
            self.state.watched_s += elapsed
        self.now = max(self.now, now)

    def _reading(self, w: _Window, now: float) -> float:
        """Little's law: mean in-flight over the window x work per second of latency."""
        assert w.first_start is not None
        span = now - w.first_start
        concurrency = (self._area - w.area_at_start) / span if span > 0 else w.level
        if self.state.unit == "tokens/s" and not w.tokens and not self._tokens:
            self.state.unit = "rows/s"  # the server counts no tokens
        work = w.tokens if self.state.unit == "tokens/s" else w.rows
        return concurrency * work / max(w.latency_s, 1e-9)

    def _reference(self) -> float | None:
        """What a probe must come near: the best reading while searching, the kept level's while watching."""
        if not self.state.settled:
            return max(self.state.curve.values(), default=None)
        return self.state.curve.get(self.state.level)

    def _judged(self, reading: float, now: float) -> None:
        w = self._window
        assert w is not None
        s = self.state
        kept = s.level
        if s.settled and not w.probe and kept in s.curve:
            reading = (1 - SMOOTHING) * s.curve[kept] + SMOOTHING * reading  # one window is noisy
        s.curve[w.level] = reading
        if not s.settled:
            s.level = best_in_flight(s.curve)
            s.shown = dict(s.curve)
            if (following := self._search_next()) is not None:
                self._open(following, probe=True)
                return
            s.settled, s.watched_s, s.search_rows = True, 0.0, s.rows
            s.probe_s = now - self._probe_started
            self.notes.append(f"auto in-flight: {s.unit} by level {self._shown()} -> {s.level} in flight")
            self._open(s.level, probe=False)
            return
        if w.probe:
            s.probe_s = now - self._probe_started
        else:
            s.window_s = now - (w.first_start or now)
        # Keep what the report would advise, best_in_flight over the readings; a level that wins only on
        # an old reading is measured again first (it was read before the engine moved, perhaps).
        best = best_in_flight(s.curve)
        if best == w.level and w.level != kept:
            s.level = w.level
            self.notes.append(f"auto in-flight: {w.level} in flight beat {kept} ({self._shown()}), kept")
        elif w.probe and best == kept:
            further = self._neighbour(w.level, s.direction, strict=True)
            away = (w.level - kept) * s.direction > 0  # a probe on the side it is heading, not a re-measure behind
            if further is not None and away and reading >= FLAT * s.curve[kept]:
                # Flat, not worse: look past it, as the search does (a remembered level may sit on a
                # flat step below a better one, and turning back there would keep it for good). The
                # chain is one probe: its cost, timed from its start, sets the gap before the next.
                self._open(further, probe=True, chain=True)
                return
            s.direction = 1 if s.direction == -1 else -1  # the other neighbour's turn
        if best != s.level:
            self._open(best, probe=True)
            return
        s.shown = dict(s.curve)
        further = self._neighbour(s.level, s.direction, strict=True) if w.probe and s.level == w.level else None
        if further is not None and s.level != kept:  # it moved: climb on the same way at once
            self._open(further, probe=True)
        elif not w.probe and s.watched_s >= s.gap_s() and (target := self._neighbour(kept, s.direction)):
            self._open(target, probe=True)
        else:
            if w.probe:
                s.watched_s = 0.0
            self._open(s.level, probe=False)

    def _search_next(self) -> int | None:
        """The next level to measure while searching: past the measured range, on a side that is not worse."""
        curve, grid = self.state.curve, levels(self.state.ceiling)
        best = max(curve.values())
        top, bottom = max(curve), min(curve)
        if top < self.state.ceiling and curve[top] >= FLAT * best:
            return next(n for n in grid if n > top)
        if bottom > 1 and curve[bottom] >= FLAT * best:
            return max(n for n in grid if n < bottom)
        return None

    def _neighbour(self, level: int, direction: int, strict: bool = False) -> int | None:
        """The next level up or down the grid; the other way when at an end (unless `strict`)."""
        grid = levels(self.state.ceiling)
        up = [n for n in grid if n > level]
        down = [n for n in grid if n < level]
        if direction == 1:
            return up[0] if up else (None if strict else (down[-1] if down else None))
        return down[-1] if down else (None if strict else (up[0] if up else None))

    def _open(self, level: int, probe: bool, chain: bool = False) -> None:
        w = self._window
        if w is None or w.level != level:
            self.notes.append(f"auto in-flight: {level} in flight" + (" (probe)" if probe else ""))
            if probe and not chain:
                self._probe_started = self.now
        self._window = _Window(level, cohort_size(level), probe)

    def _shown(self) -> str:
        return "{" + ", ".join(f"{n}: {v:.1f}" for n, v in sorted(self.state.curve.items())) + "}"
