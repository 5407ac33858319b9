"""A discrete-event engine for the `in_flight: auto` controller, in virtual time (no sleeps, no asyncio).

The engine shares itself among the requests in flight (processor sharing): with c in flight it
finishes rows_per_s(c) rows a second, so each request advances at rows_per_s(c) / c of its work
a second and, held at c, takes c / rows_per_s(c) (Little's law). rows_per_s is a measured curve,
interpolated linearly between the levels measured and flat past the last. Requests that start
together with equal work finish together, in bursts, as fixed-length answers do on llama.cpp.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

from tasks.inference.calibrate import AutoState, InFlightAuto

# rows/s by level, llama.cpp's server with 64 slots (FACTS: "A real engine on a real GPU" and
# "The production model's shape on a real engine"); tokens a row in the second item.
H100_SHORT = ({1: 2.73, 2: 2.61, 4: 3.15, 8: 3.89, 16: 3.91, 32: 4.10, 64: 4.97}, 16)
H100_LONG = ({1: 0.71, 2: 1.21, 4: 1.47, 8: 1.48, 16: 1.90, 32: 2.47, 64: 1.64}, 128)
# A second H100 sitting (bench/results/h100-20261205b): 2 beats 4, 8 and 16, and 64 beats them all.
H100_SHORT_B = ({1: 1.588, 2: 1.98, 4: 1.884, 8: 1.862, 16: 1.804, 32: 2.337, 64: 2.845}, 16)
# The long answers on fresh records (bench/results/h100-20261206b): flat 4 to 8. At 64 none of the first 64
# requests came back within 45 s: 64 / 45 s = 1.42 rows/s at most.
H100_LONG_C = ({1: 0.824, 4: 1.651, 8: 1.636, 16: 1.787, 32: 1.966, 64: 1.42}, 128)
# The first whole sitting on fresh records (bench/results/h100-20261206c), another H100: rising to 64 this time,
# and 4 below 1. Its flow runs: auto from cold kept 64 at 0.67x of fixed 64 on 128 rows, from the remembered 64 1.00x.
H100_LONG_D = ({1: 0.898, 4: 0.748, 8: 0.929, 16: 1.67, 32: 2.584, 64: 3.169}, 128)
H200_270M = ({n: tps / 64 for n, tps in {1: 370, 2: 575, 4: 613, 8: 674, 16: 617, 64: 547}.items()}, 64)


def rows_per_s(curve: dict[int, float], c: int) -> float:
    if c <= 0:
        return 0.0
    points = sorted(curve.items())
    if c <= points[0][0]:
        return points[0][1] * c / points[0][0]
    for (n0, v0), (n1, v1) in zip(points, points[1:], strict=False):
        if c <= n1:
            return v0 + (v1 - v0) * (c - n0) / (n1 - n0)
    return points[-1][1]


@dataclass
class Run:
    seconds: float
    rows: int
    levels: list[tuple[float, int]] = field(default_factory=list)  # (time, level) at each change
    states: list[AutoState] = field(default_factory=list)  # the controller's state at each chunk's end

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds


@dataclass
class _Chunk:
    """One chunk's rows through the engine; the clock and the finished count run on across chunks."""

    run: Run
    rows: int
    tokens_per_row: int
    fixed: int | None
    auto: InFlightAuto | None
    jitter: random.Random
    spread: float
    t: float
    work_done: float = 0.0  # virtual work clock: every request in flight has advanced this much
    out: list[tuple[float, int, int]] = field(default_factory=list)  # (work clock at its end, ticket, tokens)
    sent: int = 0

    def level(self) -> int:
        return self.auto.level if self.auto else self.fixed or 1

    def fill(self) -> None:
        while len(self.out) < self.level() and self.sent < self.rows:
            work = 1.0 + self.spread * (2 * self.jitter.random() - 1)
            ticket = self.auto.started(self.t) if self.auto else 0
            heapq.heappush(self.out, (self.work_done + work, ticket, round(self.tokens_per_row * work)))
            self.sent += 1
        if not self.run.levels or self.run.levels[-1][1] != self.level():
            self.run.levels.append((self.t, self.level()))

    def go(self, curve: dict[int, float], later: dict[int, float] | None, done: int, tick_s: float) -> int:
        """Run to the chunk's end; returns the rows finished so far in the run."""
        next_tick = self.t + tick_s
        self.fill()
        while self.out:
            shape = later if later is not None and done >= self.run.rows // 2 else curve
            speed = rows_per_s(shape, len(self.out)) / len(self.out)  # work a second of each request out
            to_finish = (self.out[0][0] - self.work_done) / speed
            step = min(to_finish, next_tick - self.t)
            self.t += step
            self.work_done += step * speed
            if step == to_finish:
                _, ticket, tokens = heapq.heappop(self.out)
                done += 1
                if self.auto:
                    self.auto.finished(ticket, self.t, tokens)
            else:
                next_tick += tick_s
                if self.auto:
                    self.auto.tick(self.t)
            self.fill()
        return done


def simulate(
    rows: int,
    curve: dict[int, float],
    tokens_per_row: int,
    *,
    fixed: int | None = None,
    ceiling: int = 64,
    remembered: int | None = None,
    chunk_rows: int | None = None,
    later_curve: dict[int, float] | None = None,
    spread: float = 0.0,
    tick_s: float = 0.5,
) -> Run:
    """Run `rows` rows at a fixed level, or under the controller (cold, or from a remembered level).

    `later_curve` replaces `curve` once half the rows are done; `spread` varies each row's work
    (and tokens) by up to +-spread, seeded; chunks of `chunk_rows` drain between them and hand the
    controller's state on, as the flow does.
    """
    jitter = random.Random(1)
    run = Run(0.0, rows)
    t, done = 0.0, 0
    state: AutoState | None = None
    for first in range(0, rows, chunk_rows or rows):
        auto = None
        if fixed is None:
            if state is None and remembered is not None:
                auto = InFlightAuto.remembered(ceiling, remembered, t)
            else:
                auto = InFlightAuto.start(ceiling, t, state)
        size = min(chunk_rows or rows, rows - first)
        chunk = _Chunk(run, size, tokens_per_row, fixed, auto, jitter, spread, t)
        done = chunk.go(curve, later_curve, done, tick_s)
        t = chunk.t
        if auto is not None:
            state = auto.state
            run.states.append(state.model_copy(deep=True))
    run.seconds = t
    return run


def best_fixed(rows: int, curve: dict[int, float], tokens_per_row: int, **kw: object) -> Run:
    """The best fixed level's whole run (fill and drain included), over the levels 1, 2, 4 ... 64."""
    runs = [simulate(rows, curve, tokens_per_row, fixed=n, **kw) for n in (1, 2, 4, 8, 16, 32, 64)]  # type: ignore[arg-type]
    return max(runs, key=lambda r: r.rows_per_s)
