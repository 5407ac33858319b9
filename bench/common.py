"""What every benchmark section shares: the profile, the Prefect server, the process runner, the job files.

Every flow runs as the real CLI (`python -m flows.batch_inference --config job.yaml`) in its own process, from a
snapshot of the code taken at start (`snapshot_code`), against one `prefect server start` for the whole benchmark
(`prefect_server`); `run_process` samples the child's RSS and takes its CPU and peak RSS from wait4().
`meta` and `MachineLoad` describe the machine a result came from and how busy other processes kept it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import psutil
import yaml

from harness.processes import free_port, start, stop, wait_for
from tasks.storage.manifest import package_version

ROOT = Path(__file__).resolve().parents[1]
MODEL = "gemma3:12b"
TEMPLATE = "Candidate: {text}"
PRODUCTION_ROWS = 170_000
CHUNK_SIZE = 5000
OPTIONS = {"num_ctx": 2048, "num_predict": 64, "temperature": 0.0, "seed": 0}
# The users' measured baseline (one request at a time) and a batched rate, for the overhead share.
GPU_RATES = {"users_baseline_3.5_rps": 3.5, "batched_30_rps": 30.0}


@dataclass(frozen=True)
class Profile:
    name: str
    orchestration_rows: tuple[int, int]  # small run → fixed overhead, large run → steady rows/s
    saturation_slots: tuple[int, ...]
    saturation_rows_per_slot: int
    naive_rows: int
    job_rows: tuple[int, int]  # the 17K and 170K (quick: fewer) jobs
    embedded_rows: int
    embedded_repeats: int  # flow runs, each between two bare-loop runs


FULL = Profile("full", (2_000, 20_000), (1, 4, 8), 24, 16, (17_000, 170_000), 8, 2)
QUICK = Profile("quick", (2_000, 10_000), (1, 4, 8), 12, 8, (1_700, 17_000), 8, 1)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


PG_URL_ENV = "PREFECT_SERVER_DATABASE_CONNECTION_URL"


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[tuple[str, int]]:
    """One `prefect server start` for every flow of the benchmark: SQLite under `home`, or the
    database in $PREFECT_SERVER_DATABASE_CONNECTION_URL (passed through in the environment)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    proc = start(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
         "--no-ui", "--analytics-off"],
        env, home, home / "server.log",
    )  # fmt: skip
    started = time.monotonic()

    def healthy() -> bool:
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited; see {home / 'server.log'}")
        return False

    try:
        wait_for(healthy, 180, f"prefect server on {url} (see {home / 'server.log'})")
        log(f"prefect server on {url} (started in {time.monotonic() - started:.1f}s)")
        yield url, proc.pid
    finally:
        stop(proc, grace_s=20)  # the server and the service processes it started


@dataclass
class ProcessRun:
    """A child process: monotonic start/end, exit code, CPU seconds, peak RSS, sampled RSS."""

    t_start: float
    t_end: float
    returncode: int
    cpu_s: float
    maxrss_mib: float
    rss: list[tuple[float, float]] = field(default_factory=list)  # (monotonic t, MiB)

    @property
    def wall_s(self) -> float:
        return self.t_end - self.t_start

    def rss_at(self, t: float) -> float | None:
        before = [mib for ts, mib in self.rss if ts <= t]
        return before[-1] if before else None

    def rss_peak_between(self, t0: float, t1: float) -> float | None:
        inside = [mib for ts, mib in self.rss if t0 <= ts <= t1]
        return max(inside) if inside else None


SNAPSHOT_DIRS = ("flows", "tasks", "bench", "harness")


def snapshot_code(work: Path) -> tuple[Path, str]:
    """Copy the code every flow runs into the scratch directory, so one benchmark measures one version
    even while the working tree changes under it; returns the copy and a digest of flows/ and tasks/."""
    import hashlib

    src = work / "src"
    for name in SNAPSHOT_DIRS:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "results", "*.pyc"))
    digest = hashlib.sha256()
    for path in sorted([*(src / "flows").rglob("*.py"), *(src / "tasks").rglob("*.py")]):
        digest.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes())
    return src, digest.hexdigest()[:12]


