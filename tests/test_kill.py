"""SIGKILL the flow process mid-run, rerun, and compare with an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.concurrency.sync import concurrency
from prefect.settings import PREFECT_API_URL

from flows.batch_inference import batch_inference
from tasks.config import JobSettings, load_settings
from tasks.dataset import ChunkSpec, validate_input
from tasks.gpu_slot import GpuSlotTimeout
from tasks.store import chunk_path, finished_rows
from tests.support.ollama_emulator import OllamaEmulator

pytestmark = pytest.mark.usefixtures("prefect_server")

CONTENT = ["row_index", "id", "chunk", "status", "attempts", "response", "prompt_tokens", "completion_tokens"]
ROOT = Path(__file__).resolve().parents[1]


def start_flow(job_file: Path, log: Path) -> subprocess.Popen[bytes]:
    """The real CLI in its own process, talking to this session's Prefect API."""
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.batch_inference", "--config", str(job_file)],
            cwd=ROOT,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )


def answered(emulator: OllamaEmulator) -> Counter[str]:
    return Counter(r.prompt for r in emulator.requests if r.path == "/api/chat" and r.status == 200)


def reference_then_job_file(
    settings: dict[str, Any], emulator: OllamaEmulator, tmp_path: Path
) -> tuple[Path, JobSettings, list[ChunkSpec]]:
    """An uninterrupted run of `settings` into tmp/reference, then the same job as a file for the CLI."""
    batch_inference(overrides={**settings, "output_dir": str(tmp_path / "reference")})
    emulator.reset_stats()
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(settings))
    parsed = load_settings(job_file)
    return job_file, parsed, validate_input(parsed).chunks


def test_sigkill_mid_chunk_then_rerun_equals_an_uninterrupted_run(
    job: Any, emulator: OllamaEmulator, tmp_path: Path
) -> None:
    emulator.latency_s = 0.05
    # No Parquet checkpoint inside a chunk during the run: only the per-row journal protects rows.
    limit = f"gpu-kill-{os.getpid()}"
    settings = job(48, chunk_size=16, in_flight=4, checkpoint_every_s=3600, checkpoint_rows=100_000, gpu_limit=limit)
    job_file, parsed, chunks = reference_then_job_file(settings, emulator, tmp_path)

    log = tmp_path / "flow.log"
    proc = start_flow(job_file, log)
    deadline = time.monotonic() + 120
    while sum(len(finished_rows(parsed.output_dir, c)) for c in chunks) < 24:  # chunk 1 half done
        assert proc.poll() is None, f"the flow ended before it could be killed:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = sum(len(finished_rows(parsed.output_dir, c)) for c in chunks)
    assert 24 <= kept < 48 and not (parsed.output_dir / "results.parquet").exists()

    # The killed run still holds the GPU slot until its 60 s lease runs out; the documented
    # recovery frees it at once (`prefect gcl update NAME --active-slots 0`).
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(limit).active_slots == 1
        client.update_global_concurrency_limit(limit, GlobalConcurrencyLimitUpdate(active_slots=0))
    batch_inference(job_file=str(job_file))  # same lock file, same directory: the kill left no stale lock
    ours = pl.read_parquet(parsed.output_dir / "results.parquet").select(CONTENT)
    assert ours.equals(pl.read_parquet(tmp_path / "reference" / "results.parquet").select(CONTENT))
    sent = answered(emulator)
    assert len(sent) == 48
    resent = sum(n - 1 for n in sent.values())
    assert resent <= 4, f"{resent} rows were answered twice; at most the 4 in flight may be"


@pytest.mark.parametrize("point", ["between chunks", "at the end"])
def test_sigkill_at_a_chunk_boundary_then_rerun(job: Any, emulator: OllamaEmulator, tmp_path: Path, point: str) -> None:
    """Killed right after a chunk file appears: between two chunks, or after the last one, when the
    flow consolidates (the kill may land before, inside or after the results write)."""
    emulator.latency_s = 0.01
    limit = f"gpu-kill-{os.getpid()}-{point.replace(' ', '-')}"
    settings = job(24, chunk_size=8, in_flight=4, gpu_limit=limit)
    job_file, parsed, chunks = reference_then_job_file(settings, emulator, tmp_path)
    target = chunks[0] if point == "between chunks" else chunks[-1]

    proc = start_flow(job_file, tmp_path / "flow.log")
    deadline = time.monotonic() + 120
    while not chunk_path(parsed.output_dir, target).exists():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "flow.log").read_text()[-3000:]
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with get_client(sync_client=True) as client:  # the documented recovery of the killed run's slot
        client.update_global_concurrency_limit(limit, GlobalConcurrencyLimitUpdate(active_slots=0))
    before = sum(answered(emulator).values())
    batch_inference(job_file=str(job_file))
    ours = pl.read_parquet(parsed.output_dir / "results.parquet").select(CONTENT)
    assert ours.equals(pl.read_parquet(tmp_path / "reference" / "results.parquet").select(CONTENT))
    sent = answered(emulator)
    assert len(sent) == 24 and sum(n - 1 for n in sent.values()) <= 4  # at most the rows that were in flight
    if point == "at the end":
        assert sum(sent.values()) == before  # every chunk was on disk: the rerun only consolidated


def test_killed_during_consolidation_reruns_without_sending(job: Any, emulator: OllamaEmulator) -> None:
    settings = job(10, chunk_size=5)
    batch_inference(overrides=settings)
    out = Path(settings["output_dir"])
    # What a kill inside the atomic write leaves: no results file, a stray temporary file.
    (out / "results.parquet").rename(out / ".results.parquet.12345.tmp")
    before = len(answered(emulator))
    manifest = batch_inference(overrides=settings)
    assert manifest["complete"] and pl.read_parquet(out / "results.parquet").height == 10
    assert len(answered(emulator)) == before == 10  # no row was sent again


def test_a_held_gpu_slot_times_out_with_the_recovery_in_the_message(job: Any, emulator: OllamaEmulator) -> None:
    settings = job(4, gpu_limit=f"gpu-held-{os.getpid()}", slot_timeout_s=2)
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=settings["gpu_limit"], limit=1))
    with (
        concurrency(settings["gpu_limit"], occupy=1, strict=True),
        pytest.raises(GpuSlotTimeout, match=rf"GPU slot '{settings['gpu_limit']}' not free after 2s.*--active-slots 0"),
    ):
        batch_inference(overrides=settings)
    assert not [r for r in emulator.requests if r.path == "/api/chat"]
