"""The Parquet ledger: atomic checkpoint and chunk files, resume scan, consolidation, manifest.

Layout of an output directory:
    job.json                       fingerprint of the configuration that owns the directory
    input-<digest>.parquet         the validated input rows, read once at planning; every chunk reads it
    .lock                          flock held by the running job
    chunks/chunk-00007.parquet     a finished chunk (all its rows, sorted by row_index)
    chunks/chunk-00007.part-00002.parquet   checkpointed rows of a chunk still running
    chunks/chunk-00007.journal-00003.jsonl  rows finished since the last checkpoint, one line each
    chunks/finished.jsonl          one line per chunk file written, so a deleted one is noticed
    set-aside/                     chunk, part and journal files a rerun could not use, kept for a look

Every chunk, part and journal file records the configuration fingerprint it was made under
(Parquet key-value metadata, a journal's first line): a file of another configuration is set
aside, never published.
    results.parquet                every input row once, in input order (written last)
    manifest.json                  counts, timings, versions
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NamedTuple

import polars as pl
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from tasks.config import answer_differences
from tasks.dataset import ChunkSpec
from tasks.schema import ResultRow, rows_to_frame


class OutputDirError(RuntimeError):
    """The output directory belongs to another job, or another run holds it."""


class OutputDirInUse(OutputDirError):
    """A live run holds the directory (or a chunk of it): wait for it, never delete what it writes."""


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
    try:
        write(tmp)
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when something failed before the rename
    _fsync_dir(path.parent)


def write_parquet_atomic(frame: pl.DataFrame, path: Path, fingerprint: str | None = None) -> None:
    metadata = {FINGERPRINT_KEY: fingerprint} if fingerprint else None
    write_atomic(path, lambda tmp: frame.write_parquet(tmp, metadata=metadata))


FINGERPRINT_KEY = "batch_inference_fingerprint"


def owner_fingerprint(out: Path) -> str | None:
    """The fingerprint in job.json: the configuration whose results this directory holds."""
    try:
        return json.loads((out / "job.json").read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError):
        return None


def file_fingerprint(path: Path) -> str | None:
    """The fingerprint a chunk or part file was written under (None: written before files had one)."""
    return (pq.read_metadata(path).metadata or {}).get(FINGERPRINT_KEY.encode(), b"").decode() or None


def write_json_atomic(data: dict[str, Any], path: Path) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8"))


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


def finished_rows(out: Path, chunk: ChunkSpec) -> set[int]:
    """Row indices of this chunk already on disk: the chunk file, or its parts and journal."""
    done = chunk_path(out, chunk)
    if done.exists():
        return set(pl.scan_parquet(done).select("row_index").collect()["row_index"].to_list())
    found: set[int] = set()
    if parts := part_paths(out, chunk):
        found.update(pl.scan_parquet(parts).select("row_index").collect()["row_index"].to_list())
    for journal in journal_paths(out, chunk):
        found.update(r.row_index for r in _journal_rows(journal))
    return found


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
                _fsync_dir(self.out / "chunks")
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
    # Streaming sink: the results never sit in memory whole, however many rows the job has.
    write_atomic(target, lambda tmp: pl.scan_parquet(paths).sink_parquet(tmp))
    count = pl.scan_parquet(target).select(pl.len(), pl.col("row_index").n_unique()).collect().row(0)
    if count != (total_rows, total_rows):
        raise RuntimeError(f"results.parquet has {count[0]} rows ({count[1]} unique) for {total_rows} input rows")
    return target


@contextmanager
def _flock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive, non-blocking flock on `path`, with this holder written in; the kernel releases
    it when the holder dies, so a killed run leaves no stale lock behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "holder unknown"
        handle.close()
        raise OutputDirInUse(f"{what} is in use by another run ({owner})") from None
    try:
        handle.truncate(0)
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {since}\n")
        handle.flush()
        yield
    finally:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()


def check_not_in_use(out: Path) -> None:
    """Raise OutputDirInUse when a live run holds `out` (its .lock); reads only, creates nothing.
    The command line asks before it starts a Prefect server; the run's own claim still decides."""
    try:
        handle = (out / ".lock").open("r")
    except FileNotFoundError:
        return  # never claimed, or not a directory yet
    with handle:
        try:
            # A shared lock is refused while the run's exclusive one is held, and never blocks it for long.
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = handle.read().strip() or "holder unknown"
            raise OutputDirInUse(f"output_dir {out} is in use by another run ({owner})") from None
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def holds_rows(out: Path) -> bool:
    """Whether any result row is on disk: a chunk file, a checkpoint part or a journal."""
    chunks = out / "chunks"
    return chunks.is_dir() and any(p.suffix in (".parquet", ".jsonl") for p in chunks.iterdir())


def check_output_dir(out: Path, fingerprint: str, job_record: dict[str, Any] | None) -> bool:
    """Refuse a directory whose rows another configuration wrote, naming the settings that differ.

    Reads only. True when the directory is this job's already (job.json with this fingerprint).
    A job.json without a single row on disk (a run stopped before its first row) does not own it.
    """
    record_path = out / "job.json"
    if not record_path.exists():
        if job_record is None:
            raise OutputDirError(f"output_dir {out} has no job.json: a shard runs only inside its parent's directory")
        return False
    previous = json.loads(record_path.read_text(encoding="utf-8"))
    if previous.get("fingerprint") == fingerprint:
        return True
    if job_record is not None and not holds_rows(out):
        return False
    differ = answer_differences(previous.get("settings", {}), (job_record or {}).get("settings", {}))
    if job_record is not None and previous.get("input_digest") not in (None, job_record.get("input_digest")):
        settings = job_record["settings"]
        source = f"file {settings['input_path']}" if settings.get("input_path") else job_record.get("input", "query")
        differ.append(f"contents of the input {source}")
    what = "; ".join(differ) or "the input file's or the output schema's contents"
    raise OutputDirError(
        f"output_dir {out} holds rows written with other answer-changing settings ({what}); "
        "use another output_dir, or delete this one to start over"
    )


