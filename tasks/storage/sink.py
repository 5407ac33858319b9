"""The SQL sink follows the Parquet ledger: each finished chunk file is upserted once it exists.

A chunk counts as delivered when its upsert committed and its marker file is written
(out/sink/<sink key>/chunk-00007.done), naming the chunk file it delivered (size and mtime). A
failed upsert leaves no marker, and a chunk file redone since (set aside as damaged, then run
again) no longer matches its marker, so the next run delivers it again; the upsert is by id, so
delivering twice changes nothing.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import BaseModel

from tasks.io.sql import SqlError, TableSink
from tasks.plan.dataset import ChunkSpec
from tasks.schema import RESULT_SCHEMA, output_columns
from tasks.settings.model import JobSettings
from tasks.storage.files import write_json_atomic
from tasks.storage.journal import chunk_path


class SinkBehind(RuntimeError):
    """Every row is in results.parquet, but the sink missed chunks; a rerun delivers them."""


class SinkRefused(SqlError):
    """Before any request: the sink database cannot be reached, or its table cannot take the results."""


def open_sink(settings: JobSettings, output_model: type[BaseModel] | None, *, create: bool) -> ChunkSink | None:
    """The job's sink, checked: reachable, its table compatible with the result columns (the parsed
    fields included). `create` makes a missing table; without it (the command line's pre-flight)
    nothing in the database changes. None when the job has no sink."""
    if settings.sink is None:
        return None
    sink = ChunkSink(settings, output_columns(output_model))
    try:
        sink.table.prepare(create=create)
    except SqlError as exc:
        raise SinkRefused(str(exc)) from None
    return sink


def _file_identity(path: Path) -> str | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return f"{stat.st_size}:{stat.st_mtime_ns}"


class ChunkSink:
    """Delivers finished chunks to the job's sink table and remembers which ones it delivered."""

    def __init__(self, settings: JobSettings, parsed_columns: dict[str, Any]) -> None:
        assert settings.sink is not None
        self.out = settings.output_dir
        self.table = TableSink(settings.sink, {**RESULT_SCHEMA, **parsed_columns})
        self.failures: dict[int, str] = {}  # chunk index -> why its upsert failed in this run
        self.delivered_rows = 0
        # One thread, so chunks reach the table in order while the next chunk already runs on the GPU.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sink")
        self._pending: list[tuple[ChunkSpec, Future[bool]]] = []
        self._lock = threading.Lock()

    def marker(self, chunk: ChunkSpec) -> Path:
        return self.out / "sink" / self.table.key / f"{chunk.name}.done"

    def delivered(self, chunk: ChunkSpec) -> bool:
        """The chunk file as it is now reached the table (its marker names this very file)."""
        try:
            marker = json.loads(self.marker(chunk).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(marker, dict) and marker.get("file") == _file_identity(chunk_path(self.out, chunk))

    def deliver(self, chunk: ChunkSpec) -> bool:
        """Upsert one finished chunk unless it was delivered before; False when the sink refused it."""
        if self.delivered(chunk):
            return True
        path = chunk_path(self.out, chunk)
        identity = _file_identity(path)
        frame = pl.read_parquet(path)
        try:
            written = self.table.upsert(frame)
        except SqlError as exc:
            with self._lock:
                self.failures[chunk.index] = str(exc)
            return False
        with self._lock:
            self.delivered_rows += written
            self.failures.pop(chunk.index, None)
        marker = {"table": self.table.sink.table, "rows": frame.height, "file": identity, "at": time.time()}
        write_json_atomic(marker, self.marker(chunk))
        return True

    def deliver_later(self, chunk: ChunkSpec) -> Future[bool]:
        """Deliver in the background; `drain` waits for every delivery handed over so far."""
        future = self._pool.submit(self.deliver, chunk)
        self._pending.append((chunk, future))
        return future

    def drain(self) -> None:
        for chunk, future in self._pending:
            try:
                future.result()
            except Exception as exc:  # never mask the run's own outcome; the marker is missing, a rerun retries
                self.failures[chunk.index] = f"{type(exc).__name__}: {exc}"
        self._pending.clear()

    def close(self) -> None:
        """Wait for every delivery handed over, then stop the sink's thread."""
        self.drain()
        self._pool.shutdown(wait=True)

    def summary(self, chunks: list[ChunkSpec]) -> dict[str, Any]:
        """For the manifest: what the sink holds of this job (no URI secrets: the URI never has them)."""
        pending = [c.name for c in chunks if not self.delivered(c)]
        return {
            "table": self.table.sink.table,
            "uri": self.table.sink.uri,
            "rows_upserted_this_run": self.delivered_rows,
            "chunks_pending": pending,
            "last_error": next(reversed(self.failures.values()), None),
        }

    def raise_if_behind(self, chunks: list[ChunkSpec]) -> None:
        pending = [c for c in chunks if not self.delivered(c)]
        if pending:
            last = next(reversed(self.failures.values()), "not delivered")
            raise SinkBehind(
                f"results.parquet is complete, but {len(pending)} chunk(s) did not reach sink table "
                f"{self.table.sink.table} (first {pending[0].name}; last error: {last}). "
                "Run the job again when the database is back: it only delivers the missing chunks"
            )
