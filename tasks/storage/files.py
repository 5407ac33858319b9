"""Atomic file writes (rename after fsync) and the configuration fingerprint every output file carries."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any

import polars as pl
import psutil
import pyarrow.parquet as pq  # type: ignore[import-untyped]


def fsync_dir(path: Path) -> None:
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
    fsync_dir(path.parent)


def remove_stale_tmps(path: Path) -> None:
    """Remove write_atomic's temporary files for `path` left by writers that are gone (SIGKILL, a
    crash, a power cut mid-write): results.parquet's is as large as the results."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 : -len(".tmp")]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            tmp.unlink(missing_ok=True)


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


def read_parquet_or_none(path: Path) -> pl.DataFrame | None:
    return pl.read_parquet(path) if path.exists() else None
