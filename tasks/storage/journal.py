"""A chunk's rows on disk: checkpointed parts, the per-row journal between them, the finished chunk file, and the resume scan."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NamedTuple

import polars as pl

from tasks.plan.dataset import ChunkSpec
from tasks.schema import RESULT_SCHEMA, ResultRow, rows_to_frame
from tasks.storage.files import file_fingerprint, fsync_dir, owner_fingerprint, write_atomic, write_parquet_atomic
from tasks.storage.outdir import flock


def chunk_path(out: Path, chunk: ChunkSpec) -> Path:
    return out / "chunks" / f"{chunk.name}.parquet"


def part_paths(out: Path, chunk: ChunkSpec) -> list[Path]:
    return sorted((out / "chunks").glob(f"{chunk.name}.part-*.parquet"))


def journal_paths(out: Path, chunk: ChunkSpec) -> list[Path]:
    return sorted((out / "chunks").glob(f"{chunk.name}.journal-*.jsonl"))


def _seq(path: Path) -> int:
    """The segment number in chunk-00007.part-00002.parquet / chunk-00007.journal-00002.jsonl."""
    return int(path.name.split("-")[-1].split(".")[0])


class JournalRead(NamedTuple):
    rows: list[ResultRow]
    skipped: int  # lines cut by a kill or damaged on disk: those rows are sent again
    fingerprint: str | None


def read_journal(path: Path) -> JournalRead:
    """Rows of a journal segment. Each line is decoded on its own, so a line cut inside a multi-byte
    character, or any damaged line, costs that row only (it is redone), never the segment."""
    rows, skipped, fingerprint = [], 0, None
    with path.open("rb") as handle:
        for number, line in enumerate(handle):
            try:
                if number == 0 and line.startswith(b'{"journal_fingerprint"'):
                    fingerprint = json.loads(line)["journal_fingerprint"]
                    continue
                rows.append(ResultRow.model_validate_json(line))
            except ValueError:  # UnicodeDecodeError and pydantic's ValidationError are ValueErrors
                skipped += 1
    return JournalRead(rows, skipped, fingerprint)


def _journal_rows(path: Path) -> list[ResultRow]:
    return read_journal(path).rows


def rows_on_disk(out: Path, chunk: ChunkSpec) -> pl.DataFrame:
    """`row_index`, `status`, `error_kind` and `completion_tokens` of this chunk's rows on disk, each row
    once: the chunk file, or its parts and journal (a row in both, from a kill between a checkpoint and the
    journal's removal, once).

    Safe beside the run writing the chunk: when it finishes the chunk between our listing its parts
    and reading them (the parts are then deleted), the finished chunk file is read instead.
    """
    columns = ["row_index", "status", "error_kind", "completion_tokens"]
    schema = {name: RESULT_SCHEMA[name] for name in columns}
    for _ in range(3):
        done = chunk_path(out, chunk)
        if done.exists():
            return pl.scan_parquet(done).select(columns).collect()
        try:
            frames = [pl.scan_parquet(parts).select(columns).collect()] if (parts := part_paths(out, chunk)) else []
            journaled = [
                (r.row_index, r.status, r.error_kind, r.completion_tokens)
                for j in journal_paths(out, chunk)
                for r in _journal_rows(j)
            ]
        except FileNotFoundError:
            continue
        frames.append(pl.DataFrame(journaled, schema=schema, orient="row"))
        return pl.concat(frames, how="vertical_relaxed").unique("row_index", keep="first", maintain_order=True)
    raise RuntimeError(f"{chunk.name} of {out} kept changing while its rows were counted")


def finished_rows(out: Path, chunk: ChunkSpec) -> set[int]:
    """Row indices of this chunk already on disk: what a rerun does not send again."""
    return set(rows_on_disk(out, chunk)["row_index"].to_list())


class ChunkWriter:
    """Collects a chunk's result rows: a journal line per finished row, Parquet checkpoints in batches.

    Every finished row is appended to a JSON-lines journal segment at once (written through to
    the OS, so a killed process loses nothing it finished); `sync` makes the segment durable, so
    a machine crash loses nothing that was synced. A checkpoint turns the segment into a Parquet
    part (fsynced) when `checkpoint_rows` rows are buffered or `checkpoint_every_s` has passed;
    `finish` folds the parts into the chunk file.
    Journal segment k always becomes part k, which makes recovery after a crash unambiguous.
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
        self._sync_lock = threading.Lock()  # sync() runs in a thread; rotation must not close under it
        self.fingerprint = owner_fingerprint(out)  # written into every file, so none is taken for another job's
        (out / "chunks").mkdir(parents=True, exist_ok=True)
        self._recover()
        existing = part_paths(out, chunk)
        self._seq = _seq(existing[-1]) + 1 if existing else 0
        self._journal = self._open_journal()

    def _recover(self) -> None:
        """Turn journal segments left by a killed run into parts (or drop them if already parts)."""
        parts = {_seq(p) for p in part_paths(self.out, self.chunk)}
        for journal in journal_paths(self.out, self.chunk):
            if _seq(journal) not in parts and (rows := _journal_rows(journal)):
                self._write_rows(rows, _seq(journal))
            journal.unlink()

    def _journal_path(self, seq: int) -> Path:
        return self.out / "chunks" / f"{self.chunk.name}.journal-{seq:05d}.jsonl"

    def _open_journal(self) -> Any:
        self._segment_synced = False
        handle = self._journal_path(self._seq).open("a", encoding="utf-8")
        if self.fingerprint and handle.tell() == 0:
            handle.write(json.dumps({"journal_fingerprint": self.fingerprint}) + "\n")
            handle.flush()
        return handle

    def sync(self) -> None:
        """Flush the journal to the disk (fdatasync): rows journaled so far survive a machine crash."""
        with self._sync_lock:
            if self._journal.closed:
                return
            os.fdatasync(self._journal.fileno())
            if not self._segment_synced:  # the new segment's name too, once, off the request path
                fsync_dir(self.out / "chunks")
                self._segment_synced = True

    def add(self, row: ResultRow) -> bool:
        """Journal and buffer a finished row; True when a checkpoint is due."""
        self._journal.write(row.model_dump_json() + "\n")
        self._journal.flush()
        self._buffer.append(row)
        return self.flush_due()

    def flush_due(self) -> bool:
        return bool(self._buffer) and (
            len(self._buffer) >= self.checkpoint_rows or time.monotonic() - self._last_flush >= self.checkpoint_every_s
        )

    def take(self) -> tuple[list[ResultRow], int]:
        """Hand the buffered rows and their segment number to a checkpoint (which may run in a thread)."""
        rows, self._buffer = self._buffer, []
        seq = self._seq
        with self._sync_lock:
            self._journal.close()
            self._seq += 1
            self._journal = self._open_journal()
        self._last_flush = time.monotonic()
        return rows, seq

    def _write_rows(self, rows: list[ResultRow], seq: int) -> None:
        path = self.out / "chunks" / f"{self.chunk.name}.part-{seq:05d}.parquet"
        write_parquet_atomic(rows_to_frame(rows, self.parsed_columns), path, self.fingerprint)

    def write_part(self, rows: list[ResultRow], seq: int) -> None:
        """Checkpoint: the rows of journal segment `seq` become part `seq`, then the segment goes."""
        if rows:
            self._write_rows(rows, seq)
        self._journal_path(seq).unlink(missing_ok=True)

    def close(self) -> None:
        """Stop journaling; rows not yet checkpointed stay in the journal for `finish` or the next run."""
        with self._sync_lock:
            self._journal.close()

    def finish(self) -> pl.DataFrame:
        """Write the chunk file from its parts; check every row of the chunk is there once."""
        # The rows buffered since the last checkpoint are exactly the open journal segment:
        # recovery turns it into the last part, the same path a resumed run takes.
        self.close()
        self._recover()
        parts = part_paths(self.out, self.chunk)
        frame = pl.read_parquet(parts).sort("row_index") if parts else pl.DataFrame()
        expected = list(range(self.chunk.offset, self.chunk.offset + self.chunk.length))
        got = frame["row_index"].to_list() if frame.height else []
        if got != expected:
            missing = sorted(set(expected) - set(got))[:5]
            dupes = frame.filter(pl.col("row_index").is_duplicated())["row_index"].unique().to_list()[:5] if got else []
            raise RuntimeError(f"{self.chunk.name}: rows do not match the plan (missing {missing}, duplicated {dupes})")
        write_parquet_atomic(frame, chunk_path(self.out, self.chunk), self.fingerprint)
        with (self.out / "chunks" / "finished.jsonl").open("a", encoding="utf-8") as ledger:
            ledger.write(json.dumps({"chunk": self.chunk.index, "rows": frame.height}) + "\n")
        for part in parts:  # the chunk file now holds them; a crash here leaves parts that resume ignores
            part.unlink()
        return frame


def clean_finished_parts(out: Path, chunk: ChunkSpec) -> None:
    """Remove parts and journals left by a crash between writing a chunk file and deleting them."""
    if chunk_path(out, chunk).exists():
        for path in [*part_paths(out, chunk), *journal_paths(out, chunk)]:
            path.unlink()


@contextmanager
def claim_chunk(out: Path, chunk: ChunkSpec) -> Iterator[None]:
    """Hold one chunk, so two processes (or hosts, on a shared filesystem) never write it at once."""
    with flock(out / ".locks" / f"{chunk.name}.lock", f"{chunk.name} of {out}"):
        yield


def _set_aside(out: Path, path: Path, why: str, rows: str) -> str:
    """Move a file a rerun cannot use out of the way (kept for a look); say what happens to its rows."""
    target = out / "set-aside" / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)
    return f"{path.name} {why}: moved to {target.relative_to(out)}; {rows} sent again"


