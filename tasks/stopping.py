"""The run's stop request: the first SIGINT or SIGTERM sets it for the whole process, a second exits at once.

Signal handlers run in the main thread (the CLI's, or that of the flow-run process a Prefect
worker starts); chunks run in other threads, each in its own asyncio loop. So the request is a
process-wide event that they poll: a chunk stops taking rows, gives the requests in flight
GRACE_S to answer (their rows are kept), journals what finished and raises Interrupted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager, suppress

GRACE_S = 3.0  # requests in flight may still answer this long after the signal; the rest are resent by a rerun
POLL_S = 0.1  # how often a waiting chunk looks at the request

_requested = threading.Event()
_signal: signal.Signals | None = None


class Interrupted(Exception):
    """A signal stopped the run; the rows finished before it are on disk, and a rerun resumes after them.

    An Exception, not a BaseException like KeyboardInterrupt: Prefect records the chunk's task run
    as Failed with this message (a BaseException would read Crashed) and its retry condition does
    not retry it; the flow ends its flow run Cancelled with the same message.
    """

    def __init__(self, signum: signal.Signals, where: str) -> None:
        super().__init__(f"interrupted by {signum.name} {where}")
        self.signum = signum
        self.where = where
        self.on_disk: str | None = None  # "N rows on disk in DIR", set once the flow wrote its manifest

    def __reduce__(self) -> tuple[object, ...]:
        # An exception pickles as cls(*args), and args holds only the message: rebuild from what __init__ takes
        # (a process pool or a persisted failed state pickles it).
        return (type(self), (self.signum, self.where), self.__dict__)


def requested() -> signal.Signals | None:
    """The signal that asked the run to stop, or None."""
    return _signal if _requested.is_set() else None


def request(signum: signal.Signals) -> bool:
    """Ask every chunk to stop; False when a stop was asked already."""
    global _signal
    if _requested.is_set():
        return False
    _signal = signum
    _requested.set()
    return True


def check(where: str) -> None:
    """Raise Interrupted if a stop was asked: before work that would send new requests."""
    if (signum := requested()) is not None:
        raise Interrupted(signum, where)


def sleep(seconds: float) -> bool:
    """Sleep up to `seconds`, less if a stop is asked meanwhile; True when it was."""
    return _requested.wait(seconds)


def pause(seconds: float, where: str) -> None:
    """Sleep up to `seconds`; raise Interrupted as soon as a stop is asked (time.sleep would wait it out)."""
    sleep(seconds)
    check(where)


async def wait() -> signal.Signals:
    """Return once a stop is asked. Polled: the signal arrives in another thread than this loop's."""
    while (signum := requested()) is None:
        await asyncio.sleep(POLL_S)
    return signum


async def or_stop(work: Awaitable[None]) -> signal.Signals | None:
    """Await `work` unless a stop is asked first: then it is cancelled and the signal returned (a server
    that hangs must not hold a stop for its whole timeout). None when it finished; its error is raised."""
    task, stop = asyncio.ensure_future(work), asyncio.ensure_future(wait())
    try:
        await asyncio.wait((task, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        stop.cancel()
        await asyncio.gather(task, stop, return_exceptions=True)
    if task.cancelled():
        return requested()
    task.result()
    return None


async def sleep_async(seconds: float) -> None:
    """asyncio.sleep(seconds), cut short when a stop is asked."""
    with suppress(TimeoutError):
        await asyncio.wait_for(wait(), seconds)


def _say(text: str) -> None:
    # os.write, not print: a handler that prints while the main thread is inside a print of its
    # own gets "reentrant call" from the buffered stream.
    os.write(2, f"\n{text}\n".encode())


def _on_signal(signum: int, frame: object) -> None:
    sig = signal.Signals(signum)
    if not request(sig):
        _say(f"{sig.name} again: exiting now; rows journaled so far are on disk, the same command resumes")
        os._exit(128 + signum)  # at once: no cleanup that could hang (a temporary server dies with us)
    _say(
        f"{sig.name}: stopping; requests in flight get {GRACE_S:.0f} s to answer, then the run writes what it has "
        f"and exits ({sig.name} again exits at once)"
    )


def install() -> bool:
    """Make SIGINT and SIGTERM ask for a stop (and a second one exit at once); False outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _on_signal)
    return True


@contextmanager
def signals_stop_the_run() -> Iterator[None]:
    """For the block, in the main thread: SIGINT and SIGTERM ask for a stop (install()), then the handlers
    before it come back. Inside a flow run this stands in for Prefect's own SIGTERM handler, which
    raises in the main thread and leaves the chunk threads running to the end of their chunk."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    install()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: set outside Python, nothing to put back
                signal.signal(signum, handler)
