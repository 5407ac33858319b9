"""The GPU slot across processes and servers: a Prefect server restarted mid-run, two jobs with their
own Prefect servers on one engine, and the slot passed from chunk to chunk within a run."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from flows.batch_inference import batch_inference
from harness.ollama_emulator import OllamaEmulator, RequestRecord
from harness.processes import exit_code, free_port, start, start_cli, stop, wait_for
from tasks.inference.gpu_slot import (
    LOCK_DIR_ENV,
    MachineLock,
    _read_holders,
    ensure_gpu_limit,
    gpu_slot,
    keep_slots,
    machine_key,
)

ROW = re.compile(r"candidate (\d+) writes")


def _env(tmp: Path, name: str, **extra: str) -> dict[str, str]:
    """A CLI's environment: no Prefect settings of this test process, its own PREFECT_HOME, the test's
    lock directory (the machine-wide default would mix with other test sessions on this machine)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(tmp / f"{name}-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}
    return env


def _job_file(tmp: Path, name: str, settings: dict[str, Any]) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**settings, "name": name, "output_dir": str(tmp / f"out-{name}")}))
    return path


def _finish(proc: subprocess.Popen[bytes], log: Path, limit_s: float) -> str:
    code = exit_code(proc, log, limit_s)
    text = log.read_text()
    assert code == 0, text[-4000:]
    return text


def _rows(recs: list[RequestRecord]) -> list[tuple[int, float, float]]:
    """(row, start, end) of every answered chat request."""
    return sorted(
        (int(m.group(1)), r.t_start, r.t_end)
        for r in recs
        if r.path == "/api/chat" and r.status == 200 and r.t_end is not None and (m := ROW.search(r.prompt or ""))
    )


