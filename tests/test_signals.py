"""Ctrl-C and SIGTERM on the real command line: the run stops within seconds, says so, and a rerun resumes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl
import psutil
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import FlowRunSort
from prefect.settings import PREFECT_API_URL

from harness.ollama_emulator import Fault, OllamaEmulator
from harness.processes import exit_code, reaped, start_cli
from tasks.plan.dataset import validate_input
from tasks.settings.load import load_settings
from tasks.storage.journal import finished_rows

STOP_LIMIT_S = 10.0  # signal to exit, what systemd's and Kubernetes' grace periods leave


def job_file(tmp_path: Path, settings: dict[str, Any]) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def rows_on_disk(path: Path) -> Callable[[], int]:
    """Counts the rows of the job in `path` journaled or checkpointed so far, as a rerun finds them."""
    settings = load_settings(path)
    chunks = validate_input(settings).chunks
    return lambda: sum(len(finished_rows(settings.output_dir, c)) for c in chunks)


def until(ready: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, limit_s: float = 240) -> None:
    """Poll `ready()` while the run lives; fail with its log when it ends first or takes too long."""
    deadline = time.monotonic() + limit_s
    while not ready():
        assert proc.poll() is None, f"the run ended first:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-4000:]}"
        time.sleep(0.05)


def exit_after(proc: subprocess.Popen[bytes], log: Path, limit_s: float = 60) -> tuple[int, float]:
    """Wait for the run to end: its exit code and seconds taken. Killed (and failed) past `limit_s`."""
    started = time.monotonic()
    with log.open("a") as handle:  # the log's own clock, to read the run's lines against
        handle.write(f"[test] signal sent at {datetime.now():%H:%M:%S.%f}\n")
    return exit_code(proc, log, limit_s), time.monotonic() - started


def session_env() -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}


def sigterm_after_8_rows(
    path: Path,
    on_disk_now: Callable[[], int],
    tmp_path: Path,
    meanwhile: Callable[[subprocess.Popen[bytes], Path], None] | None = None,
) -> str:
    """Run the job in `path` from the command line; once 8 rows are on disk, do `meanwhile(proc, log)`, then
    send SIGTERM: the run must exit 143 within STOP_LIMIT_S. Returns its log."""
    log = tmp_path / "run.log"
    with reaped(start_cli(path, log, session_env())) as proc:
        until(lambda: on_disk_now() >= 8, proc, log)
        if meanwhile is not None:
            meanwhile(proc, log)
        proc.send_signal(signal.SIGTERM)
        code, seconds = exit_after(proc, log)
    said = log.read_text()
    print(f"SIGTERM to exit: {seconds:.2f} s")
    assert code == 143 and seconds < STOP_LIMIT_S, f"exit {code} after {seconds:.1f}s:\n{said[-4000:]}"
    return said


def test_ctrl_c_on_a_temporary_server_stops_within_seconds_and_a_rerun_completes(
    job: Any, emulator: OllamaEmulator, tmp_path: Path
) -> None:
    """Ctrl-C in a terminal signals the whole foreground process group; the run's temporary Prefect
    server must not take it and die under the run that is winding down."""
    emulator.per_token_s = 0.05  # ~0.6 s a row: a chunk takes seconds, a signal lands mid-chunk
    settings = job(40, chunk_size=20, in_flight=4, chunk_retries=2, chunk_retry_delay_s=0)
    path = job_file(tmp_path, settings)
    out = Path(settings["output_dir"])
    on_disk_now = rows_on_disk(path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"  # 20 s is short on a busy 2-core machine
    log = tmp_path / "run.log"
    proc = start_cli(path, log, env)
    servers: list[psutil.Process] = []
    try:
        with reaped(proc):
            until(lambda: on_disk_now() >= 6, proc, log)
            servers = [
                c for c in psutil.Process(proc.pid).children(recursive=True) if "uvicorn" in " ".join(c.cmdline())
            ]
            assert len(servers) == 1, "no temporary Prefect server under the run"
            os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
            code, seconds = exit_after(proc, log)
    finally:
        _, alive = psutil.wait_procs(servers, timeout=10)
        for leftover in alive:  # never leave one behind, even when the test fails
            leftover.kill()
    said = log.read_text()
    print(f"SIGINT to exit: {seconds:.2f} s")
    assert code == 130 and seconds < STOP_LIMIT_S, f"exit {code} after {seconds:.1f}s:\n{said[-4000:]}"
    assert not alive, "the temporary Prefect server outlived the run"
    on_disk = on_disk_now()
    assert 6 <= on_disk < 40
    assert f"interrupted (SIGINT): {on_disk} rows on disk in {out}; the same command resumes" in said, said[-4000:]
    assert "Connection refused" not in said and "lease renewal failed" not in said, said[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["interrupted"] == "SIGINT" and not manifest["complete"]
    # A fresh run: every row on disk was sent by this attempt, the chunk that was running included.
    assert manifest["rows_sent"] == manifest["attempts"][-1]["rows_sent"] == on_disk
    assert "**interrupted** by SIGINT" in (out / "report.md").read_text()

    rerun_log = tmp_path / "rerun.log"
    rerun = start_cli(path, rerun_log, env)
    code, _ = exit_after(rerun, rerun_log, limit_s=240)
    assert code == 0, rerun_log.read_text()[-4000:]
    results = pl.read_parquet(out / "results.parquet")
    assert results["row_index"].to_list() == list(range(40)) and results["id"].n_unique() == 40
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["interrupted"] is None
    assert [a["rows_sent"] for a in manifest["attempts"]] == [on_disk, 40 - on_disk]
    answered = Counter(r.prompt for r in emulator.requests if r.path == "/api/chat" and r.status == 200)
    assert len(answered) == 40
    assert sum(n - 1 for n in answered.values()) <= 4  # at most the requests cut after the grace period


@pytest.mark.usefixtures("prefect_server")
def test_sigterm_stops_a_5000_row_chunk_within_seconds_without_a_retry(
    job: Any, emulator: OllamaEmulator, tmp_path: Path
) -> None:
    """systemd and Kubernetes send SIGTERM and wait a grace period: the run must not finish its chunk first."""
    emulator.latency_s = 0.05  # 4 in flight: ~80 rows/s, over a minute for the chunk
    settings = job(
        5000,
        chunk_size=5000,
        in_flight=4,
        chunk_retries=2,
        chunk_retry_delay_s=0,
        gpu_limit=f"gpu-sigterm-{os.getpid()}",
    )
    path = job_file(tmp_path, settings)
    on_disk_now = rows_on_disk(path)
    said = sigterm_after_8_rows(path, on_disk_now, tmp_path)
    out = Path(settings["output_dir"])
    on_disk = on_disk_now()
    assert 8 <= on_disk < 5000 and f"interrupted (SIGTERM): {on_disk:,} rows on disk in {out}" in said
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["interrupted"] == "SIGTERM" and manifest["rows_sent"] == manifest["rows_ok"] == on_disk
    assert manifest["rows_pending"] == 5000 - on_disk
    assert manifest["chunk_stats"] == []  # the chunk did not finish: no figures to keep for it

    # Prefect: the flow run is Cancelled with the reason, and the chunk ran once (its retries unused).
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=50)
        (run,) = [r for r in runs if r.parameters.get("job_file") == str(path)]
        assert run.state is not None and run.state.is_cancelled(), run.state
        assert "interrupted by SIGTERM in chunk-00000" in (run.state.message or ""), run.state.message
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        (chunk,) = [t for t in tasks if t.name == "chunk-00000"]
        assert chunk.run_count == 1 and chunk.state is not None and chunk.state.is_failed(), chunk


@pytest.mark.usefixtures("prefect_server")
def test_a_second_ctrl_c_exits_at_once(job: Any, emulator: OllamaEmulator, tmp_path: Path) -> None:
    """Requests that never answer hold the first Ctrl-C in its grace period; the second one ends it now."""
    emulator.inject(Fault.hang(), times=None)
    settings = job(8, in_flight=4, gpu_limit=f"gpu-second-{os.getpid()}")
    log = tmp_path / "run.log"
    with reaped(start_cli(job_file(tmp_path, settings), log, session_env())) as proc:
        until(lambda: len([r for r in emulator.requests if r.path == "/api/chat"]) >= 4, proc, log)
        os.killpg(proc.pid, signal.SIGINT)
        until(lambda: "SIGINT: stopping" in log.read_text(), proc, log, limit_s=30)
        os.killpg(proc.pid, signal.SIGINT)
        code, seconds = exit_after(proc, log)
    said = log.read_text()
    print(f"second SIGINT to exit: {seconds:.2f} s")
    assert code == 130 and seconds < 2.0, f"exit {code} after {seconds:.1f}s:\n{said[-4000:]}"
    assert "SIGINT again: exiting now" in said


@pytest.mark.usefixtures("prefect_server")
def test_ctrl_c_while_a_chunk_start_waits_on_a_hung_server_stops_within_seconds(
    job: Any, emulator: OllamaEmulator, tmp_path: Path
) -> None:
    """A server that stops answering between two chunks: the next chunk's check hangs, and a stop must
    not wait out request_timeout_s for it."""
    emulator.per_token_s = 0.02  # ~0.3 s a row: chunk 0 takes a second or two
    settings = job(16, chunk_size=8, in_flight=2, request_timeout_s=120, gpu_limit=f"gpu-check-{os.getpid()}")
    path = job_file(tmp_path, settings)
    on_disk_now = rows_on_disk(path)
    log = tmp_path / "run.log"
    with reaped(start_cli(path, log, session_env())) as proc:
        until(lambda: on_disk_now() >= 2, proc, log)
        emulator.show_fault = Fault.hang()  # from chunk 1's check on
        hung = lambda: any(r.path == "/api/show" and r.t_end is None for r in emulator.requests)  # noqa: E731
        until(hung, proc, log)
        os.killpg(proc.pid, signal.SIGINT)
        code, seconds = exit_after(proc, log)
    said = log.read_text()
    print(f"SIGINT to exit: {seconds:.2f} s")
    assert code == 130 and seconds < STOP_LIMIT_S, f"exit {code} after {seconds:.1f}s:\n{said[-4000:]}"
    assert "interrupted by SIGINT in chunk-00001 before its first request" in said, said[-4000:]
    assert on_disk_now() == 8  # chunk 0 whole, nothing of chunk 1


@pytest.mark.usefixtures("prefect_server")
def test_sigterm_while_a_chunk_waits_to_retry_stops_within_seconds(
    job: Any, emulator: OllamaEmulator, tmp_path: Path
) -> None:
    """A chunk failed on an outage and waits chunk_retry_delay_s to try again: a stop does not wait that out
    (Prefect's own retry delay could not be cut short; a worker's cancel kills the run after 30 s)."""
    emulator.latency_s = 0.05
    settings = job(
        200,
        chunk_size=200,
        chunk_retries=2,
        chunk_retry_delay_s=60,
        outage_budget_s=1,
        gpu_limit=f"gpu-retry-{os.getpid()}",
    )
    path = job_file(tmp_path, settings)

    def waiting_to_retry(proc: subprocess.Popen[bytes], log: Path) -> None:
        emulator.down()
        until(lambda: "chunk-00000: try 2 starts in 60 s" in log.read_text(), proc, log, limit_s=60)

    said = sigterm_after_8_rows(path, rows_on_disk(path), tmp_path, waiting_to_retry)
    assert "interrupted by SIGTERM before chunk-00000" in said, said[-4000:]


@pytest.mark.usefixtures("prefect_server")
def test_sigterm_while_every_endpoint_sits_out_a_failure_stops_within_seconds(job: Any, tmp_path: Path) -> None:
    """Both endpoints failed and wait chunk_retry_delay_s before taking work again: a stop does not wait that out."""
    with OllamaEmulator(models=["gemma3:12b"]) as a, OllamaEmulator(models=["gemma3:12b"]) as b:
        a.latency_s = b.latency_s = 0.05
        settings = job(400, chunk_size=100, chunk_retries=2, chunk_retry_delay_s=60, outage_budget_s=1)
        settings["ollama_host"] = None
        settings["endpoints"] = [
            {"host": a.host, "gpu_limit": f"gpu-a-{os.getpid()}"},
            {"host": b.host, "gpu_limit": f"gpu-b-{os.getpid()}"},
        ]
        path = job_file(tmp_path, settings)

        def both_sitting_out(proc: subprocess.Popen[bytes], log: Path) -> None:
            a.down()
            b.down()
            until(lambda: log.read_text().count("go back to the other lanes") >= 2, proc, log, limit_s=60)
            time.sleep(0.5)

        said = sigterm_after_8_rows(path, rows_on_disk(path), tmp_path, both_sitting_out)
    assert "interrupted by SIGTERM while every endpoint sits out a failure" in said, said[-4000:]


SHARD_WAIT = """
import os, signal, sys, threading, time
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Running, Scheduled
from flows.scale_out import wait_for_shard
from tasks import stopping