def _check_job_record(out: Path, fingerprint: str, job_record: dict[str, Any] | None) -> None:
    if not check_output_dir(out, fingerprint, job_record) and job_record is not None:
        write_json_atomic({"fingerprint": fingerprint, **job_record}, out / "job.json")


@contextmanager
def claim_output_dir(out: Path, fingerprint: str, job_record: dict[str, Any]) -> Iterator[None]:
    """Hold the directory for one run, refusing another run or another configuration."""
    with _flock(out / ".lock", f"output_dir {out}"):
        _check_job_record(out, fingerprint, job_record)
        yield


@contextmanager
def join_output_dir(out: Path, fingerprint: str) -> Iterator[None]:
    """A shard's entry into the directory its parent holds: same configuration, no directory lock
    (hosts work side by side); each chunk is locked on its own (claim_chunk)."""
    _check_job_record(out, fingerprint, None)
    yield


@contextmanager
def claim_chunk(out: Path, chunk: ChunkSpec) -> Iterator[None]:
    """Hold one chunk, so two processes (or hosts, on a shared filesystem) never write it at once."""
    with _flock(out / ".locks" / f"{chunk.name}.lock", f"{chunk.name} of {out}"):
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


def counts(out: Path, chunks: list[ChunkSpec]) -> dict[str, int]:
    """ok / error rows in the finished chunk files."""
    paths = [chunk_path(out, c) for c in chunks if chunk_path(out, c).exists()]
    if not paths:
        return {"ok": 0, "error": 0}
    frame = pl.scan_parquet(paths).group_by("status").len().collect()
    found = dict(zip(frame["status"].to_list(), frame["len"].to_list(), strict=True))
    return {"ok": found.get("ok", 0), "error": found.get("error", 0)}


def package_version(name: str) -> str | None:
    """The installed version of a distribution, None when it is not installed."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def build_manifest(
    settings: Any, plan: Any, fingerprint: str, started: float, failure: BaseException | None
) -> dict[str, Any]:
    """What a run produced (counted on disk now), with what, how long it took, and why it stopped."""
    finished = time.time()
    row_counts = counts(settings.output_dir, plan.chunks)
    complete = failure is None
    error = None if failure is None else f"{type(failure).__name__}: {failure}"

    out = settings.output_dir
    return {
        "complete": complete,
        "error": error,
        "fingerprint": fingerprint,
        "results": str(out / "results.parquet") if complete else None,
        "input": settings.input_label,
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
            name: package_version(name)
            for name in (
                "prefect",
                "ollama",
                "openai",
                "polars",
                "pyarrow",
                "pydantic",
                "llama-cpp-python",
                "nvidia-ml-py",
            )
        },
    }


def read_shard_manifests(out: Path) -> list[dict[str, Any]]:
    """Manifests the shard runs of a scale-out job left in out/shards/, oldest first."""
    found = [json.loads(p.read_text(encoding="utf-8")) for p in (out / "shards").glob("*/manifest.json")]
    return sorted(found, key=lambda m: m["started_at"])


def error_kinds(out: Path, chunks: list[ChunkSpec]) -> dict[str, int]:
    """Error rows by kind over everything on disk (finished chunks and checkpoint parts)."""
    paths = [p for c in chunks for p in ([chunk_path(out, c)] if chunk_path(out, c).exists() else part_paths(out, c))]
    if not paths:
        return {}
    frame = pl.scan_parquet(paths).filter(pl.col("status") == "error").group_by("error_kind").len().collect()
    return {str(k): int(n) for k, n in frame.iter_rows()}


def error_rows(out: Path, chunks: list[ChunkSpec]) -> int:
    """Error rows on disk (finished chunks and checkpoint parts)."""
    return sum(error_kinds(out, chunks).values())


def previous_manifest(report_dir: Path, fingerprint: str) -> dict[str, Any]:
    """The manifest an earlier attempt of this same job left in report_dir ({} if none): its
    attempts, chunk stats and recoveries carry over, so a rerun reports on the whole job."""
    path = report_dir / "manifest.json"
    if not path.exists():
        return {}
    found = json.loads(path.read_text(encoding="utf-8"))
    return found if found.get("fingerprint") == fingerprint else {}


def read_parquet_or_none(path: Path) -> pl.DataFrame | None:
    return pl.read_parquet(path) if path.exists() else None


AUTO_MEMORY = "in-flight-auto.json"


def auto_memory_path(output_dir: Path) -> Path:
    """Beside output_dir, so a nightly job whose output_dir carries the date finds last night's level."""
    return output_dir.parent / AUTO_MEMORY


def remembered_level(path: Path, key: str) -> int | None:
    """The in-flight level 'auto' last settled on for `key` (job, endpoint, model), or None."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None  # none yet, or unreadable: start cold
    return int(entry["level"]) if isinstance(entry, dict) and isinstance(entry.get("level"), int) else None


def remember_level(path: Path, key: str, level: int, curve: dict[int, float] | None) -> None:
    """Record the level 'auto' settled on for `key`; other keys are kept (the last writer wins a race)."""
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    known[key] = {"level": level, "curve": curve or {}, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json_atomic(known, path)
