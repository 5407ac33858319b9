"""Hand work to lanes (GPU endpoints, or hosts) as each comes free; a failing lane's work moves to the others.

Plain threads, no Prefect: the flows pass `run`, which calls a Prefect task or starts a deployment
run. Each call runs in a copy of the caller's context, so Prefect links what it starts to the flow run.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


class LaneFailed(RuntimeError):
    """A lane could not finish its batch; what it finished is on disk, the rest goes to another lane.

    retryable=False retires the lane for the run at once (e.g. the model is missing there).
    """

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class Dispatcher(Generic[T, R]):
    """Runs `run(lane, batch)` for batches of `items`, one batch per lane at a time.

    A lane that raises LaneFailed gets its batch put back at the front of the queue and sits out
    `retry_delay_s`; after `retries` failures it is retired for the run. When no lane is left, the
    last failure is raised. Any other exception is raised as it is, once the running batches end (no new
    batch starts after it, and those that finish meanwhile still reach `on_done`).

    `clock` and `sleep` (monotonic seconds) time the benching; tests pass fakes to skip the waits.
    """

    def __init__(
        self,
        lanes: Sequence[str],
        run: Callable[[int, list[T]], R],
        on_done: Callable[[int, list[T], R], None],
        *,
        batch: int = 1,
        retries: int = 0,
        retry_delay_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.lanes = list(lanes)
        self.run = run
        self.on_done = on_done
        self.batch = max(1, batch)
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self.clock, self.sleep = clock, sleep
        self.failures = [0] * len(self.lanes)
        self.events: list[str] = []  # moves and retirements, with times, for the report

    def _event(self, text: str) -> None:
        log.warning(text)
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")

    def __call__(self, items: Sequence[T]) -> None:
        pending: deque[T] = deque(items)
        free = deque(range(len(self.lanes)))
        benched: dict[int, float] = {}  # lane -> clock time it may take work again
        running: dict[Future[R], tuple[int, list[T]]] = {}
        last_failure: LaneFailed | None = None
        error: BaseException | None = None  # not a lane's failure (a bug, a stop): raised once running batches end
        with ThreadPoolExecutor(max_workers=len(self.lanes), thread_name_prefix="lane") as pool:
            while (pending and error is None) or running:
                now = self.clock()
                for lane, at in list(benched.items()):
                    if at <= now:
                        del benched[lane]
                        free.append(lane)
                while pending and free and error is None:
                    lane = free.popleft()
                    batch = [pending.popleft() for _ in range(min(self.batch, len(pending)))]
                    future = pool.submit(contextvars.copy_context().run, self.run, lane, batch)
                    running[future] = (lane, batch)
                if not running:
                    if error is not None:
                        break
                    if not benched:
                        assert last_failure is not None
                        raise LaneFailed(
                            f"every lane failed, {len(pending)} batch item(s) left undone; last: {last_failure}"
                        ) from last_failure
                    self.sleep(max(0.0, min(benched.values()) - self.clock()))
                    continue
                timeout = max(0.0, min(benched.values()) - now) if benched else None
                done, _ = wait(running, timeout=timeout, return_when=FIRST_COMPLETED)
                for future in done:
                    lane, batch = running.pop(future)
                    try:
                        result = future.result()
                    except LaneFailed as exc:
                        last_failure = exc
                        pending.extendleft(reversed(batch))
                        self.failures[lane] += 1
                        name = self.lanes[lane]
                        if len(self.lanes) > 1:
                            where = "to the other lanes" if exc.retryable else "to the other lanes for good"
                            self._event(f"{name} failed ({exc}); {len(batch)} item(s) go back {where}")
                        if exc.retryable and self.failures[lane] <= self.retries:
                            benched[lane] = self.clock() + self.retry_delay_s
                        elif len(self.lanes) > 1:
                            self._event(f"{name} retired for this run after {self.failures[lane]} failure(s)")
                        continue
                    except BaseException as exc:
                        error = error or exc
                        continue
                    self.on_done(lane, batch, result)
                    free.append(lane)
        if error is not None:
            raise error
