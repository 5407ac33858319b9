"""backend: openai — against a real llama.cpp server where it can show the behaviour, and against the
emulator's Ollama /v1 (OpenAI-compatible) routes for faults a real server cannot be made to produce."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
import yaml
from pydantic import BaseModel, Field

from flows.batch_inference import batch_inference
from harness.llama_server import ALIAS
from harness.ollama_emulator import Fault, OllamaEmulator
from harness.processes import start_cli
from tasks.inference.backends import BackendError, make_backend
from tasks.inference.backends.fake import FakeBackend
from tasks.inference.runner import ChunkAborted, run_chunk
from tasks.plan.dataset import validate_input
from tasks.schema import ResultRow
from tasks.settings.load import load_settings
from tasks.storage.journal import chunk_path, finished_rows
from tests.conftest import make_rows, write_input


class Fit(BaseModel):
    """The structured answer the real-server tests ask for (importable as tests.test_openai_backend:Fit)."""

    score: int = Field(ge=0, le=10)
    reason: str = Field(max_length=200)


# ---------------------------------------------------------------- emulator: Ollama's /v1 routes, scripted faults
def openai_job(job: Any, emulator: OllamaEmulator, n: int, **overrides: Any) -> dict[str, Any]:
    settings = job(n, chunk_size=n, **overrides)
    del settings["ollama_host"]
    return {**settings, "backend": "openai", "base_url": f"{emulator.host}/v1", **overrides}


def chat_requests(emulator: OllamaEmulator) -> list[Any]:
    return [r for r in emulator.requests if r.path == "/v1/chat/completions"]


def run_one(settings: dict[str, Any]) -> tuple[pl.DataFrame, Any]:
    parsed = load_settings(None, settings)
    chunk = validate_input(parsed).chunks[0]
    stats = run_chunk(parsed, chunk, make_backend(parsed))
    return pl.read_parquet(chunk_path(parsed.output_dir, chunk)), stats


def test_rows_options_and_usage_map_onto_the_result_columns(job: Any, emulator: OllamaEmulator) -> None:
    frame, stats = run_one(openai_job(job, emulator, 6, options={"num_ctx": 2048, "num_predict": 40, "seed": 7}))
    assert frame["status"].to_list() == ["ok"] * 6 and stats.requests == 6
    assert frame["prompt_tokens"].min() > 0 and frame["completion_tokens"].min() > 0
    # Ollama's OpenAI endpoint sends no timings: none are made up.
    assert frame["prompt_eval_ms"].null_count() == frame["eval_ms"].null_count() == 6
    body = chat_requests(emulator)[0].body
    # Sampling settings travel as OpenAI fields; the client added none of its own retries.
    assert (body["max_tokens"], body["temperature"], body["seed"]) == (40, 0.0, 7)
    assert len(chat_requests(emulator)) == 6


def test_structured_output_goes_as_json_schema_and_is_validated(job: Any, emulator: OllamaEmulator) -> None:
    emulator.inject(Fault.invalid_json(), match="candidate 1 writes")
    frame, _ = run_one(openai_job(job, emulator, 3, output_schema="tests.test_openai_backend:Fit"))
    assert frame["status"].to_list() == ["ok"] * 3
    assert frame.filter(pl.col("row_index") == 1)["attempts"].item() == 2  # resampled after the invalid answer
    fmt = chat_requests(emulator)[0].body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"]["required"] == ["score", "reason"]


def test_validate_mode_states_the_schema_sends_no_grammar_and_resamples_to_an_error_row(
    job: Any, emulator: OllamaEmulator
) -> None:
    # Without a format the emulator answers prose, as a model that ignores the instruction would.
    settings = openai_job(
        job, emulator, 2, output_schema="tests.test_openai_backend:Fit", structured_output="validate", max_attempts=3
    )
    frame, stats = run_one({**settings, "options": {"num_ctx": 2048, "num_predict": 64, "seed": 7}})
    assert stats.structured_output == "validate" and stats.requests == 6
    bodies = [r.body for r in chat_requests(emulator)]
    assert not any("response_format" in b for b in bodies)
    system = bodies[0]["messages"][0]
    assert system["role"] == "system" and '"score":{"maximum":10,"minimum":0,"type":"integer"}' in system["content"]
    # Each invalid answer is asked again with the next seed; after max_attempts an error row keeps the raw text.
    assert sorted(b["seed"] for b in bodies) == [7, 7, 8, 8, 9, 9]
    assert frame["status"].to_list() == ["error", "error"] and frame["attempts"].to_list() == [3, 3]
    assert frame["error_kind"].to_list() == ["invalid_output"] * 2 and all(frame["response"].to_list())


def test_auto_keeps_the_grammar_and_host_sampling_on_a_server_that_is_not_llama_cpp(
    job: Any, emulator: OllamaEmulator
) -> None:
    frame, stats = run_one(openai_job(job, emulator, 2, output_schema="tests.test_openai_backend:Fit"))
    assert frame["status"].to_list() == ["ok", "ok"]
    assert (stats.engine, stats.structured_output, stats.backend_sampling_requests) == (
        "openai-compatible",
        "grammar",
        0,
    )
    assert all("response_format" in r.body and "backend_sampling" not in r.body for r in chat_requests(emulator))


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        (Fault.busy(), "busy"),
        (Fault.http(429, "rate limited"), "busy"),
        (Fault.oom(), "oom"),
        (Fault.http(500, "boom"), "server_error"),
        (Fault.drop(), "dropped"),
    ],
)
def test_transient_failures_are_retried_by_the_runner_alone(
    job: Any, emulator: OllamaEmulator, fault: Fault, kind: str
) -> None:
    emulator.inject(fault, match="candidate 2 writes")
    frame, stats = run_one(openai_job(job, emulator, 4, oom_backoff_s=0))
    assert frame["status"].to_list() == ["ok"] * 4
    assert frame.filter(pl.col("row_index") == 2)["attempts"].item() == 2
    # One retry, the runner's: the openai client's own retries are off.
    assert stats.requests == 5 and len(chat_requests(emulator)) == 5


def test_a_context_length_400_is_a_clear_error_row_without_retry(job: Any, emulator: OllamaEmulator) -> None:
    vllm = "This model's maximum context length is 2048 tokens. However, you requested 4000 tokens."
    emulator.inject(Fault.http(400, vllm), match="candidate 1 writes")
    frame, _ = run_one(openai_job(job, emulator, 3))
    bad = frame.filter(pl.col("row_index") == 1).row(0, named=True)
    assert (bad["status"], bad["error_kind"], bad["attempts"]) == ("error", "context_length", 1)
    assert "maximum context length is 2048" in bad["error"] and "trim_field" in bad["error"]


def test_a_missing_model_names_host_model_and_what_is_served(job: Any, emulator: OllamaEmulator) -> None:
    settings = openai_job(job, emulator, 3, model="qwen3:8b")
    with pytest.raises(ChunkAborted, match=r"/v1 does not serve model 'qwen3:8b'; it serves: gemma3:12b") as info:
        run_one(settings)
    assert info.value.retryable is False and not chat_requests(emulator)


def test_a_refused_connection_is_an_outage(job: Any, emulator: OllamaEmulator) -> None:
    backend = make_backend(load_settings(None, openai_job(job, emulator, 1)))
    emulator.down()

    async def check() -> None:
        await backend.open()
        try:
            await backend.check()
        finally:
            await backend.close()

    with pytest.raises(BackendError) as info:
        asyncio.run(check())
    assert info.value.action == "unreachable" and emulator.host in str(info.value)


class _Tokenizer(BaseHTTPRequestHandler):
    """llama.cpp's /apply-template and /tokenize, answering the probe, then 503 (a server restarting)."""

    calls = 0

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls += 1
        if type(self).calls > 2:
            self.send_response(503)
            self.end_headers()
            return
        body = json.dumps({"prompt": "x"} if self.path == "/apply-template" else {"tokens": [1, 2, 3]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_token_count_that_fails_is_the_chunks_retryable_failure(offline_job: Any, tmp_path: Path) -> None:
    long = make_rows(2).with_columns(text=pl.Series(["short", "a long history " * 2000]))  # counted to trim
    settings = offline_job(
        2, chunk_size=2, trim_field="text", input_path=str(write_input(tmp_path / "l.parquet", long))
    )
    del settings["ollama_host"]
    with ThreadingHTTPServer(("127.0.0.1", 0), _Tokenizer) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        parsed = load_settings(
            None, {**settings, "backend": "openai", "base_url": f"http://127.0.0.1:{server.server_port}/v1"}
        )
        chunk = validate_input(parsed).chunks[0]
        fake = FakeBackend()
        with pytest.raises(ChunkAborted, match="counting prompt tokens at http://127.0.0.1") as info:
            run_chunk(parsed, chunk, fake)
        server.shutdown()
    assert info.value.retryable and fake.history == []


def test_settings_name_what_openai_needs(tmp_path: Path) -> None:
    from tasks.settings.model import SettingsError

    base = {"input_path": "x.csv", "prompt_template": "{text}", "output_dir": str(tmp_path), "backend": "openai"}
    with pytest.raises(SettingsError, match="needs base_url"):
        load_settings(None, {**base, "model": "m"})
    with pytest.raises(SettingsError, match=r"needs model: the id the server lists at GET <base_url>/models"):
        load_settings(None, {**base, "base_url": "http://127.0.0.1:8000/v1"})
    with pytest.raises(SettingsError, match="base_url is set but backend is 'ollama'"):
        load_settings(None, {**base, "backend": "ollama", "base_url": "http://127.0.0.1:8000/v1"})


# ---------------------------------------------------------------- a real llama.cpp server
def real_job(tmp_path: Path, server: Any, n: int, **extra: Any) -> dict[str, Any]:
    data = write_input(tmp_path / "in.parquet", make_rows(n))
    return {
        "name": "llama-server",
        "input_path": str(data),
        "prompt_template": "Role: {role}\nCandidate: {text}\nRate the fit from 0 to 10 with a short reason.",
        "system_prompt": "Answer only with JSON.",
        "backend": "openai",
        "base_url": server.url,
        "model": ALIAS,
        "output_schema": "tests.test_openai_backend:Fit",
        "options": {"num_ctx": 2048, "num_predict": 48, "seed": 1},
        "chunk_size": 8,
        "in_flight": 4,
        "max_attempts": 2,
        "chunk_retries": 0,
        "output_dir": str(tmp_path / "out"),
        "telemetry_interval_s": 0.5,
        **extra,
    }


def rows_on_disk(out: Path) -> dict[str, tuple[str, Any]]:
    """id -> (response, finished_at) of every row a killed run left: chunk files, parts and journals."""
    found: dict[str, tuple[str, Any]] = {}
    for path in sorted((out / "chunks").glob("chunk-*.parquet")):
        for row in pl.read_parquet(path).iter_rows(named=True):
            found[row["id"]] = (row["response"], row["finished_at"])
    for path in sorted((out / "chunks").glob("chunk-*.journal-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = ResultRow.model_validate_json(line)
            except ValueError:
                continue  # a line cut by the kill: that row is redone
            found[row.id] = (row.response or "", row.finished_at)
    return found


def assert_rows_valid(results: pl.DataFrame, n: int) -> None:
    assert sorted(results["id"].to_list()) == [f"r{i:05d}" for i in range(n)]  # every row exactly once
    for row in results.iter_rows(named=True):
        if row["status"] == "ok":
            parsed = Fit.model_validate_json(row["response"])  # the schema decides, not the pipeline
            assert (row["score"], row["reason"]) == (parsed.score, parsed.reason)
            assert row["completion_tokens"] > 0 and row["prompt_tokens"] > 0
            # The server's own timings, within the wait the client saw.
            assert 0 < row["prompt_eval_ms"] + row["eval_ms"] <= row["latency_ms"], row
        else:  # the grammar does not enforce integer bounds: a 270M model can break them, kept raw
            assert row["error_kind"] == "invalid_output" and row["response"]


@pytest.mark.usefixtures("prefect_server")
def test_real_server_flow_every_row_once_with_valid_structured_output(tmp_path: Path, llama_server: Any) -> None:
    manifest = batch_inference(overrides=real_job(tmp_path, llama_server, 16))
    results = pl.read_parquet(tmp_path / "out" / "results.parquet")
    assert manifest["complete"] and results.height == 16
    assert_rows_valid(results, 16)
    assert results.filter(pl.col("status") == "ok").height >= 8  # constrained decoding mostly holds
    report = (tmp_path / "out" / "report.md").read_text()
    assert "backend `openai`" in report and "server llama.cpp (4 parallel slot(s))" in report
    assert "This ETA is for this openai server on this machine (no GPU seen)" in report
    ok = results.filter(pl.col("status") == "ok")
    share = (ok["prompt_eval_ms"] + ok["eval_ms"]).sum() / ok["latency_ms"].sum()
    assert f"| the server's own prompt + generation time | {share:.0%} of the requests' time (" in report, report


def test_real_server_says_its_slots_and_context(tmp_path: Path, llama_server: Any) -> None:
    backend = make_backend(load_settings(None, real_job(tmp_path, llama_server, 1)))

    async def describe() -> Any:
        await backend.open()
        try:
            await backend.check()
            return await backend.describe()
        finally:
            await backend.close()

    info = asyncio.run(describe())
    assert (info.engine, info.parallel_slots, info.context_per_slot) == ("llama.cpp", 4, 2048)


def test_real_server_missing_model_fails_before_any_row(tmp_path: Path, llama_server: Any) -> None:
    settings = load_settings(None, real_job(tmp_path, llama_server, 2, model="gemma3:12b"))
    with pytest.raises(
        ChunkAborted, match=rf"{llama_server.url} does not serve model 'gemma3:12b'; it serves: {ALIAS}"
    ):
        run_chunk(settings, validate_input(settings).chunks[0], make_backend(settings))
    assert finished_rows(settings.output_dir, validate_input(settings).chunks[0]) == set()


def test_real_server_context_overflow_is_an_error_row_and_trimming_uses_its_tokenizer(
    tmp_path: Path, llama_server: Any
) -> None:
    frame = make_rows(2).with_columns(
        text=pl.Series(["short history", "a very long candidate history with many jobs " * 400])
    )
    job = real_job(tmp_path, llama_server, 2, output_schema=None, options={"num_ctx": 2048, "num_predict": 16})
    job["input_path"] = str(write_input(tmp_path / "long.parquet", frame))
    rows, _ = run_one(job)
    long = rows.filter(pl.col("row_index") == 1).row(0, named=True)
    assert (long["status"], long["error_kind"], long["attempts"]) == ("error", "context_length", 1)
    assert "exceeds the available context size" in long["error"]

    trimmed, _ = run_one({**job, "trim_field": "text", "output_dir": str(tmp_path / "trimmed")})
    assert trimmed["status"].to_list() == ["ok", "ok"] and trimmed["trimmed"].to_list() == [False, True]
    # Cut to the budget with the server's own token count: the prompt fills most of num_ctx - num_predict.
    assert 1500 < trimmed["prompt_tokens"][1] <= 2048 - 16


def test_real_server_auto_in_flight_picks_a_level_from_the_measured_curve(tmp_path: Path, llama_server: Any) -> None:
    # Cold at 1 (a quarter of 4), then 2 and 4: a level is judged on 8 answers.
    job = real_job(tmp_path, llama_server, 64, chunk_size=64, in_flight="auto", max_in_flight=4, output_schema=None)
    job["options"] = {"num_ctx": 2048, "num_predict": 16, "seed": 1}
    frame, stats = run_one(job)
    assert frame.height == 64 and frame["status"].to_list() == ["ok"] * 64
    curve = stats.calibration
    assert curve is not None and 1 in curve and all(v > 0 for v in curve.values())
    best = max(curve.values())
    assert stats.in_flight == min(n for n, v in curve.items() if v >= 0.97 * best)  # the rule, on real numbers


def slot_params(server: Any) -> list[dict[str, Any]]:
    """What each llama-server slot's last request asked for (GET /slots)."""
    return [slot["params"] for slot in httpx.get(f"{server.root}/slots", timeout=10).json() if "params" in slot]


def test_real_server_backend_sampling_gives_the_same_greedy_answers(tmp_path: Path, llama_server: Any) -> None:
    # Free text, greedy: the CPU build runs the sampler chain as ggml ops on the CPU backend instead of
    # llama.cpp's host samplers; the tokens must not change. One in flight: with 4, two runs with the same
    # settings already differ now and then (a near-tie decided differently in another batch's arithmetic).
    options = {"num_ctx": 2048, "num_predict": 24}
    job = real_job(tmp_path, llama_server, 8, output_schema=None, options=options, in_flight=1)
    off, off_stats = run_one({**job, "backend_sampling": "off", "output_dir": str(tmp_path / "off")})
    assert not any(p["backend_sampling"] for p in slot_params(llama_server))
    on, on_stats = run_one({**job, "backend_sampling": "on", "output_dir": str(tmp_path / "on")})
    assert any(p["backend_sampling"] for p in slot_params(llama_server))  # the server took the field
    assert (off_stats.backend_sampling_requests, on_stats.backend_sampling_requests) == (0, 8)
    assert on["status"].to_list() == ["ok"] * 8 and on["completion_tokens"].min() > 0
    assert on["response"].to_list() == off["response"].to_list()


def test_real_server_auto_tries_validation_with_backend_sampling_then_takes_the_grammar(
    tmp_path: Path, llama_server: Any
) -> None:
    # Gemma 3 270M is a base model: told the schema, it answers prose. auto starts without the grammar (and
    # with backend sampling), sees two invalid answers, and sends everything after with the grammar.
    frame, stats = run_one(real_job(tmp_path, llama_server, 8, max_attempts=3, backend_sampling="auto"))
    assert (stats.engine, stats.structured_output) == ("llama.cpp", "grammar")
    assert any(
        "0 of 2 answers without a grammar matched the schema: the grammar from now on" in e for e in stats.events
    )
    # Only the probe went without the grammar: the 4 sent at once, and the retry of the first miss when it
    # came back before the second.
    assert 2 <= stats.backend_sampling_requests <= 5 < stats.requests
    assert not any(p["backend_sampling"] for p in slot_params(llama_server))  # the last requests: grammar
    assert_rows_valid(frame, 8)
    assert frame.filter(pl.col("status") == "ok").height >= 4  # the grammar's retries recover the probed rows


def test_real_server_grammar_never_goes_with_backend_sampling(tmp_path: Path, llama_server: Any) -> None:
    # llama.cpp samples a grammar on the host whatever the request asks: 'on' with a grammar does not ask.
    job = real_job(tmp_path, llama_server, 4, structured_output="grammar", backend_sampling="on")
    frame, stats = run_one(job)
    assert (stats.structured_output, stats.backend_sampling_requests) == ("grammar", 0)
    assert not any(p["backend_sampling"] for p in slot_params(llama_server))
    assert_rows_valid(frame, 4)


@pytest.mark.usefixtures("prefect_server")
def test_real_server_sigkill_mid_run_resumes_without_sending_a_finished_row_again(
    tmp_path: Path, llama_server: Any
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.settings import PREFECT_API_URL

    limit = f"gpu-llama-kill-{os.getpid()}"
    job = real_job(tmp_path, llama_server, 24, gpu_limit=limit, checkpoint_every_s=3600, checkpoint_rows=100_000)
    job["options"] = {"num_ctx": 2048, "num_predict": 32, "seed": 1}
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    parsed = load_settings(job_file)
    chunks = validate_input(parsed).chunks
    log = tmp_path / "flow.log"
    proc = start_cli(job_file, log, {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())})
    deadline = time.monotonic() + 240
    while sum(len(finished_rows(parsed.output_dir, c)) for c in chunks) < 10:
        assert proc.poll() is None, f"the flow ended before it could be killed:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = rows_on_disk(parsed.output_dir)
    kept = sum(len(finished_rows(parsed.output_dir, c)) for c in chunks)
    assert 10 <= kept < 24
    with get_client(sync_client=True) as client:  # free the killed run's slot at once
        client.update_global_concurrency_limit(limit, GlobalConcurrencyLimitUpdate(active_slots=0))
    batch_inference(job_file=str(job_file))
    results = pl.read_parquet(parsed.output_dir / "results.parquet")
    assert_rows_valid(results, 24)
    # Rows finished before the kill come back untouched: same answer, same finish time, not re-sent.
    after = {r["id"]: (r["response"], r["finished_at"]) for r in results.iter_rows(named=True)}
    assert len(before) >= 10 and all(after[i] == kept_row for i, kept_row in before.items())