def _chunk_file_problem(path: Path, chunk: ChunkSpec, fingerprint: str | None) -> str | None:
    try:
        made_under = file_fingerprint(path)
        got = pl.read_parquet(path)["row_index"].to_list()  # the whole file: a damaged page fails here
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        return f"cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    if made_under is not None and made_under != fingerprint:
        return f"was made under another configuration (fingerprint {made_under}, this job {fingerprint})"
    if path.name.endswith(f"{chunk.name}.parquet") and got != list(range(chunk.offset, chunk.offset + chunk.length)):
        return "does not hold the chunk's rows"
    return None


def check_chunk_files(out: Path, chunks: list[ChunkSpec]) -> list[str]:
    """Before a run: read what earlier runs left, set aside what cannot be used, say what is redone.

    A damaged or foreign chunk or part file is moved to set-aside/ (its rows are sent again); a
    journal's torn or undecodable lines are counted (those rows are sent again); a chunk file an
    earlier run finished but that is gone is named. Returns one line per finding.
    """
    fingerprint = owner_fingerprint(out)
    said = []
    ledger = out / "chunks" / "finished.jsonl"
    finished: set[int] = set()
    if ledger.exists():
        for line in ledger.read_bytes().splitlines():
            with suppress(ValueError, KeyError, TypeError):
                finished.add(int(json.loads(line)["chunk"]))
    redo: set[int] = set()  # finished once, to be done again: off the ledger, so it is said once
    for chunk in chunks:
        done = chunk_path(out, chunk)
        if done.exists():
            if problem := _chunk_file_problem(done, chunk, fingerprint):
                said.append(_set_aside(out, done, problem, f"its {chunk.length} rows are"))
                redo.add(chunk.index)
            continue
        if chunk.index in finished:
            said.append(
                f"{done.name} was written by an earlier run but is gone: its {chunk.length} rows are sent again"
            )
            redo.add(chunk.index)
        for part in part_paths(out, chunk):
            if problem := _chunk_file_problem(part, chunk, fingerprint):
                said.append(_set_aside(out, part, problem, "its rows are"))
        for journal in journal_paths(out, chunk):
            read = read_journal(journal)
            if read.fingerprint is not None and read.fingerprint != fingerprint:
                problem = f"was made under another configuration (fingerprint {read.fingerprint})"
                said.append(_set_aside(out, journal, problem, f"its {len(read.rows)} rows are"))
            elif read.skipped:
                said.append(
                    f"{journal.name}: {read.skipped} torn or unreadable line(s) skipped, "
                    f"{len(read.rows)} row(s) kept; the skipped rows are sent again"
                )
    if redo & finished:
        lines = [json.dumps({"chunk": i}) for i in sorted(finished - redo)]
        write_atomic(ledger, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8"))
    return said
