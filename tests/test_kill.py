"""SIGKILL the flow process mid-run, rerun, and compare with an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.settings import PREFECT_API_URL

from flows.batch_inference import batch_inference
from harness.ollama_emulator import OllamaEmulator
from harness.processes import exit_code, start_cli
from tasks.inference.gpu_slot import GpuSlotTimeout, ensure_gpu_limit, gpu_slot
from tasks.plan.dataset import ChunkSpec, validate_input
from tasks.settings.load import load_settings
from tasks.settings.model import JobSettings
from tasks.storage.journal import chunk_path, finished_rows

pytestmark = pytest.mark.usefixtures("prefect_server")

CONTENT = ["row_index", "id", "chunk", "status", "attempts", "response", "prompt_tokens", "completion_tokens"]
ROOT = Path(__file__).resolve().parents[1]


def start_flow(job_file: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """The real CLI in its own process group, talking to this session's Prefect API (or, with
    `env`, to whatever that environment says: no API URL means a temporary server of its own)."""
    if env is None:
        env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    return start_cli(job_file, log, env)


def kill_when(proc: subprocess.Popen[bytes], log: Path, ready: Any, limit_s: float = 180) -> None:
    """SIGKILL the run's whole process group once `ready()` holds."""
    deadline = time.monotonic() + limit_s
    while not ready():
        assert proc.poll() is None, f"the flow ended before it could be killed:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no progress:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def rerun(job_file: Path, log: Path, env: dict[str, str] | None = None, limit_s: float = 60) -> float:
    """The CLI again, to the end; returns its wall time. A rerun that waits past `limit_s` fails."""
    started = time.monotonic()
    assert exit_code(start_flow(job_file, log, env), log, limit_s) == 0, log.read_text()[-4000:]
    return time.monotonic() - started


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
    kill_when(proc, log, lambda: sum(len(finished_rows(parsed.output_dir, c)) for c in chunks) >= 24)  # chunk 1 half
    kept = sum(len(finished_rows(parsed.output_dir, c)) for c in chunks)
    assert 24 <= kept < 48 and not (parsed.output_dir / "results.parquet").exists()

    # The killed run still holds the GPU slot (its lease has 60 s to run); the rerun sees that the
    # holder's process is gone, frees the slot by its lease and says so, instead of waiting.
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(limit).active_slots == 1
    rerun_log = tmp_path / "rerun.log"
    assert rerun(job_file, rerun_log, limit_s=45) < 45
    assert "freed the slot of a killed run" in rerun_log.read_text()
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

    log = tmp_path / "flow.log"
    kill_when(start_flow(job_file, log), log, lambda: chunk_path(parsed.output_dir, target).exists())
    before = sum(answered(emulator).values())
    rerun(job_file, tmp_path / "rerun.log", limit_s=45)  # the killed run's slot is freed, not waited for
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


def test_sigkill_on_a_temporary_server_then_rerun_frees_the_slot(
    job: Any, emulator: OllamaEmulator, tmp_path: Path
) -> None:
    """No API URL: each run starts its own Prefect server on the database in PREFECT_HOME, and a
    kill takes the server (and the lease it kept in memory) down with it, leaving the slot taken."""
    emulator.latency_s = 0.05
    settings = job(48, chunk_size=16, in_flight=4)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(settings))
    parsed = load_settings(job_file)
    chunks = validate_input(parsed).chunks
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    log = tmp_path / "flow.log"
    kill_when(start_flow(job_file, log, env), log, lambda: len(finished_rows(parsed.output_dir, chunks[1])) >= 4)
    rerun_log = tmp_path / "rerun.log"
    # The message below proves the slot was freed, not waited out; the limit only catches a hang. A loaded
    # machine took 28 s to start the temporary server alone, and the whole rerun past 60 s.
    rerun(job_file, rerun_log, env, limit_s=150)
    said = rerun_log.read_text()
    assert "left taken by a run killed with its temporary Prefect server" in said, said[-3000:]
    results = pl.read_parquet(parsed.output_dir / "results.parquet")
    assert results["row_index"].to_list() == list(range(48))


def test_a_waiting_run_names_the_live_holder(job: Any, emulator: OllamaEmulator) -> None:
    """A slot held by a live run is waited for, with who holds it, and never taken away."""
    limit = f"gpu-live-{os.getpid()}"
    ensure_gpu_limit(limit)
    said: list[str] = []
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with gpu_slot(limit, 5, say=said.append, about={"chunk": "chunk-00042", "output_dir": "out/x"}):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(30)
    try:
        with (
            pytest.raises(
                GpuSlotTimeout,
                match=r"not free after 2s: 1 of 1 slot\(s\) taken: pid \d+ .*\(running\), chunk-00042 of out/x",
            ),
            gpu_slot(limit, 2, say=said.append),
        ):
            pass
    finally:
        release.set()
        holder.join()
    assert any(s.startswith(f"waiting for GPU slot '{limit}'") and "chunk-00042" in s for s in said), said
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(limit).active_slots == 0
