"""The dispatcher on its own: who takes what, moves, benching, retirement."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from tasks.inference.dispatch import Dispatcher, LaneFailed


def test_a_failed_batch_moves_to_the_other_lane() -> None:
    done: list[tuple[str, list[int]]] = []
    calls: Counter[str] = Counter()
    b_failed = threading.Event()

    def run(lane: int, batch: list[int]) -> int:
        name = "ab"[lane]
        calls[name] += 1
        if name == "b":
            b_failed.set()
            raise LaneFailed("b's server died")
        b_failed.wait(5)  # b has its first batch before a's first one ends
        return sum(batch)

    dispatcher = Dispatcher(["a", "b"], run, lambda lane, batch, _: done.append(("ab"[lane], batch)), batch=2)
    dispatcher(list(range(10)))
    assert sorted(i for _, batch in done for i in batch) == list(range(10))  # every item once
    assert calls == {"a": 5, "b": 1} and all(lane == "a" for lane, _ in done)
    assert [2, 3] in [batch for _, batch in done]  # b's batch, done by a
    assert any("b failed (b's server died); 2 item(s) go back" in e for e in dispatcher.events)
    assert any("b retired for this run after 1 failure(s)" in e for e in dispatcher.events)


class FakeClock:
    """Monotonic time that moves only when the dispatcher sleeps: benching costs no real waiting."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_a_benched_lane_comes_back_after_the_delay() -> None:
    clock = FakeClock()
    attempts: list[float] = []

    def run(lane: int, batch: list[int]) -> None:
        attempts.append(clock())
        if len(attempts) < 3:
            raise LaneFailed("blip")

    done: list[list[int]] = []
    dispatcher = Dispatcher(
        ["only"],
        run,
        lambda _l, batch, _r: done.append(batch),
        retries=2,
        retry_delay_s=30,
        clock=clock,
        sleep=clock.sleep,
    )
    dispatcher([7])
    assert done == [[7]] and attempts == [0, 30, 60]  # each retry exactly one delay after the failure
    assert clock.sleeps == [30, 30]


def test_a_lane_out_of_retries_is_not_benched_again() -> None:
    clock = FakeClock()

    def run(lane: int, batch: list[int]) -> None:
        raise LaneFailed("down")

    dispatcher = Dispatcher(["only"], run, lambda *_: None, retries=1, retry_delay_s=5, clock=clock, sleep=clock.sleep)
    with pytest.raises(LaneFailed, match="every lane failed"):
        dispatcher([1])
    assert clock.sleeps == [5] and dispatcher.failures == [2]


def test_every_lane_failing_raises_the_last_failure() -> None:
    def run(lane: int, batch: list[int]) -> None:
        raise LaneFailed(f"lane {lane} down", retryable=lane == 0)

    with pytest.raises(LaneFailed, match=r"every lane failed, 3 batch item\(s\) left undone; last: lane") as info:
        Dispatcher(["x", "y"], run, lambda *_: None, retries=1, retry_delay_s=0.0)([1, 2, 3])
    assert isinstance(info.value.__cause__, LaneFailed)


def test_other_errors_are_raised_once_running_batches_end() -> None:
    finished: list[int] = []
    x_failed = threading.Event()

    def run(lane: int, batch: list[int]) -> None:
        if lane == 0:
            x_failed.set()
            raise ValueError("a bug, not a lane failure")
        # Lane y's batch is still running when x's error comes out (the event orders them), and
        # slow (the sleep is the scenario): a dispatcher that did not wait for it would miss its end.
        x_failed.wait(5)
        time.sleep(0.1)
        finished.append(batch[0])

    done: list[int] = []
    with pytest.raises(ValueError, match="a bug"):
        Dispatcher(["x", "y"], run, lambda lane, batch, _: done.extend(batch))([1, 2, 3])
    assert finished == [2]  # lane y's batch ran to its end before the error came out
    # ...and was handed on (its chunk's figures, its sink delivery), and no batch started after the error.
    assert done == [2]
