"""Sampler against fake GPU sources and a real HTTP /api/ps server; NVML on a GPU-less host."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl
import pytest

from tasks.analysis import telemetry
from tasks.analysis.telemetry import Sampler, open_gpu_source, summarize
from tasks.inference.backends.ollama import OllamaBackend
from tasks.storage.files import write_parquet_atomic

GIB = 1024**3
MIB = 1024**2


class FakeGpu:
    """A GpuSource with `n` GPUs; `fail_after` reads of GPU 0 it raises (device lost)."""

    def __init__(self, n: int = 2, fail_after: int | None = None) -> None:
        self.n = n
        self.fail_after = fail_after
        self.reads = 0
        self.closed = False

    def devices(self) -> int:
        return self.n

    def read(self, index: int) -> dict[str, float | int | None]:
        if index == 0:
            self.reads += 1
            if self.fail_after is not None and self.reads > self.fail_after:
                raise RuntimeError("GPU is lost")
        return {
            "vram_used_mib": 10_000 + index,
            "vram_total_mib": 16_376,
            "gpu_util_pct": 97,
            "mem_util_pct": 40,
            "temperature_c": 60,
            "power_w": 250.5,
            "sm_clock_mhz": 2500,
            "pstate": 2,
            "server_vram_mib": None,  # e.g. a container where NVML lists no processes
        }

    def close(self) -> None:
        self.closed = True


def _wait_for(cond, timeout: float = 2.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _stop_timed(s: Sampler) -> float:
    began = time.monotonic()
    s.stop()
    return time.monotonic() - began


def test_sampler_with_gpus_records_rows_per_gpu_and_stops_fast() -> None:
    fake = FakeGpu(n=2)
    s = Sampler(interval_s=0.02, gpu_source=fake)
    s.start()
    s.mark("chunk 0 start")
    _wait_for(lambda: s.samples >= 5)
    s.mark("chunk 0 end")
    assert _stop_timed(s) < 1.0
    assert fake.closed

    df = s.frame()
    assert df.schema == pl.Schema(telemetry.SCHEMA)
    assert set(df["gpu"].unique().to_list()) == {0, 1}
    assert df.filter(pl.col("gpu") == 1)["vram_used_mib"].to_list()[0] == 10_001.0
    assert df["cpu_per_core"].list.len().min() > 0  # type: ignore[operator]
    assert df["rss_mib"].min() > 0  # type: ignore[operator]
    assert df["ollama_size_mib"].null_count() == df.height  # no host given
    assert s.marks()["label"].to_list() == ["chunk 0 start", "chunk 0 end"]

    t0, t1 = df["t"].min(), df["t"].max()
    assert df.filter(pl.col("t") == t0).height == 2  # one row per GPU per sample
    summary = summarize(df, t0, t1)  # type: ignore[arg-type]
    assert summary["vram_peak_mib"] == 10_001.0
    assert summary["vram_headroom_mib"] == 16_376 - 10_001
    assert summary["gpu_util_mean"] == 97.0
    assert summary["gpu_idle_fraction"] == 0.0
    assert summary["samples"] == df["t"].n_unique()


def test_sampler_without_gpu_samples_host_only() -> None:
    s = Sampler(interval_s=0.02, gpu_source=None)
    s.start()
    _wait_for(lambda: s.samples >= 3)
    assert _stop_timed(s) < 1.0
    df = s.frame()
    assert df.height >= 3
    assert df["gpu"].null_count() == df.height
    assert df["vram_used_mib"].null_count() == df.height
    assert df["ram_available_mib"].min() > 0  # type: ignore[operator]
    summary = summarize(df, 0, time.time())
    assert summary["vram_peak_mib"] is None and summary["gpu_util_mean"] is None
    assert summary["cpu_mean_pct"] is not None


def test_gpu_lost_mid_run_keeps_sampling_host(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeGpu(n=1, fail_after=2)
    s = Sampler(interval_s=0.01, gpu_source=fake)
    with caplog.at_level(logging.WARNING, logger="tasks.analysis.telemetry"):
        s.start()
        _wait_for(lambda: s.samples >= 8)
        assert _stop_timed(s) < 1.0
    df = s.frame()
    assert df["vram_used_mib"].head(2).null_count() == 0
    after = df.slice(2)
    assert after.height >= 6
    assert after["vram_used_mib"].null_count() == after.height
    assert after["ram_used_mib"].null_count() == 0
    assert fake.reads == 3  # a lost GPU is not polled again
    lost = [r for r in caplog.records if "stopped answering" in r.getMessage()]
    assert len(lost) == 1


def test_open_gpu_source_without_gpu_returns_none_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Real pynvml, no patching: this host has no NVIDIA driver.
    with caplog.at_level(logging.WARNING, logger="tasks.analysis.telemetry"):
        source = open_gpu_source()
    if source is not None:  # pragma: no cover - only on a GPU host
        source.close()
        pytest.skip("NVML is available on this host")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "GPU telemetry is off" in warnings[0].getMessage()


class _PsHandler(BaseHTTPRequestHandler):
    body: bytes = b""
    seen_headers: list[dict[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        type(self).seen_headers.append(dict(self.headers))
        if self.path != "/api/ps":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def ps_server() -> Iterator[tuple[str, type[_PsHandler]]]:
    payload = {
        "models": [
            {
                "name": "gemma3:12b",
                "model": "gemma3:12b",
                "size": 12 * GIB,
                "size_vram": 9 * GIB,
                "digest": "x",
                "details": {},
                "expires_at": "2099-01-01T00:00:00Z",
                "context_length": 4096,
            },
            {  # another tenant's model, kept on the CPU: not this job's spill
                "name": "nomic-embed-text:latest",
                "model": "nomic-embed-text:latest",
                "size": 300 * MIB,
                "size_vram": 0,
                "digest": "y",
                "details": {},
                "expires_at": "2099-01-01T00:00:00Z",
                "context_length": 2048,
            },
        ]
    }
    handler = type("PsHandler", (_PsHandler,), {"body": json.dumps(payload).encode(), "seen_headers": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def ollama(host: str) -> OllamaBackend:
    return OllamaBackend(host=host, model="gemma3:12b", timeout_s=5, keep_alive="5m")


def test_ollama_ps_spill_detected(ps_server: tuple[str, type[_PsHandler]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_API_KEY", "t")
    host, handler = ps_server
    server = ollama(host)
    s = Sampler(interval_s=0.02, gpu_source=FakeGpu(n=1), model_memory=[server])
    s.start()
    _wait_for(lambda: s.samples >= 3)
    s.stop()
    asyncio.run(server.close())
    assert handler.seen_headers[0]["authorization"] == "Bearer t"  # the key chat sends, from the environment
    df = s.frame()
    assert df["ollama_size_mib"].to_list()[0] == 12 * 1024
    assert df["ollama_size_vram_mib"].to_list()[0] == 9 * 1024
    assert summarize(df, 0, time.time())["ollama_spill"] is True
    # Only the job's own model counts; a model named without a tag is ':latest', as /api/ps names it.
    other = OllamaBackend(host=host, model="nomic-embed-text", timeout_s=5, keep_alive="5m")
    assert other.loaded_sizes() == (300.0, 0.0)
    asyncio.run(other.close())


def test_ollama_unreachable_gives_none() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = Sampler(interval_s=0.02, gpu_source=None, model_memory=[ollama(f"http://127.0.0.1:{port}")])
    s.start()
    _wait_for(lambda: s.samples >= 3)
    assert _stop_timed(s) < 1.0
    df = s.frame()
    assert df["ollama_size_mib"].null_count() == df.height
    assert summarize(df, 0, time.time())["ollama_spill"] is None


def test_frame_survives_flush_and_parquet_roundtrip(tmp_path: Path) -> None:
    # Pack rows into frames early and often.
    s = Sampler(interval_s=0.005, gpu_source=FakeGpu(n=1), flush_rows=5)
    s.start()
    _wait_for(lambda: s.samples > 12)
    s.stop()
    df = s.frame()
    assert df.height == s.samples
    out = tmp_path / "run" / "samples.parquet"
    write_parquet_atomic(df, out)
    assert pl.read_parquet(out).equals(df)
    assert [p.name for p in out.parent.iterdir()] == ["samples.parquet"]  # no temp left


def test_sampling_cost_is_measured_per_sample() -> None:
    # The budget (< 1 % of a core at 1 s) is a figure of the benchmark's telemetry section (bench/telemetry.py),
    # taken against a baseline there: a CPU time asserted here fails on a busy machine, not on a slow sampler.
    s = Sampler(interval_s=0.005, gpu_source=FakeGpu(n=1))
    s.start()
    _wait_for(lambda: s.samples >= 100)
    s.stop()
    assert s.cpu_seconds > 0 and s.cpu_seconds_per_sample == s.cpu_seconds / s.samples


# Burns `s` CPU seconds between two marker files, then lingers (alive) for `linger` seconds.
_BURN = """import sys, time
open(sys.argv[1] + '.started', 'w').close()
end = time.process_time() + float(sys.argv[2])
while time.process_time() < end:
    pass
