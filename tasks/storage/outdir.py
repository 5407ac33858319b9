"""The output directory as a whole: whose configuration owns it, the lock of the run using it, and the
'auto' level remembered beside it.

Layout of an output directory:
    job.json                       fingerprint of the configuration that owns the directory
    input-<digest>.parquet         the validated input rows, read once at planning; every chunk reads it
    .lock                          flock held by the running job
    chunks/chunk-00007.parquet     a finished chunk (all its rows, sorted by row_index)
    chunks/chunk-00007.part-00002.parquet   checkpointed rows of a chunk still running
    chunks/chunk-00007.journal-00003.jsonl  rows finished since the last checkpoint, one line each
    chunks/finished.jsonl          one line per chunk file written, so a deleted one is noticed
    set-aside/                     chunk, part and journal files a rerun could not use, kept for a look
    results.parquet                every input row once, in input order (written last)
    manifest.json, report.md       counts, timings, versions; the run report (tasks/storage/manifest.py)

Every chunk, part and journal file records the configuration fingerprint it was made under
(Parquet key-value metadata, a journal's first line): a file of another configuration is set
aside, never published (tasks/storage/journal.py). Beside the directory, in its parent,
in-flight-auto.json keeps the level 'auto' settled on per job, server and model.
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

from tasks.settings.fingerprint import answer_differences
from tasks.storage.files import write_json_atomic


class OutputDirError(RuntimeError):
    """The output directory belongs to another job, or another run holds it."""


class OutputDirUnusable(OutputDirError):
    """The output directory cannot be made or written (a file in its place, no permission)."""


def make_output_dir(out: Path, *, create: bool) -> None:
    """Make the output directory (`create`), or only check that it could be made: one message naming it,
    before the input is pinned there, instead of a failed write read as the input's fault."""
    existing = next(p for p in (out, *out.parents) if p.exists() or p.is_symlink())
    problem = None
    if not existing.exists():
        problem = f"{existing} is a link to nothing"
    elif not existing.is_dir():
        problem = f"{existing} is a file"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable by this user"
    elif create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            problem = str(exc)
    if problem is not None:
        raise OutputDirUnusable(f"output_dir {out} cannot be made or written: {problem}")


class OutputDirInUse(OutputDirError):
    """A live run holds the directory (or a chunk of it): wait for it, never delete what it writes."""


@contextmanager
def flock(path: Path, what: str) -> Iterator[None]:
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


def check_output_dir(out: Path, fingerprint: str, job_record: dict[str, Any], *, joining: bool = False) -> bool:
    """Refuse a directory whose rows another configuration wrote, naming the settings that differ.

    Reads only. True when the directory is this job's already (job.json with this fingerprint).
    A job.json without a single row on disk (a run stopped before its first row) does not own it.
    `joining`: a scale-out shard, which only ever joins the directory its parent holds.
    """
    record_path = out / "job.json"
    if not record_path.exists():
        if joining:
            raise OutputDirError(f"output_dir {out} has no job.json: a shard runs only inside its parent's directory")
        return False
    previous = json.loads(record_path.read_text(encoding="utf-8"))
    if previous.get("fingerprint") == fingerprint:
        return True
    if not joining and not holds_rows(out):
        return False
    differ = answer_differences(previous.get("settings", {}), job_record.get("settings", {}))
    if previous.get("input_digest") not in (None, job_record.get("input_digest")):
        settings = job_record["settings"]
        source = f"file {settings['input_path']}" if settings.get("input_path") else job_record.get("input", "query")
        differ.append(f"contents of the input {source}")
    what = "; ".join(differ) or "the input file's or the output schema's contents"
    # A shard's directory holds every host's rows: never advise deleting it from there.
    todo = (
        "a shard runs its parent's job as the parent planned it: start the job again from the parent"
        if joining
        else "use another output_dir, or delete this one to start over"
    )
    raise OutputDirError(f"output_dir {out} holds rows written with other answer-changing settings ({what}); {todo}")


def _check_job_record(out: Path, fingerprint: str, job_record: dict[str, Any], joining: bool) -> None:
    if not check_output_dir(out, fingerprint, job_record, joining=joining) and not joining:
        write_json_atomic({"fingerprint": fingerprint, **job_record}, out / "job.json")


@contextmanager
def claim_output_dir(out: Path, fingerprint: str, job_record: dict[str, Any]) -> Iterator[None]:
    """Hold the directory for one run, refusing another run or another configuration."""
    with flock(out / ".lock", f"output_dir {out}"):
        _check_job_record(out, fingerprint, job_record, joining=False)
        yield


@contextmanager
def join_output_dir(out: Path, fingerprint: str, job_record: dict[str, Any]) -> Iterator[None]:
    """A shard's entry into the directory its parent holds: same configuration, no directory lock
    (hosts work side by side); each chunk is locked on its own (claim_chunk)."""
    _check_job_record(out, fingerprint, job_record, joining=True)
    yield


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
    """Record the level 'auto' settled on for `key`, and the tokens/s of each level measured (the newest
    reading of each); other keys are kept (the last writer wins a race)."""
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    # A run that started from the remembered level may measure only that level: the other levels keep their
    # last readings, so the file still shows the curve behind the level.
    entry = known.get(key)
    old = entry.get("curve") if isinstance(entry, dict) else None
    readings = {int(n): tps for n, tps in old.items() if str(n).isdigit()} if isinstance(old, dict) else {}
    readings |= curve or {}
    known[key] = {
        "level": level,
        "curve": {str(n): readings[n] for n in sorted(readings)},
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(known, path)
