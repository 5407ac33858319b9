"""The finished chunks consolidated into results.parquet, and the error rows counted."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from tasks.plan.dataset import ChunkSpec
from tasks.storage.files import file_fingerprint, owner_fingerprint, remove_stale_tmps, write_atomic
from tasks.storage.journal import chunk_path, part_paths, rows_on_disk


def consolidate(out: Path, chunks: list[ChunkSpec], total_rows: int) -> Path:
    """Concatenate the chunk files (each sorted, chunks in input order) into results.parquet."""
    paths = [chunk_path(out, c) for c in chunks]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise RuntimeError(f"cannot consolidate: {len(missing)} chunk file(s) missing, first {missing[0]}")
    fingerprint = owner_fingerprint(out)
    foreign = [p.name for p in paths if (f := file_fingerprint(p)) is not None and f != fingerprint]
    if foreign:  # the start-of-run check sets these aside; one appearing since is never published
        raise RuntimeError(f"cannot consolidate: {', '.join(foreign[:3])} made under another configuration")
    target = out / "results.parquet"
    remove_stale_tmps(target)  # a consolidation killed mid-write left its temporary file
    # Streaming sink: the results never sit in memory whole, however many rows the job has.
    write_atomic(target, lambda tmp: pl.scan_parquet(paths).sink_parquet(tmp))
    count = pl.scan_parquet(target).select(pl.len(), pl.col("row_index").n_unique()).collect().row(0)
    if count != (total_rows, total_rows):
        raise RuntimeError(f"results.parquet has {count[0]} rows ({count[1]} unique) for {total_rows} input rows")
    return target


def counts(out: Path, chunks: list[ChunkSpec]) -> dict[str, int]:
    """ok / error rows and their generated tokens on disk, in finished chunks and in the parts and
    journals of unfinished ones: after a stop or a failure mid-chunk, what a rerun does not send again."""
    if not chunks:
        return {"ok": 0, "error": 0, "tokens": 0}
    rows = pl.concat([rows_on_disk(out, c) for c in chunks])
    statuses = rows["status"]
    tokens = rows["completion_tokens"].sum()
    return {"ok": int((statuses == "ok").sum()), "error": int((statuses == "error").sum()), "tokens": int(tokens or 0)}


def _written(out: Path, chunks: list[ChunkSpec]) -> list[Path]:
    """The Parquet files holding the chunks' rows: each finished chunk's file, else its checkpoint parts."""
    return [p for c in chunks for p in ([chunk_path(out, c)] if chunk_path(out, c).exists() else part_paths(out, c))]


def error_kinds(out: Path, chunks: list[ChunkSpec]) -> dict[str, int]:
    """Error rows by kind over everything on disk (finished chunks, checkpoint parts and journals), the
    rows `counts` counts: the report's kinds add up to the manifest's rows_error."""
    if not chunks:
        return {}
    rows = pl.concat([rows_on_disk(out, c) for c in chunks])
    frame = rows.filter(pl.col("status") == "error").group_by("error_kind").len()
    return {str(k): int(n) for k, n in frame.iter_rows()}


def server_timed(out: Path, chunks: list[ChunkSpec]) -> tuple[float, float] | None:
    """Over the answers the server timed (prompt processing and generation: llama.cpp's server,
    Ollama), the share of the client's wait those took and the mean seconds a request spent outside
    them (HTTP, queueing, the server's other host work); None when no answer was timed."""
    paths = _written(out, chunks)
    if not paths:
        return None
    timed = pl.col("prompt_eval_ms").is_not_null() & pl.col("eval_ms").is_not_null() & (pl.col("latency_ms") > 0)
    n, waited, inside = (
        pl.scan_parquet(paths)
        .filter((pl.col("status") == "ok") & timed)
        .select(pl.len(), pl.col("latency_ms").sum(), (pl.col("prompt_eval_ms") + pl.col("eval_ms")).sum())
        .collect()
        .row(0)
    )
    if not n or not waited:
        return None
    return inside / waited, max(0.0, waited - inside) / n / 1000
