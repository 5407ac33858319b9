"""The `in_flight: auto` search as a pure step function: feed it a measurement, it names the next level.

Levels 1, 2, 4 ... are tried until two levels in a row fail to beat the best so far by 5 %; each
is measured over ROWS_PER_SLOT x level rows of the real work, and at least MIN_WINDOW_S (nothing is
wasted). The smallest level within 3 % of the best one wins (bottleneck.best_in_flight, which the
report's advice uses too): more in flight only adds latency (and KV cache) once the slots are full.

Two misses, not one: on a real llama.cpp server on an H200 one short window at 2 in flight measured
no gain over 1 where whole runs gave +49 % at 2 and +117 % at 8, so one noisy step ended the search.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tasks.bottleneck import best_in_flight

ROWS_PER_SLOT = 8
MIN_WINDOW_S = 2.0  # a level's window lasts at least this long: a second of requests is mostly noise
MISSES = 2  # levels in a row without GROWTH over the best before the search stops
GROWTH = 1.05  # a level must beat the one before by this much for the search to go on


@dataclass
class Calibration:
    ceiling: int  # the highest level to try (max_in_flight)
    level: int = 1  # the level being measured
    curve: dict[int, float] = field(default_factory=dict)  # level -> throughput
    misses: int = 0  # levels in a row that did not beat the best so far by GROWTH

    def rows_needed(self) -> int:
        return ROWS_PER_SLOT * self.level

    def measured(self, throughput: float) -> int | None:
        """Record the current level's throughput; return the next level, or None when the search is over."""
        best = max(self.curve.values(), default=0.0)
        self.curve[self.level] = throughput
        self.misses = 0 if throughput >= best * GROWTH else self.misses + 1
        if self.level * 2 > self.ceiling or self.misses >= MISSES:
            return None
        self.level *= 2
        return self.level

    def choice(self) -> int | None:
        """The level to keep; None when not even one level could be measured."""
        return best_in_flight(self.curve) if self.curve else None

    def summary(self, unit: str) -> str:
        shown = ", ".join(f"{n}: {v:.1f}" for n, v in self.curve.items())
        return f"auto in-flight: {unit} by level {{{shown}}} -> {self.choice()} in flight"
