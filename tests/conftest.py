"""Shared fixtures: a Prefect test server, the Ollama emulator, and input files made per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.ollama_emulator import OllamaEmulator
from tests.postgres_server import PostgresServer, binaries


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """A real (temporary, SQLite) Prefect API for the whole session; flows and artifacts go there."""
    from prefect.testing.utilities import prefect_test_harness

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


def write_input(path: Path, frame: pl.DataFrame) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        frame.write_parquet(path)
    elif path.suffix == ".csv":
        frame.write_csv(path)
    else:
        frame.write_ndjson(path)
    return path


@pytest.fixture
def job(tmp_path: Path, emulator: OllamaEmulator) -> Any:
    """Build job settings overrides for an emulator-backed job over `n` generated rows."""

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
            "ollama_host": emulator.host,
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
