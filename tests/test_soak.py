"""Soak: 20,000 rows through the flow while the emulator injects ~1 % faults of every kind."""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from flows.batch_inference import batch_inference
from harness.ollama_emulator import Fault, OllamaEmulator, answer_for
from tasks.plan.dataset import validate_input
from tasks.settings.load import load_settings
from tasks.storage.journal import chunk_path

pytestmark = [pytest.mark.soak, pytest.mark.usefixtures("prefect_server")]

ROWS = 20_000
SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 10}, "verdict": {"enum": ["hire", "pass"]}},
    "required": ["score", "verdict"],
}


def test_soak_exactly_once_under_random_faults(job: Any, emulator: OllamaEmulator, tmp_path: Path) -> None:
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    kinds = [Fault.oom(), Fault.runner_crash(), Fault.busy(), Fault.drop(), Fault.invalid_json(), Fault.hang()]
    emulator.random_faults(0.01, seed=2026, kinds=kinds)
    settings = job(
        ROWS,
        chunk_size=5000,
        in_flight=8,
        # Long enough that a loaded machine's ordinary request does not time out and get sent again
        # (seen at 1 s: one prompt answered twice), short enough that the hangs end quickly.
        request_timeout_s=3.0,
        oom_backoff_s=0.05,
        max_attempts=6,
        checkpoint_every_s=1.0,
        output_schema=str(tmp_path / "schema.json"),
    )
    manifest = batch_inference(overrides=settings)
    results = pl.read_parquet(Path(settings["output_dir"]) / "results.parquet")
    assert results.height == ROWS and results["row_index"].to_list() == list(range(ROWS))
    assert manifest["rows_ok"] + manifest["rows_error"] == ROWS
    faults = Counter(r.fault for r in emulator.requests if r.fault)
    assert set(faults) == {k.name for k in kinds} and sum(faults.values()) > 0.005 * ROWS  # every kind happened
    # Every ok row carries exactly the answer the emulator gave for its prompt.
    ok = results.filter(pl.col("status") == "ok")
    for record in ok.sample(500, seed=1).iter_rows(named=True):
        i = record["row_index"]
        prompt = [{"role": "user", "content": f"Role: data engineer\nCandidate: candidate {i} writes Python"}]
        expected = json.loads(answer_for(prompt, SCHEMA))
        assert (record["score"], record["verdict"]) == (expected["score"], expected["verdict"])
    # With 6 attempts and 1 % faults, a row failing them all is vanishingly rare: nearly every row is ok.
    assert ok.height >= ROWS - 5, results.filter(pl.col("status") == "error").select("row_index", "error").head()
    # No finished row was produced twice: one clean 200 per prompt.
    clean = Counter(r.prompt for r in emulator.requests if r.path == "/api/chat" and r.status == 200 and not r.fault)
    assert len(clean) >= ok.height and max(clean.values()) == 1


def test_soak_kills_outages_and_damage_end_with_every_id_once(
    job: Any, emulator: OllamaEmulator, tmp_path: Path
) -> None:
    """Four runs of the real CLI: three SIGKILLed (process group, at random moments), an outage in
    one, a damaged chunk file and a torn journal line between runs; the last run finishes."""
    from tests.test_kill import kill_when, rerun, start_flow

    rng = random.Random(14)
    emulator.latency_s = 0.01
    settings = job(400, chunk_size=50, in_flight=4, outage_budget_s=30, gpu_limit=f"gpu-soak-{os.getpid()}")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(settings))
    parsed = load_settings(job_file)
    out, chunks = parsed.output_dir, validate_input(parsed).chunks

    def on_disk() -> int:  # progress, counted at the emulator: the files may be damaged on purpose
        return len(emulator.chat_prompts())

    said = []
    for run in range(3):
        target = on_disk() + rng.randint(20, 90)
        log = tmp_path / f"run-{run}.log"
        proc = start_flow(job_file, log)
        if run == 1:  # an outage mid-run, shorter than the budget
            while on_disk() < target - 10 and proc.poll() is None:
                time.sleep(0.01)
            emulator.down()
            time.sleep(2)
            emulator.up()
        kill_when(proc, log, lambda t=target: on_disk() >= t)  # type: ignore[misc]
        done = sorted(chunk_path(out, c) for c in chunks if chunk_path(out, c).exists())
        if done:  # on-disk damage between runs: a chunk file cut in half
            victim = rng.choice(done)
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
            said.append(victim.name)
        if journals := sorted(out.glob("chunks/*.journal-*.jsonl")):
            with journals[-1].open("ab") as handle:
                handle.write('{"row_index": 1, "response": "caf\u00e9 \u2713'.encode()[:-1])  # torn inside a character
    final = tmp_path / "final.log"
    rerun(job_file, final, limit_s=120)
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("*.log")))
    assert said and all(f"{name} cannot be read" in logs for name in said), said  # each damage named
    assert "torn or unreadable line(s) skipped" in logs

    results = pl.read_parquet(out / "results.parquet")
    assert results["id"].to_list() == [f"r{i:05d}" for i in range(400)]  # every input id exactly once, in order
    manifest = json.loads((out / "manifest.json").read_text())
    ok = results.filter(pl.col("status") == "ok")
    assert manifest["complete"] and manifest["rows_total"] == 400 and manifest["rows_pending"] == 0
    assert (manifest["rows_ok"], manifest["rows_error"]) == (ok.height, results.height - ok.height)
    for record in ok.iter_rows(named=True):  # each answer is the one its own prompt got
        i = record["row_index"]
        assert record["response"] == answer_for(
            [{"role": "user", "content": f"Role: data engineer\nCandidate: candidate {i} writes Python"}]
        )
