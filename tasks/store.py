"""The Parquet ledger: atomic checkpoint and chunk files, resume scan, consolidation, manifest.

Layout of an output directory:
    job.json                       fingerprint of the configuration that owns the directory
    .lock                          flock held by the running job
    chunks/chunk-00007.parquet     a finished chunk (all its rows, sorted by row_index)
    chunks/chunk-00007.part-00002.parquet   rows finished inside a chunk still running
    results.parquet                every input row once, in input order (written last)
    manifest.json                  counts, timings, versions
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl

from tasks.dataset import ChunkSpec
from tasks.schema import ResultRow, rows_to_frame


class OutputDirError(RuntimeError):
    """The output directory belongs to another job, or another run holds it."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Any) -> None:
    """Write through a temporary file then rename, so readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    with tmp.open("rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_parquet_atomic(frame: pl.DataFrame, path: Path) -> None:
    write_atomic(path, frame.write_parquet)


def write_json_atomic(data: dict[str, Any], path: Path) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8"))


def chunk_path(out: Path, chunk: ChunkSpec) -> Path:
    return out / "chunks" / f"{chunk.name}.parquet"


def part_paths(out: Path, chunk: ChunkSpec) -> list[Path]:
    return sorted((out / "chunks").glob(f"{chunk.name}.part-*.parquet"))


def finished_rows(out: Path, chunk: ChunkSpec) -> set[int]:
    """Row indices of this chunk already on disk (whole chunk, or its checkpoint parts)."""
    done = chunk_path(out, chunk)
    paths = [done] if done.exists() else part_paths(out, chunk)
    if not paths:
        return set()
    return set(pl.scan_parquet(paths).select("row_index").collect()["row_index"].to_list())


class ChunkWriter:
    """Collects a chunk's result rows and checkpoints them to part files as they finish.

    A part is written when `checkpoint_rows` rows are buffered or `checkpoint_every_s`
    has passed, so a kill loses at most the rows finished since the last part (plus
    those in flight); `finish` folds the parts into the chunk file.
    """

    def __init__(
        self,
        out: Path,
        chunk: ChunkSpec,
        parsed_columns: dict[str, Any],
        checkpoint_rows: int,
        checkpoint_every_s: float,
    ) -> None:
        self.out = out
        self.chunk = chunk
        self.parsed_columns = parsed_columns
        self.checkpoint_rows = checkpoint_rows
        self.checkpoint_every_s = checkpoint_every_s
        self._buffer: list[ResultRow] = []
        self._last_flush = time.monotonic()
        existing = part_paths(out, chunk)
        self._next_part = int(existing[-1].name.split(".part-")[1].split(".")[0]) + 1 if existing else 0

    def add(self, row: ResultRow) -> bool:
        """Buffer a row; True when a checkpoint is due."""
        self._buffer.append(row)
        return self.flush_due()

    def flush_due(self) -> bool:
        return bool(self._buffer) and (
            len(self._buffer) >= self.checkpoint_rows or time.monotonic() - self._last_flush >= self.checkpoint_every_s
        )

    def take(self) -> list[ResultRow]:
        """Hand the buffered rows to a flush (which may run in another thread)."""
        rows, self._buffer = self._buffer, []
        self._last_flush = time.monotonic()
        return rows

    def write_part(self, rows: list[ResultRow]) -> None:
        if not rows:
            return
        path = self.out / "chunks" / f"{self.chunk.name}.part-{self._next_part:05d}.parquet"
        self._next_part += 1
        write_parquet_atomic(rows_to_frame(rows, self.parsed_columns), path)

    def finish(self) -> pl.DataFrame:
        """Write the chunk file from its parts; check every row of the chunk is there once."""
        self.write_part(self.take())
        parts = part_paths(self.out, self.chunk)
        frame = pl.read_parquet(parts).sort("row_index") if parts else pl.DataFrame()
        expected = list(range(self.chunk.offset, self.chunk.offset + self.chunk.length))
        got = frame["row_index"].to_list() if frame.height else []
        if got != expected:
            missing = sorted(set(expected) - set(got))[:5]
            dupes = frame.filter(pl.col("row_index").is_duplicated())["row_index"].unique().to_list()[:5] if got else []
            raise RuntimeError(f"{self.chunk.name}: rows do not match the plan (missing {missing}, duplicated {dupes})")
        write_parquet_atomic(frame, chunk_path(self.out, self.chunk))
        for part in parts:  # the chunk file now holds them; a crash here leaves parts that resume ignores
            part.unlink()
        return frame


def clean_finished_parts(out: Path, chunk: ChunkSpec) -> None:
    """Remove parts left by a crash between writing a chunk file and deleting its parts."""
    if chunk_path(out, chunk).exists():
        for part in part_paths(out, chunk):
            part.unlink()


def consolidate(out: Path, chunks: list[ChunkSpec], total_rows: int) -> Path:
    """Concatenate the chunk files (each sorted, chunks in input order) into results.parquet."""
    paths = [chunk_path(out, c) for c in chunks]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise RuntimeError(f"cannot consolidate: {len(missing)} chunk file(s) missing, first {missing[0]}")
    target = out / "results.parquet"
    # Streaming sink: the results never sit in memory whole, however many rows the job has.
    write_atomic(target, lambda tmp: pl.scan_parquet(paths).sink_parquet(tmp))
    count = pl.scan_parquet(target).select(pl.len(), pl.col("row_index").n_unique()).collect().row(0)
    if count != (total_rows, total_rows):
        raise RuntimeError(f"results.parquet has {count[0]} rows ({count[1]} unique) for {total_rows} input rows")
    return target


@contextmanager
def claim_output_dir(out: Path, fingerprint: str, job_record: dict[str, Any]) -> Iterator[None]:
    """Hold the directory for one run, refusing another run or another configuration.

    flock is released by the kernel when the holder dies, so a killed run leaves no
    stale lock behind.
    """
    out.mkdir(parents=True, exist_ok=True)
    handle = (out / ".lock").open("a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise OutputDirError(f"output_dir {out} is in use by another run ({owner})") from None
    try:
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        record_path = out / "job.json"
        if record_path.exists():
            previous = json.loads(record_path.read_text(encoding="utf-8"))
            if previous.get("fingerprint") != fingerprint:
                raise OutputDirError(
                    f"output_dir {out} holds results of a different job configuration "
                    f"(fingerprint {previous.get('fingerprint')}, this job {fingerprint}); "
                    "use another output_dir, or delete this one to start over"
                )
        else:
            write_json_atomic({"fingerprint": fingerprint, **job_record}, record_path)
        yield
    finally:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()


def counts(out: Path, chunks: list[ChunkSpec]) -> dict[str, int]:
    """ok / error rows in the finished chunk files."""
    paths = [chunk_path(out, c) for c in chunks if chunk_path(out, c).exists()]
    if not paths:
        return {"ok": 0, "error": 0}
    frame = pl.scan_parquet(paths).group_by("status").len().collect()
    found = dict(zip(frame["status"].to_list(), frame["len"].to_list(), strict=True))
    return {"ok": found.get("ok", 0), "error": found.get("error", 0)}


def build_manifest(
    settings: Any,
    plan: Any,
    fingerprint: str,
    row_counts: dict[str, int],
    started: float,
    finished: float,
    *,
    complete: bool,
    error: str | None,
) -> dict[str, Any]:
    """What a run produced, with what, and how long it took."""
    from importlib.metadata import PackageNotFoundError, version

    def _version(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    out = settings.output_dir
    return {
        "complete": complete,
        "error": error,
        "fingerprint": fingerprint,
        "results": str(out / "results.parquet") if complete else None,
        "input": str(settings.input_path),
        "input_digest": plan.input_digest,
        "backend": settings.backend,
        "model": settings.model,
        "rows_total": plan.total_rows,
        "rows_ok": row_counts["ok"],
        "rows_error": row_counts["error"],
        "rows_pending": plan.total_rows - row_counts["ok"] - row_counts["error"],
        "chunks": len(plan.chunks),
        "started_at": started,
        "finished_at": finished,
        "wall_s": round(finished - started, 3),
        "settings": settings.model_dump(mode="json"),
        "versions": {
            name: _version(name)
            for name in ("prefect", "ollama", "polars", "pyarrow", "pydantic", "llama-cpp-python", "nvidia-ml-py")
        },
    }


def error_kinds(out: Path, chunks: list[ChunkSpec]) -> dict[str, int]:
    """Error rows by kind over everything on disk (finished chunks and checkpoint parts)."""
    paths = [p for c in chunks for p in ([chunk_path(out, c)] if chunk_path(out, c).exists() else part_paths(out, c))]
    if not paths:
        return {}
    frame = pl.scan_parquet(paths).filter(pl.col("status") == "error").group_by("error_kind").len().collect()
    return {str(k): int(n) for k, n in frame.iter_rows()}
