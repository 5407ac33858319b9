"""Live progress of a run: one set of numbers, shown as the `<key>-progress` artifact and in the terminal.

`Progress` only counts (rows done, errors, rate, ETA); its sinks show a `Snapshot`. The counts
start from what is on disk, so a resumed run shows the whole job's rows and error rows, not
only this attempt's.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

log = logging.getLogger(__name__)

# The progress artifact: each update is a `prefect.artifact.updated` event, and `prefect deployment run
# --watch` prints every event of the run. Every 2 s made most of a watched run's lines progress updates;
# every 30 s and at chunk ends (at most one per 2 s) the UI still moves, and a watch reads its run.
ARTIFACT_EVERY_S = 30.0
ARTIFACT_CHUNK_END_EVERY_S = 2.0


def duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # NaN or inf
        return "n/a"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


@dataclass(frozen=True)
class Snapshot:
    """Where the job stands: rows on disk of all attempts, this attempt's rate."""

    key: str
    done: int
    total: int
    errors: int
    rate: float  # rows/s finished by this attempt, over its time so far
    final: bool = False
    chunk_end: bool = False  # a chunk just ended: a throttled sink may show it early

    @property
    def pct(self) -> float:
        return round(100.0 * self.done / self.total, 2) if self.total else 100.0

    @property
    def eta_s(self) -> float:
        return (self.total - self.done) / self.rate if self.rate else float("nan")

    def line(self) -> str:
        left = "done" if self.done >= self.total else f"ETA {duration(self.eta_s)}"
        return (
            f"[{self.key}] {self.done:,}/{self.total:,} rows ({self.pct:.1f}%) · {self.rate:.2f} rows/s · "
            f"{left} · {self.errors:,} error rows"
        )


Sink = Callable[[Snapshot], None]


class Progress:
    """Rows and error rows of a run as chunks report them (thread-safe); each change goes to the sinks."""

    def __init__(self, key: str, total: int, done_before: int, errors_before: int, sinks: list[Sink]) -> None:
        self.key = key
        self.total = total
        self.done_before = done_before
        self.errors_before = errors_before
        self.sinks = sinks
        self.started = time.monotonic()
        self._finished = (0, 0)  # rows, errors of this attempt in chunks that ended
        self._live: dict[int, tuple[int, int]] = {}  # chunk -> (rows, errors) this attempt, while running
        # chunk -> (rows, errors) earlier tries of a running chunk finished in this attempt. A retry, or
        # the chunk moved to another endpoint, counts again from 0 the rows it sends; those of the try
        # that failed are on disk and stay counted, so the numbers shown never go back.
        self._banked: dict[int, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._emit_lock = threading.Lock()

    def snapshot(self, final: bool = False) -> Snapshot:
        with self._lock:
            running = [*self._live.values(), *self._banked.values()]
            sent = self._finished[0] + sum(done for done, _ in running)
            errors = self._finished[1] + sum(errs for _, errs in running)
        elapsed = time.monotonic() - self.started
        rate = sent / elapsed if sent and elapsed > 0 else 0.0
        return Snapshot(self.key, self.done_before + sent, self.total, self.errors_before + errors, rate, final)

    def _emit(self, final: bool = False, chunk_end: bool = False) -> None:
        # Taken and shown under one lock: two chunks' threads emitting at once would otherwise let an older
        # count reach a sink after a newer one, and the numbers would step back.
        with self._emit_lock:
            snap = dataclasses.replace(self.snapshot(final), chunk_end=chunk_end)
            for sink in self.sinks:
                try:
                    sink(snap)
                except Exception:  # showing progress must never stop the job
                    log.warning("progress display failed", exc_info=True)

    def chunk_started(self, chunk: int) -> None:
        """A try of `chunk` starts: what an earlier try of it finished in this attempt stays counted."""
        with self._lock:
            rows, errors = self._live.pop(chunk, (0, 0))
            banked = self._banked.get(chunk, (0, 0))
            if rows or errors:
                self._banked[chunk] = (banked[0] + rows, banked[1] + errors)

    def update(self, chunk: int, done_in_chunk: int, errors_in_chunk: int) -> None:
        """A chunk's rows so far in this try (called after each checkpoint)."""
        with self._lock:
            self._live[chunk] = (done_in_chunk, errors_in_chunk)
        self._emit()

    def chunk_done(self, chunk: int, rows: int, errors: int) -> None:
        """The rows and error rows this attempt added to `chunk`, all its tries together (counted on disk:
        a failed try's last rows reach the journal but never a progress update)."""
        with self._lock:
            self._live.pop(chunk, None)
            self._banked.pop(chunk, None)
            self._finished = (self._finished[0] + rows, self._finished[1] + errors)
        if rows:  # a chunk an earlier attempt finished changes nothing worth showing
            self._emit(chunk_end=True)

    def start(self) -> None:
        self._emit()

    def finish(self) -> None:
        self._emit(final=True)


class Throttled:
    """Pass at most one snapshot per `every_s` to `sink`; the first and the final always pass. With
    `chunk_end_every_s`, a chunk's end passes too, once that much time has gone since the last."""

    def __init__(self, sink: Sink, every_s: float, chunk_end_every_s: float | None = None) -> None:
        self.sink, self.every_s, self.chunk_end_every_s = sink, every_s, chunk_end_every_s
        self._last: float | None = None
        self._lock = threading.Lock()

    def __call__(self, snap: Snapshot) -> None:
        with self._lock:
            now = time.monotonic()
            every = self.every_s
            if snap.chunk_end and self.chunk_end_every_s is not None:
                every = min(every, self.chunk_end_every_s)
            if not snap.final and self._last is not None and now - self._last < every:
                return
            self._last = now
        self.sink(snap)


class LineSink:
    """Plain lines (logs, a worker, a pipe): one line per snapshot that says something new. A rerun of a
    finished job starts and ends with the same numbers: its "done" line is printed once."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._last: str | None = None

    def __call__(self, snap: Snapshot) -> None:
        line = snap.line()
        if line == self._last:
            return
        self._last = line
        print(line, file=self.stream or sys.stderr, flush=True)


class BarSink:
    """A rich progress bar on a terminal: rows, rows/s, ETA and error rows, redrawn in place."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._task: Any = None

    def __call__(self, snap: Snapshot) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        fields = {
            "rate": f"{snap.rate:.2f} rows/s",
            "eta": "done" if snap.done >= snap.total else f"ETA {duration(snap.eta_s)}",
            "errors": f"{snap.errors:,} error rows",
        }
        if self._bar is None:
            self._bar = Progress(
                TextColumn(f"[bold]{snap.key}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.completed:,.0f}/{task.total:,.0f} rows"),
                TextColumn("{task.fields[rate]}"),
                TextColumn("{task.fields[eta]}"),
                TextColumn("[red]{task.fields[errors]}"),
                console=Console(stderr=True),
                refresh_per_second=2,
            )
            self._task = self._bar.add_task(snap.key, total=snap.total, completed=snap.done, **fields)
            self._bar.start()
        self._bar.update(self._task, completed=snap.done, **fields)
        if snap.final:
            self._bar.stop()


def terminal_sink(stream: TextIO | None = None) -> Sink:
    """A bar when stderr is a terminal; otherwise a plain line every 10 s (and the last one)."""
    target = stream or sys.stderr
    return BarSink() if target.isatty() else Throttled(LineSink(target), 10.0)