def run_process(
    cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path = ROOT, rss_interval_s: float = 0.1
) -> ProcessRun:
    """Run `cmd` from the repository root; sample its RSS; peak RSS and CPU come from wait4()."""
    samples: list[tuple[float, float]] = []
    with log_path.open("w") as logf:
        t_start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=logf, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            with contextlib.suppress(psutil.Error):
                handle = psutil.Process(proc.pid)
                while not done.is_set():
                    samples.append((time.monotonic(), handle.memory_info().rss / 2**20))
                    done.wait(rss_interval_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        t_end = time.monotonic()
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    return ProcessRun(
        t_start=t_start,
        t_end=t_end,
        returncode=proc.returncode,
        cpu_s=usage.ru_utime + usage.ru_stime,
        maxrss_mib=usage.ru_maxrss / 1024,  # KiB on Linux
        rss=samples,
    )


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Bench:
    """What every section shares: the profile, a scratch directory, the Prefect API."""

    profile: Profile
    work: Path
    api_url: str
    server_pid: int
    src: Path  # the code snapshot flows and helpers run from (python -m from this directory)

    def server_cpu_s(self) -> float:
        """CPU seconds the Prefect server (and the processes it started) used so far."""
        try:
            proc = psutil.Process(self.server_pid)
            total = 0.0
            for p in [proc, *proc.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = p.cpu_times()
                    total += times.user + times.system
            return total
        except psutil.Error:
            return float("nan")

    def settle(self, below_pct: float = 20.0, timeout_s: float = 20.0) -> float:
        """Wait until the machine is idle (the server may still digest the last flow's events)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if psutil.cpu_percent(interval=1.0) < below_pct:
                break
        return time.monotonic() - started

    @property
    def env(self) -> dict[str, str]:
        env = {**os.environ, "PREFECT_API_URL": self.api_url, "PREFECT_HOME": str(self.work / "prefect-home")}
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("OLLAMA_API_KEY", None)
        return env

    def input_file(self, rows: int, tag: str = "rows") -> Path:
        path = self.work / "inputs" / f"{tag}-{rows}.parquet"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # The row index travels in the prompt ("row=N"), so the emulator's records say which
            # chunk each request belonged to. Text >= 40 chars: every answer has the same length.
            pl.DataFrame(
                {
                    "id": [f"r{i:07d}" for i in range(rows)],
                    "text": [
                        f"row={i}; 7 years of Python, SQL and Prefect; built batch pipelines" for i in range(rows)
                    ],
                }
            ).write_parquet(path)
        return path

    def job_file(self, name: str, **settings: Any) -> Path:
        data = {
            "name": name,
            "id_column": "id",
            "prompt_template": TEMPLATE,
            "backend": "ollama",
            "model": MODEL,
            "options": OPTIONS,
            "chunk_size": CHUNK_SIZE,
            "output_dir": str(self.work / "out" / name),
            "production_rows": PRODUCTION_ROWS,
            **settings,
        }
        path = self.work / "jobs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def run_flow(self, job: Path) -> ProcessRun:
        log_path = self.work / "logs" / f"{job.stem}-{time.monotonic_ns()}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "flows.batch_inference", "--config", str(job)]
        run = run_process(cmd, self.env, log_path, cwd=self.src)
        if run.returncode != 0:
            raise RuntimeError(f"flow {job.stem} exited {run.returncode}:\n{tail(log_path)}")
        return run

    def run_helper(self, mode: str, spec: dict[str, Any]) -> tuple[dict[str, Any], ProcessRun]:
        """Run a bare client of bench/clients.py in a fresh process; returns its JSON.

        It runs as `python -m bench.benchmark --MODE SPEC OUT` from the code snapshot, so it imports what a
        benchmark process imports (its process wall is a figure: saturation's speedup_vs_naive_end_to_end).
        """
        spec_path = self.work / "helpers" / f"{mode}-{time.monotonic_ns()}.json"
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        out_path = spec_path.with_suffix(".out.json")
        spec_path.write_text(json.dumps(spec))
        run = run_process(
            [sys.executable, "-m", "bench.benchmark", f"--{mode}", str(spec_path), str(out_path)],
            self.env,
            spec_path.with_suffix(".log"),
            cwd=self.src,
        )
        if run.returncode != 0:
            raise RuntimeError(f"helper {mode} exited {run.returncode}:\n{tail(spec_path.with_suffix('.log'))}")
        return json.loads(out_path.read_text()), run


def texts_of(path: Path, rows: int | None = None) -> list[str]:
    frame = pl.read_parquet(path, columns=["text"])
    return frame["text"].to_list()[: rows if rows is not None else frame.height]


def meta(profile: Profile) -> dict[str, Any]:
    def _git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    cpu_model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line),
        platform.processor(),
    ) if Path("/proc/cpuinfo").exists() else platform.processor()  # fmt: skip
    status = _git("status", "--porcelain")
    return {
        "profile": profile.name,
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_uncommitted_files": None if status is None else len(status.splitlines()),
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "ram_gib": r(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "versions": {
            n: package_version(n) for n in ("prefect", "ollama", "httpx", "polars", "pydantic", "llama-cpp-python")
        },
        # The server's database decides the chunk hand-over (bench/README.md): say which one ran.
        "prefect_database": "postgresql" if "postgresql" in os.environ.get(PG_URL_ENV, "") else "sqlite",
    }


class MachineLoad:
    """CPU the machine spent on processes that are not this benchmark's: a noise flag for a section."""

    def __init__(self, b: Bench) -> None:
        self.b = b
        self.t0 = time.monotonic()
        self.busy0 = self._busy()
        self.own0 = self._own()

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def _own(self) -> float:
        mine = os.times()  # this process and its reaped children (the flows and helpers)
        return mine.user + mine.system + mine.children_user + mine.children_system + self.b.server_cpu_s()

    def others_pct(self) -> float | None:
        elapsed = (time.monotonic() - self.t0) * (os.cpu_count() or 1)
        others = (self._busy() - self.busy0) - (self._own() - self.own0)
        return r(max(0.0, 100 * others / elapsed), 1) if elapsed > 0 else None


def strip_private(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: strip_private(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [strip_private(v) for v in obj]
    return obj
