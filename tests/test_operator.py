"""What the command line says to an operator: hints that fit, a done line that shows answers, exit codes."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from harness.ollama_emulator import OllamaEmulator
from tasks.storage.outdir import claim_output_dir
from tests.test_cli import cli, job_file


@pytest.mark.parametrize(
    ("change", "names", "not_named"),
    [
        (
            {"backend": "openai", "ollama_host": None, "base_url": "http://127.0.0.1:9/v1", "model": "gemma-3"},
            ["base_url", "GET <base_url>/models"],
            "ollama",
        ),
        ({"backend": "llamacpp", "ollama_host": None, "model_path": "nowhere/model.gguf"}, ["model_path"], "ollama"),
        ({"ollama_host": "http://127.0.0.1:9"}, ["`ollama serve`", "ollama_host"], "base_url"),
    ],
)
def test_an_unusable_backend_gets_the_hint_of_its_kind(
    job: Any, tmp_path: Path, change: dict[str, Any], names: list[str], not_named: str
) -> None:
    done = cli(job_file(tmp_path, {**job(5), **change}), api=False)
    assert done.returncode == 6, done.stderr
    error, hint = done.stderr.strip().splitlines()
    assert error.startswith("error: backend check failed") and hint.startswith("hint: "), done.stderr
    assert all(name in hint for name in names) and not_named not in hint.lower(), hint


@pytest.mark.usefixtures("prefect_server")
def test_the_done_line_shows_the_first_answers_and_the_report(job: Any, tmp_path: Path) -> None:
    settings = job(12)
    first = cli(job_file(tmp_path, settings))
    assert first.returncode == 0, first.stderr
    out = Path(settings["output_dir"])
    results = pl.read_parquet(out / "results.parquet")
    lines = first.stdout.strip().splitlines()
    assert lines[0] == f"12 ok, 0 error rows → {out / 'results.parquet'}"
    for line, row in zip(lines[1:3], results.head(2).iter_rows(named=True), strict=True):
        answer = " ".join(row["response"].split())
        assert line.startswith(f"  {row['id']}: ") and len(line) <= 2 + len(row["id"]) + 2 + 100
        assert answer.startswith(line.split(": ", 1)[1].removesuffix("…")), (line, answer)
    assert lines[3:] == [f"report: {out / 'report.md'}"]
    # Run again: everything is done. The plain progress line ("done") is printed once, not twice.
    again = cli(job_file(tmp_path, settings))
    assert again.returncode == 0, again.stderr
    progress = [line for line in again.stderr.splitlines() if "[test] " in line]  # a flow log line
    assert len(progress) == 1 and "12/12 rows (100.0%)" in progress[0] and "done" in progress[0], again.stderr
    assert again.stdout.strip().splitlines() == lines


@pytest.mark.parametrize("where", ["--set", "job file"])
def test_an_impossible_run_date_is_a_settings_error(job: Any, tmp_path: Path, where: str) -> None:
    path = job_file(tmp_path, job(5))
    if where == "--set":
        done = cli(path, "--set", "run_date=2026-02-30", api=False)
    else:
        path.write_text(path.read_text() + "run_date: 2026-02-30\n")  # YAML reads it as a date: no such day
        done = cli(path, api=False)
    assert done.returncode == 3, done.stderr
    error, hint = done.stderr.strip().splitlines()
    assert "run_date" in error and "day is out of range for month" in error, error
    assert hint.startswith("hint: check the job file"), done.stderr
    assert "resumes" not in done.stderr


def test_a_named_pipe_as_input_is_not_a_file(job: Any, emulator: OllamaEmulator, tmp_path: Path) -> None:
    fifo = tmp_path / "rows.csv"
    os.mkfifo(fifo)
    done = cli(job_file(tmp_path, {**job(5), "input_path": str(fifo)}), api=False, timeout=60)  # never opened
    assert done.returncode == 4, done.stderr
    assert f"input {fifo} is a named pipe (FIFO), not a regular file" in done.stderr
    assert "does not exist" not in done.stderr and emulator.requests == []


def test_a_directory_another_run_holds_is_never_to_be_deleted(job: Any, tmp_path: Path) -> None:
    settings = job(5)
    out = Path(settings["output_dir"])
    with claim_output_dir(out, "another job", {}):  # a live run, as far as the lock says
        done = cli(job_file(tmp_path, settings), api=False)
    assert done.returncode == 5, done.stderr
    error, hint = done.stderr.strip().splitlines()
    assert f"output_dir {out} is in use by another run (pid {os.getpid()} on {socket.gethostname()} since " in error
    assert "wait for it to end" in hint and "--set output_dir=" in hint, hint
    assert "delete" not in done.stderr
    assert "temporary Prefect server" not in done.stderr  # refused before any server starts
