"""End to end on the real embedded model (Gemma 3 270M Q4_K_M via llama-cpp-python): the schema is the oracle."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from pydantic import BaseModel, Field

from flows.batch_inference import batch_inference
from tests.conftest import make_rows, write_input

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("prefect_server")]
pytest.importorskip("llama_cpp", reason="the embedded backend is the 'embedded' extra")


class Score(BaseModel):
    """The structured output these tests ask for; also importable as tests.test_embedded:Score."""

    score: int = Field(ge=0, le=10)
    reason: str = Field(max_length=300)


def embedded_job(tmp_path: Path, **extra: object) -> dict[str, object]:
    data = write_input(tmp_path / "in.csv", make_rows(3))
    return {
        "name": "embedded",
        "input_path": str(data),
        "prompt_template": "Role: {role}\nCandidate: {text}\nRate the fit from 0 to 10 with a one-sentence reason.",
        "system_prompt": "Answer only with JSON.",
        "backend": "llamacpp",
        "model": "gemma3-270m",
        "output_schema": "tests.test_embedded:Score",
        "options": {"num_ctx": 512, "num_predict": 48, "seed": 3},
        "chunk_size": 2,
        "max_attempts": 2,
        "output_dir": str(tmp_path / "out"),
        "telemetry_interval_s": 0.5,
        **extra,
    }


def test_real_model_rows_validate_against_the_schema(tmp_path: Path) -> None:
    manifest = batch_inference(overrides=embedded_job(tmp_path))
    results = pl.read_parquet(tmp_path / "out" / "results.parquet")
    assert results["row_index"].to_list() == [0, 1, 2] and manifest["complete"]
    assert results.schema["score"] == pl.Int64 and results.schema["reason"] == pl.String
    for row in results.iter_rows(named=True):
        assert row["completion_tokens"] > 0 and row["prompt_tokens"] > 0 and row["response"]
        if row["status"] == "ok":
            parsed = Score.model_validate_json(row["response"])  # the schema decides, not the pipeline
            assert (row["score"], row["reason"]) == (parsed.score, parsed.reason)
        else:  # the 270M model may break the bounds (the grammar does not enforce them): kept raw
            assert row["error_kind"] == "invalid_output" and row["response"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "This ETA is for the embedded model on this machine" in report  # a CPU run says so


def test_cut_off_json_becomes_an_error_row_with_raw_text(tmp_path: Path) -> None:
    batch_inference(overrides=embedded_job(tmp_path, options={"num_ctx": 512, "num_predict": 4}, max_attempts=1))
    results = pl.read_parquet(tmp_path / "out" / "results.parquet")
    assert results["status"].to_list() == ["error"] * 3
    assert results["error_kind"].to_list() == ["invalid_output"] * 3
    assert results["done_reason"].to_list() == ["length"] * 3 and all(results["response"].str.len_chars() > 0)


def test_trimming_uses_the_models_own_tokenizer(tmp_path: Path) -> None:
    from tasks.inference.backends import token_counter
    from tasks.plan.dataset import validate_input
    from tasks.plan.prompts import prepare_chunk
    from tasks.settings.load import load_settings

    frame = make_rows(1).with_columns(text=pl.lit("a long candidate history " * 400))
    job = embedded_job(tmp_path, trim_field="text", options={"num_ctx": 512, "num_predict": 48})
    job["input_path"] = str(write_input(tmp_path / "long.parquet", frame))
    settings = load_settings(None, job)
    count = token_counter(settings)
    assert count is not None
    (row,) = prepare_chunk(settings, validate_input(settings).chunks[0], count_tokens=count)
    used = count(row.messages)
    assert row.trimmed and 300 < used <= 512 - 48  # cut to fit, not far below the budget


def test_openai_batch_file_on_the_real_model_honours_each_lines_max_tokens(tmp_path: Path) -> None:
    from openai.types.chat import ChatCompletion

    from tests.test_openai_batch import line, output_lines

    requests = tmp_path / "requests.jsonl"
    requests.write_text(
        line("short", "Count from one to twenty.", max_tokens=3) + line("long", "Say hello.", max_tokens=12)
    )
    settings = {
        k: v
        for k, v in embedded_job(tmp_path).items()
        if k not in ("prompt_template", "system_prompt", "output_schema")
    }
    manifest = batch_inference(overrides={**settings, "input_path": str(requests)})
    assert manifest["complete"]
    results = pl.read_parquet(tmp_path / "out" / "results.parquet")
    tokens = dict(zip(results["id"], results["completion_tokens"], strict=True))
    assert tokens["short"] <= 3 and 0 < tokens["long"] <= 12
    for out in output_lines({"output_dir": str(tmp_path / "out")}):
        body = ChatCompletion.model_validate(out["response"]["body"])
        assert body.choices[0].message.content is not None
        assert body.usage is not None and body.usage.completion_tokens == tokens[out["custom_id"]]