@flow
def shard() -> None: ...

with get_client(sync_client=True) as client:
    run = client.create_flow_run(shard, state=Running() if sys.argv[1] == "running" else Scheduled())
stopping.install()
threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
started = time.monotonic()
try:
    wait_for_shard(run.id, 600, "shard run s on host-a")
except stopping.Interrupted as exc:
    print(f"{exc} after {time.monotonic() - started:.1f} s")
with get_client(sync_client=True) as client:
    print("shard", client.read_flow_run(run.id).state.type.value)
"""


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize(("shard", "then"), [("running", "CANCELLING"), ("waiting", "CANCELLED")])
def test_a_stopped_scale_out_parent_stops_waiting_and_cancels_its_shard_run(shard: str, then: str) -> None:
    """Ctrl-C (or a worker's cancel) of the scale-out parent: it does not wait for a shard run that takes
    hours; a running one gets Cancelling (its worker sends it SIGTERM), one no worker took is cancelled."""
    done = subprocess.run(
        [sys.executable, "-c", SHARD_WAIT, shard], env=session_env(), capture_output=True, text=True, timeout=60
    )
    said = done.stdout + done.stderr
    stopped = re.search(r"interrupted by SIGINT while shard run s on host-a ran after ([\d.]+) s", said)
    assert stopped and float(stopped.group(1)) < STOP_LIMIT_S, said  # SIGINT at 1 s; the shard takes hours
    assert f"shard {then}" in said, said


def test_stop_exceptions_survive_pickling() -> None:
    """A process pool or a persisted failed state pickles the exception; its fields must come back."""
    import pickle

    from tasks.inference.runner import ChunkAborted, ChunkInterrupted
    from tasks.schema import ChunkStats
    from tasks.stopping import Interrupted

    stop = Interrupted(signal.SIGTERM, "after 3 rows")
    stop.on_disk = "3 rows on disk in out/"
    back = pickle.loads(pickle.dumps(stop))
    assert (str(back), back.signum, back.on_disk) == (str(stop), signal.SIGTERM, "3 rows on disk in out/")
    abort = ChunkAborted("backend unreachable", retryable=True)
    again = pickle.loads(pickle.dumps(abort))
    assert (str(again), again.retryable, again.stats) == ("backend unreachable", True, None)
    chunk = ChunkInterrupted(signal.SIGINT, "in chunk-00002")
    chunk.stats = ChunkStats(index=2, rows=5)
    assert pickle.loads(pickle.dumps(chunk)).stats == chunk.stats