@contextlib.contextmanager
def prefect_server(home: Path, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`prefect server start` with its own PREFECT_HOME (SQLite) and the default in-memory lease storage."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
    proc = start(cmd, env, home.parent, log)

    def healthy() -> bool:
        assert proc.poll() is None, f"prefect server exited:\n{log.read_text()[-3000:]}"
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
        return False

    try:
        wait_for(healthy, 180, "the Prefect server's /api/health")
        yield proc
    finally:
        stop(proc)


@pytest.mark.timeout(600)
def test_a_prefect_server_restarted_mid_run_blocks_neither_the_run_nor_a_rerun(
    job: Any, emulator: OllamaEmulator, tmp_path: Path
) -> None:
    """In-memory leases die with the server; the database still counts the slot. The run must know
    that slot is its own (not wait for 'a run this machine has no record of'), and leave none behind."""
    # Slow answers until the run has said the server is gone: the chunk outlasts a lease renewal (20 s).
    emulator.latency_s = 3.0
    port, home = free_port(), tmp_path / "server-home"
    api = f"http://127.0.0.1:{port}/api"
    env = _env(tmp_path, "client", PREFECT_API_URL=api, **{LOCK_DIR_ENV: str(tmp_path / "locks")})
    settings = job(80, chunk_size=40, in_flight=4, gpu_limit="gpu")
    job_file = _job_file(tmp_path, "restart", settings)
    log = tmp_path / "run.log"
    with prefect_server(home, port, tmp_path / "server-1.log") as server:
        proc = start_cli(job_file, log, env)
        # Mid-chunk: the lease is held when the server goes.
        wait_for(lambda: len(_rows(emulator.requests)) >= 4 or proc.poll() is not None, 180, "the first answers")
        assert proc.poll() is None, log.read_text()[-3000:]
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        # Named as such within a lease renewal (20 s), not as a bare "Connection refused" minutes later.
        wait_for(lambda: "is not answering" in log.read_text(), 60, "the run to say the server is not answering")
        emulator.latency_s = 0.05
    with prefect_server(home, port, tmp_path / "server-2.log"):
        said = _finish(proc, log, 240)
        assert re.search(rf"the Prefect server at {api} is not answering \(since \d\d:\d\d:\d\d UTC\)", said)
        assert "waiting for GPU slot" not in said, said[-4000:]
        assert len({row for row, _, _ in _rows(emulator.requests)}) == 80
        gpu = httpx.get(f"{api}/v2/concurrency_limits/gpu", timeout=10).json()
        assert gpu["active_slots"] == 0, gpu

        # A rerun of another job (its own output directory, so its chunks need the slot) is not blocked.
        rerun_log = tmp_path / "rerun.log"
        rerun = start_cli(_job_file(tmp_path, "after", job(8, chunk_size=4, in_flight=4)), rerun_log, env)
        rerun_said = _finish(rerun, rerun_log, 120)
        assert "waiting for GPU slot" not in rerun_said, rerun_said[-4000:]


@pytest.mark.timeout(600)
def test_two_jobs_with_their_own_prefect_servers_take_turns_on_one_engine(tmp_path: Path) -> None:
    """Each CLI job starts its own temporary Prefect server (own PREFECT_HOME), so no Prefect limit
    sees both: the machine lock of the engine's URL keeps them apart, chunk by chunk."""
    # A temporary server takes a while to start on a busy machine (Prefect's default gives it 20 s).
    extra = {LOCK_DIR_ENV: str(tmp_path / "locks"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
    # 8 slots: two jobs of in_flight 4 side by side would show as 8 requests at once.
    with OllamaEmulator(models=["gemma3:12b"], parallel=8, latency_s=1.0) as emu:
        from tests.conftest import job_builder

        # Long enough at 1 s an answer (160 s) to outlast B's start on a busy machine.
        first = job_builder(tmp_path / "a", emu.host)(640, chunk_size=16, in_flight=4)
        second = job_builder(tmp_path / "b", emu.host)(24, chunk_size=8, in_flight=4)
        logs = {name: tmp_path / f"{name}.log" for name in ("a", "b")}
        a = start_cli(_job_file(tmp_path, "a", first), logs["a"], _env(tmp_path, "a", **extra))
        try:
            # Slow answers until B waits for the GPU, so A surely holds it when B comes.
            wait_for(lambda: _rows(emu.requests) or a.poll() is not None, 300, "job A's first request")
            assert a.poll() is None, logs["a"].read_text()[-3000:]
            b = start_cli(_job_file(tmp_path, "b", second), logs["b"], _env(tmp_path, "b", **extra))
            try:
                wait_for(
                    lambda: "waiting for the GPU of" in logs["b"].read_text() or b.poll() is not None,
                    300,
                    "job B to say it waits for the GPU",
                )
                emu.latency_s = 0.05
                said_a, said_b = _finish(a, logs["a"], 240), _finish(b, logs["b"], 240)
            finally:
                stop(b)
        finally:
            stop(a)
        assert emu.peak_in_flight <= 4, f"{emu.peak_in_flight} requests at once"
    waited = next(line for line in said_b.splitlines() if "waiting for the GPU of" in line)
    assert f"pid {a.pid} " in waited and "chunk-" in waited and str(tmp_path / "out-a") in waited, waited
    assert re.search(r"since \d\d:\d\d:\d\d", waited), waited
    # Turn-taking, not one whole job after the other: A gave the GPU up for B between its chunks.
    assert "given up after this chunk, 1 run(s) on this machine wait" in said_a, said_a[-3000:]


@pytest.mark.usefixtures("prefect_server")
def test_a_run_keeps_its_slot_between_chunks_unless_someone_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path / "locks"))
    limit, endpoint = f"gpu-keep-{os.getpid()}", "http://127.0.0.1:1"
    ensure_gpu_limit(limit)
    said: list[str] = []
    leases: list[str] = []

    def lease() -> str:
        (holder,) = [h for h in _read_holders(limit) if h.alive]
        return str(holder.info["lease_id"])

    order: list[str] = []
    waiter_in = threading.Event()
    with keep_slots():
        with gpu_slot(limit, 10, said.append, {"chunk": "chunk-00000"}, endpoint=endpoint):
            leases.append(lease())
        with gpu_slot(limit, 10, said.append, {"chunk": "chunk-00001"}, endpoint=endpoint):
            leases.append(lease())  # nobody waited: the same lease, no new acquisition

            def other_job() -> None:
                with gpu_slot(limit, 30, said.append, {"chunk": "chunk-00099", "output_dir": "out/other"}, endpoint):
                    waiter_in.set()
                    order.append("other")
                    time.sleep(0.3)

            waiter = threading.Thread(target=other_job)
            waiter.start()
            lock = MachineLock(machine_key(endpoint))
            wait_for(lock.waiters, 30, "the other job's waiting record")
        # Someone waited: the slot went to it, and our next chunk comes after it.
        with gpu_slot(limit, 30, said.append, {"chunk": "chunk-00002"}, endpoint=endpoint):
            order.append("ours")
            leases.append(lease())
        waiter.join()
    assert waiter_in.is_set() and order == ["other", "ours"], order
    assert leases[0] == leases[1] != leases[2], leases
    assert any("given up after this chunk, 1 run(s) on this machine wait" in s for s in said), said
    assert any(
        s.startswith("waiting for the GPU of http://127.0.0.1:1") and "chunk-00099 of out/other" in s for s in said
    )
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(limit).active_slots == 0  # given back at the end


@pytest.mark.usefixtures("prefect_server")
def test_chunk_hand_over_within_a_run_is_short(
    job: Any, emulator: OllamaEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Last answer of one chunk to the first request of the next. On the SQLite server each fresh
    acquisition of the slot costs ~2 s ('database is locked', retried after 2 s); a kept slot costs
    nothing. Loose bound: the machine is shared; the benchmark reports the real figure."""
    monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path / "locks"))
    emulator.latency_s = 0.02
    batch_inference(overrides=job(40, chunk_size=8, in_flight=4, gpu_limit=f"gpu-handover-{os.getpid()}"))
    rows = _rows(emulator.requests)
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for row, t0, t1 in rows:
        k = row // 8
        first[k] = min(first.get(k, t0), t0)
        last[k] = max(last.get(k, t1), t1)
    gaps = [first[k + 1] - last[k] for k in range(4)]
    assert max(gaps) < 2.0, gaps


@pytest.mark.parametrize("devices", [None, "0", "GPU-1a2b3c4d"])
def test_the_embedded_model_has_one_machine_lock_however_its_gpu_is_named(
    devices: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CUDA_VISIBLE_DEVICES unset, `0` or a UUID can all be the same card: two embedded jobs with their own
    Prefect servers took different locks and shared it."""
    if devices is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", devices)
    assert machine_key("embedded") == "embedded"
    assert machine_key("http://127.0.0.1:11434") == machine_key("localhost:11434") == "localhost-11434"
