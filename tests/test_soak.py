"""Soak: 20,000 rows through the flow while the emulator injects ~1 % faults of every kind."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from flows.batch_inference import batch_inference
from tests.support.ollama_emulator import Fault, OllamaEmulator, answer_for

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
        request_timeout_s=1.0,
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