open(sys.argv[1] + '.done', 'w').close()
time.sleep(float(sys.argv[3]))
"""


def test_job_cpu_counts_this_process_and_its_children_not_other_processes(tmp_path: Path) -> None:
    """The report's CPU evidence is the job's: its children's CPU seconds count, those of a process
    outside the job (a compiler beside it) do not, however busy it keeps the machine."""
    import subprocess
    import sys

    import psutil

    def burn(name: str, seconds: float, linger: float) -> list[str]:
        return [sys.executable, "-c", _BURN, str(tmp_path / name), str(seconds), str(linger)]

    def measured(name: str) -> float:
        """CPU seconds the meter adds up from just after `name` started until it is done."""
        _wait_for(lambda: (tmp_path / f"{name}.started").exists(), timeout=60)
        meter = telemetry._JobCpuMeter(psutil.Process())  # lists this process's descendants now
        before = meter._cpu_seconds(time.monotonic())
        _wait_for(lambda: (tmp_path / f"{name}.done").exists(), timeout=60)
        return meter._cpu_seconds(time.monotonic()) - before

    meter = telemetry._JobCpuMeter(psutil.Process())
    before = meter._cpu_seconds(time.monotonic())
    subprocess.run(burn("ended", 0.5, 0), check=True)
    assert meter._cpu_seconds(time.monotonic()) - before >= 0.5  # an ended child, waited for

    living = subprocess.Popen(burn("living", 1.0, 60))
    try:
        assert measured("living") >= 0.5  # a child still running
    finally:
        living.kill()
        living.wait()

    # Outside the job: its parent (our child) exits at once, so it belongs to init, not to us.
    spawn = "import subprocess, sys; subprocess.Popen(sys.argv[1:], start_new_session=True)"
    subprocess.run([sys.executable, "-c", spawn, *burn("outside", 1.0, 0)], check=True)
    assert measured("outside") < 0.3


def power_frame(readings: dict[int, list[tuple[float, float | None]]]) -> pl.DataFrame:
    """Sampler-shaped rows: per GPU, (time, watts) pairs; the host fields are filler."""
    host = {"cpu_pct": 5.0, "cpu_per_core": [5.0], "ram_used_mib": 1.0, "ram_available_mib": 1.0}
    rows = [
        {**host, "t": t, "gpu": gpu, "power_w": watts, "vram_used_mib": 100.0}
        for gpu, series in readings.items()
        for t, watts in series
    ]
    return pl.DataFrame(rows, schema=telemetry.SCHEMA, strict=False)


def test_energy_integrates_power_over_time_per_gpu() -> None:
    steady = [(1_000.0 + i, 360.0) for i in range(61)]  # 60 s at 360 W = 6 Wh
    assert telemetry.energy_wh(power_frame({0: steady})) == pytest.approx(6.0)
    ramp = [(1_000.0 + i, 100.0 + 10 * i) for i in range(11)]  # 100 -> 200 W over 10 s: 1,500 J
    assert telemetry.energy_wh(power_frame({0: ramp})) == pytest.approx(1500 / 3600)
    # Two cards add up; their rows interleave in time as the sampler writes them.
    assert telemetry.energy_wh(power_frame({0: steady, 1: steady})) == pytest.approx(12.0)


def test_energy_leaves_gaps_out_and_says_none_without_a_power_reading() -> None:
    # Two attempts of one job, 15 minutes apart: the GPU's draw in between was not measured.
    attempts = [(1_000.0 + i, 360.0) for i in range(11)] + [(2_000.0 + i, 360.0) for i in range(11)]
    assert telemetry.energy_wh(power_frame({0: attempts})) == pytest.approx(20 * 360 / 3600)
    host_only = pl.DataFrame([{"t": 1.0, "cpu_pct": 5.0}, {"t": 2.0, "cpu_pct": 5.0}], schema=telemetry.SCHEMA)
    assert telemetry.energy_wh(host_only) is None  # no GPU
    assert telemetry.energy_wh(power_frame({0: [(1.0, None), (2.0, None)]})) is None  # no power query
    assert telemetry.energy_wh(power_frame({0: [(1.0, 300.0)]})) == 0.0  # one reading: no time passed


def test_chunks_busy_time_counts_side_by_side_tries_once_and_failed_tries_too() -> None:
    marks = pl.DataFrame(
        [
            (100.0, "attempt 1 start"),
            (101.0, "chunk-00000 start"),  # endpoint A
            (102.0, "chunk-00001 start"),  # endpoint B, side by side
            (104.0, "chunk-00000 end"),
            (105.0, "chunk-00001 end"),  # a try that failed ends like one that finished
            (110.0, "chunk-00001 start"),  # its retry, after a gap that is not sending time
            (111.5, "chunk-00001 end"),
        ],
        schema=telemetry.MARK_SCHEMA,
        orient="row",
    )
    assert telemetry.chunks_busy_s(marks) == 4.0 + 1.5
    assert telemetry.chunks_busy_s(marks.head(1)) == 0.0


def test_energy_per_thousand_rows() -> None:
    assert telemetry.wh_per_1000_rows(6.0, 1_500) == pytest.approx(4.0)
    assert telemetry.wh_per_1000_rows(None, 1_500) is None
    assert telemetry.wh_per_1000_rows(6.0, 0) is None
    # A scale-out job's shard runs: a sum only when every one of them read the power.
    assert telemetry.hosts_energy_wh([1.5, 2.0]) == pytest.approx(3.5)
    assert telemetry.hosts_energy_wh([1.5, None]) is None and telemetry.hosts_energy_wh([]) is None


def test_the_report_states_energy_or_why_there_is_none() -> None:
    from tasks.analysis.report import energy_cell

    assert energy_cell({"energy_wh": 12.345, "wh_per_1000_rows": 4.5678}) == "12.35 Wh, 4.57 Wh per 1,000 rows"
    assert energy_cell({"energy_wh": 0.5, "wh_per_1000_rows": None}) == "0.50 Wh, no rows finished"
    assert energy_cell({"energy_wh": None, "wh_per_1000_rows": None}) == "no GPU power reading"
