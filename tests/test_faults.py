"""Faults met by the real flow: an input replaced mid-run, an outage at a chunk hand-over, a lost job.json."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from flows.batch_inference import batch_inference
from harness.ollama_emulator import OllamaEmulator, answer_for
from tasks.plan.dataset import ChunkSpec
from tasks.storage.journal import chunk_path
from tasks.storage.outdir import OutputDirError
from tests.conftest import make_rows, when, write_input

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_an_input_replaced_during_the_run_changes_nothing_and_a_rerun_is_refused(
    job: Any, emulator: OllamaEmulator, tmp_path: Path
) -> None:
    emulator.latency_s = 0.02
    settings = job(24, fmt="csv", chunk_size=8)
    out, source = Path(settings["output_dir"]), Path(settings["input_path"])
    changed = pl.concat([make_rows(1, start=900), make_rows(24)])  # one row inserted at the top

    watcher = when(
        lambda: chunk_path(out, ChunkSpec(index=0, offset=0, length=8)).exists(), lambda: write_input(source, changed)
    )
    manifest = batch_inference(overrides=settings)
    watcher.join()
    results = pl.read_parquet(out / "results.parquet")
    assert results["id"].to_list() == [f"r{i:05d}" for i in range(24)]  # the rows planned, each once
    assert manifest["complete"] and len(set(emulator.chat_prompts())) == 24
    assert manifest["input_digest"] == json.loads((out / "job.json").read_text())["input_digest"]
    with pytest.raises(OutputDirError, match=r"contents of the input file .*input.csv"):
        batch_inference(overrides=settings)


def test_an_outage_at_a_chunk_hand_over_is_waited_out(job: Any, emulator: OllamaEmulator) -> None:
    settings = job(24, chunk_size=8, outage_budget_s=20, chunk_retries=0)
    out = Path(settings["output_dir"])

    def outage() -> None:
        emulator.down()
        time.sleep(3)
        emulator.up()

    # Down the moment chunk 0's last row is answered: chunk 1's first contact is its backend check.
    watcher = when(lambda: len(emulator.chat_prompts()) >= 8, outage)
    manifest = batch_inference(overrides=settings)
    watcher.join()
    assert manifest["complete"] and manifest["rows_ok"] == 24
    assert chunk_path(out, ChunkSpec(index=1, offset=8, length=8)).exists()


def test_without_job_json_another_configuration_resends_everything(job: Any, emulator: OllamaEmulator) -> None:
    settings = job(16, chunk_size=8)
    out = Path(settings["output_dir"])
    batch_inference(overrides=settings)
    (out / "job.json").unlink()
    emulator.reset_stats()
    other = {**settings, "prompt_template": "Rate: {text} ({role})"}
    manifest = batch_inference(overrides=other)
    assert manifest["complete"] and len(emulator.chat_prompts()) == 16  # nothing of the old prompt reused
    answers = pl.read_parquet(out / "results.parquet")["response"].to_list()
    prompts = [[{"role": "user", "content": f"Rate: candidate {i} writes Python (data engineer)"}] for i in range(16)]
    assert answers == [answer_for(p) for p in prompts]  # the new prompt's answers, not the old ones
    assert sorted(p.name for p in (out / "set-aside").iterdir()) == ["chunk-00000.parquet", "chunk-00001.parquet"]
