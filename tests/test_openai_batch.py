"""OpenAI batch files in and out: vLLM's run-batch examples run unchanged, per-line settings, clear refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from openai.types.chat import ChatCompletion

from flows.batch_inference import batch_inference
from harness.ollama_emulator import Fault, OllamaEmulator, answer_for
from tasks.plan.dataset import InputError, validate_input
from tasks.settings.load import load_settings

pytestmark = pytest.mark.usefixtures("prefect_server")

# vLLM's examples/offline_inference/openai/openai_example_batch.jsonl, as its docs show it.
VLLM_EXAMPLE = """\
{"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "meta-llama/Meta-Llama-3-8B-Instruct", "messages": [{"role": "system", "content": "You are a helpful assistant."},{"role": "user", "content": "Hello world!"}],"max_completion_tokens": 1000}}
{"custom_id": "request-2", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "meta-llama/Meta-Llama-3-8B-Instruct", "messages": [{"role": "system", "content": "You are an unhelpful assistant."},{"role": "user", "content": "Hello world!"}],"max_completion_tokens": 1000}}
"""
# Its embeddings example: another endpoint, refused by name.
VLLM_EMBEDDINGS = """\
{"custom_id": "request-1", "method": "POST", "url": "/v1/embeddings", "body": {"model": "intfloat/e5-mistral-7b-instruct", "input": "You are a helpful assistant."}}
"""


def line(custom_id: str, content: str, **body: Any) -> str:
    request = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **body},
    }
    return json.dumps(request) + "\n"


def batch_job(job: Any, tmp_path: Path, text: str, **overrides: Any) -> dict[str, Any]:
    path = tmp_path / "requests.jsonl"
    path.write_text(text)
    settings = job(1)
    del settings["prompt_template"]
    return {**settings, "input_path": str(path), **overrides}


def chats(emulator: OllamaEmulator) -> list[Any]:
    return [r for r in emulator.requests if r.path == "/api/chat"]


def output_lines(settings: dict[str, Any]) -> list[dict[str, Any]]:
    text = (Path(settings["output_dir"]) / "openai-output.jsonl").read_text()
    return [json.loads(raw) for raw in text.splitlines()]


def test_vllm_example_runs_unchanged_and_the_output_reads_as_openai_batch_output(
    job: Any, emulator: OllamaEmulator, tmp_path: Path
) -> None:
    settings = batch_job(job, tmp_path, VLLM_EXAMPLE)
    manifest = batch_inference(overrides=settings)
    assert manifest["complete"] and manifest["rows_ok"] == 2
    sent = chats(emulator)
    assert {r.body["options"]["num_predict"] for r in sent} == {1000}  # max_completion_tokens, per line
    assert {r.body["messages"][0]["content"] for r in sent} == {
        "You are a helpful assistant.",
        "You are an unhelpful assistant.",
    }
    lines = output_lines(settings)
    assert [x["custom_id"] for x in lines] == ["request-1", "request-2"]
    for out, request in zip(lines, VLLM_EXAMPLE.splitlines(), strict=True):
        assert out["error"] is None and out["response"]["status_code"] == 200 and out["id"].startswith("batch_req_")
        body = ChatCompletion.model_validate(out["response"]["body"])  # the official client's own type
        messages = json.loads(request)["body"]["messages"]
        assert body.choices[0].message.content == answer_for(messages)
        assert body.usage is not None and body.usage.total_tokens > 0 and body.model == "gemma3:12b"
    # A rerun into the same directory writes the same file (ids are stable).
    before = (Path(settings["output_dir"]) / "openai-output.jsonl").read_text()
    batch_inference(overrides=settings)
    assert (Path(settings["output_dir"]) / "openai-output.jsonl").read_text() == before


def test_per_line_sampling_settings_are_honoured(job: Any, emulator: OllamaEmulator, tmp_path: Path) -> None:
    text = (
        line("a", "first", temperature=0.3, seed=7, top_p=0.9, stop="END", max_tokens=20)
        + line("b", "second", presence_penalty=0.5)
        + line("c", "third")
    )
    settings = batch_job(job, tmp_path, text)
    batch_inference(overrides=settings)
    by_prompt = {r.body["messages"][0]["content"]: r.body["options"] for r in chats(emulator)}
    assert by_prompt["first"] == {
        "num_ctx": 2048,
        "num_predict": 20,
        "temperature": 0.3,
        "seed": 7,
        "top_p": 0.9,
        "stop": ["END"],
    }
    assert by_prompt["second"]["presence_penalty"] == 0.5 and by_prompt["second"]["num_predict"] == 64
    assert by_prompt["third"] == {"num_ctx": 2048, "num_predict": 64, "temperature": 0.0, "seed": 0}
    assert {o["num_ctx"] for o in by_prompt.values()} == {2048}  # the runner option never varies: no reload


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (line("a", "x") + line("b", "y", num_ctx=8192), r"line 2: body.num_ctx is a runner setting; Ollama reloads"),
        (line("a", "x") + line("b", "y").replace("gpt-4o-mini", "gpt-4o"), r"line 2: body.model differs from line 1"),
        (
            line("a", "x", response_format={"type": "json_object"}) + line("b", "y"),
            r"line 2: body.response_format differs",
        ),
        (line("a", "x", n=3), r"line 1: body.n=3: one answer per request only"),
        (line("a", "x", temperature=7), r"line 1: temperature Input should be less than or equal to 2"),
        (
            line("a", "x") + line("a", "y"),
            r"duplicate ids in 'custom_id': 'a' at data rows 1 and 2 \(counted from 1; row_index",
        ),
        (line("a", "x") + "{not json\n", r"line 2: .*Invalid JSON"),
        (VLLM_EMBEDDINGS, r"line 1: url '/v1/embeddings' is not supported \(only /v1/chat/completions\)"),
        (
            line("a", "x").replace('"x"', '[{"type": "image_url", "image_url": {"url": "http://i"}}]'),
            r"line 1: content part of type 'image_url' is not supported",
        ),
    ],
)
def test_lines_the_job_cannot_run_as_written_are_refused_before_any_request(
    job: Any, emulator: OllamaEmulator, tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(InputError, match=message):
        batch_inference(overrides=batch_job(job, tmp_path, text))
    assert chats(emulator) == [] and not [r for r in emulator.requests if r.path == "/api/show"]


def test_a_prompt_template_with_a_batch_file_is_refused(job: Any, tmp_path: Path) -> None:
    settings = {**batch_job(job, tmp_path, VLLM_EXAMPLE), "prompt_template": "{text}"}
    with pytest.raises(InputError, match=r"is an OpenAI batch file: its lines carry the messages, so prompt_template"):
        batch_inference(overrides=settings)


def test_a_missing_or_unrecognised_batch_file_says_what_is_wrong(job: Any, tmp_path: Path) -> None:
    missing = {**batch_job(job, tmp_path, VLLM_EXAMPLE), "input_path": str(tmp_path / "requests-typo.jsonl")}
    with pytest.raises(InputError, match=r"requests-typo.jsonl does not exist"):
        validate_input(load_settings(None, missing), pin=False)
    table = {**batch_job(job, tmp_path, VLLM_EXAMPLE), "prompt_template": "{text}", "input_format": "openai_batch"}
    with pytest.raises(InputError, match=r"is read as an OpenAI batch file \(input_format\): its lines carry"):
        validate_input(load_settings(None, table), pin=False)
    broken = batch_job(job, tmp_path, "{not json\n" + VLLM_EXAMPLE)
    with pytest.raises(InputError, match=r"set prompt_template .*an OpenAI batch file is told by its first line"):
        validate_input(load_settings(None, broken), pin=False)


def test_shared_json_schema_becomes_typed_columns_and_errors_become_error_lines(
    job: Any, emulator: OllamaEmulator, tmp_path: Path
) -> None:
    schema = {
        "type": "object",
        "properties": {"score": {"type": "integer", "enum": [1, 2, 3]}, "label": {"type": "string"}},
        "required": ["score", "label"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "rating", "strict": True, "schema": schema}}
    text = "".join(line(f"q{i}", f"rate {i}", response_format=response_format) for i in range(6))
    emulator.inject(Fault.bad_request("prompt too long"), match="rate 4")
    settings = batch_job(job, tmp_path, text)
    manifest = batch_inference(overrides=settings)
    assert manifest["rows_ok"] == 5 and manifest["rows_error"] == 1
    results = pl.read_parquet(Path(settings["output_dir"]) / "results.parquet")
    assert results.schema["score"] == pl.Int64 and results.schema["label"] == pl.String
    assert all(r.body["format"] == chats(emulator)[0].body["format"] for r in chats(emulator))
    lines = output_lines(settings)
    assert lines[4]["response"] is None and lines[4]["error"]["code"] == "bad_request"
    ok = json.loads(lines[0]["response"]["body"]["choices"][0]["message"]["content"])
    assert ok["score"] in (1, 2, 3) and results.row(0, named=True)["score"] == ok["score"]


def test_a_table_input_can_write_openai_output_too(job: Any, emulator: OllamaEmulator) -> None:
    settings = job(5, openai_output=True)
    batch_inference(overrides=settings)
    assert [x["custom_id"] for x in output_lines(settings)] == [f"r{i:05d}" for i in range(5)]
