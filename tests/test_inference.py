"""The chunk runner end to end: the Ollama emulator through the real ollama client (policy details: test_chunk.py)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import polars as pl
import pytest

from harness.ollama_emulator import Fault, OllamaEmulator, answer_for
from tasks.inference.backends import BackendError, make_backend
from tasks.inference.backends.ollama import OllamaBackend
from tasks.inference.backends.ollama import classify as ollama_classify
from tasks.inference.backends.openai import OpenAIBackend
from tasks.inference.calibrate import best_in_flight
from tasks.inference.runner import ChunkAborted, run_chunk
from tasks.plan.dataset import ChunkSpec, validate_input
from tasks.schema import ChunkStats
from tasks.settings.load import load_settings
from tasks.settings.model import JobSettings, SettingsError
from tasks.storage.journal import chunk_path


def run(settings: JobSettings, chunk: ChunkSpec) -> ChunkStats:
    return run_chunk(settings, chunk, make_backend(settings))


def run_one_chunk(job: Any, n: int = 12, **overrides: Any) -> tuple[Any, pl.DataFrame, Any]:
    settings = load_settings(None, job(n, chunk_size=n, **overrides))
    chunk = validate_input(settings).chunks[0]
    stats = run(settings, chunk)
    return settings, pl.read_parquet(chunk_path(settings.output_dir, chunk)), stats


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Role: data engineer\nCandidate: candidate {i} writes Python"}]


def sent_per_row(emulator: OllamaEmulator) -> Counter[str]:
    return Counter(r.prompt for r in emulator.requests if r.path == "/api/chat" and r.status == 200)


def test_every_row_once_with_n_in_flight(job: Any, emulator: OllamaEmulator) -> None:
    emulator.latency_s = 0.05
    _, frame, stats = run_one_chunk(job, 16, in_flight=4)
    assert frame["row_index"].to_list() == list(range(16))
    assert frame["status"].unique().to_list() == ["ok"]
    assert frame["response"].to_list() == [answer_for(messages(i)) for i in range(16)]
    assert emulator.peak_in_flight == 4  # the slots were kept busy
    assert set(sent_per_row(emulator).values()) == {1}
    assert stats.ok == 16 and stats.requests == 16 and stats.latency_p50_ms >= 50
    assert frame["prompt_tokens"].min() > 0 and frame["eval_ms"].min() > 0  # Ollama's own timings kept


@pytest.mark.parametrize(
    "fault",
    [Fault.runner_crash(), Fault.drop(), Fault.busy(), Fault.oom(), Fault.http(500, "boom"), Fault.http(429, "slow")],
)
def test_transient_faults_are_retried(job: Any, emulator: OllamaEmulator, fault: Fault) -> None:
    emulator.inject(fault, match="candidate 3 writes")
    _, frame, stats = run_one_chunk(job, 6, oom_backoff_s=0)  # no wait: the retry is what is tested
    assert frame["status"].to_list() == ["ok"] * 6
    assert frame.filter(pl.col("row_index") == 3)["attempts"].item() == 2
    retried = [r.body["options"] for r in emulator.requests if r.prompt and "candidate 3 writes" in r.prompt]
    assert retried[0] == retried[1]  # a transport retry asks exactly the same again
    assert frame.filter(pl.col("row_index") != 3)["attempts"].to_list() == [1] * 5
    assert stats.requests == 7


def test_bad_request_is_an_error_row_without_retry(job: Any, emulator: OllamaEmulator) -> None:
    emulator.inject(Fault.bad_request("invalid format"), times=None, match="candidate 2 writes")
    _, frame, _ = run_one_chunk(job, 4)
    bad = frame.filter(pl.col("row_index") == 2).row(0, named=True)
    assert (bad["status"], bad["error_kind"], bad["attempts"]) == ("error", "bad_request", 1)
    assert "HTTP 400: invalid format" in bad["error"]
    assert frame.filter(pl.col("status") == "ok").height == 3


def test_a_proxy_page_at_the_chunk_check_is_an_outage_not_a_crash(job: Any, emulator: OllamaEmulator) -> None:
    emulator.show_fault = Fault.html()
    with pytest.raises(ChunkAborted, match=r"malformed answer \(") as info:
        run_one_chunk(job, 2, outage_budget_s=0)
    assert info.value.retryable


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("llama runner process has terminated: error loading model: unable to allocate CUDA0 buffer", "oom"),
        ("llama runner process has terminated: cudaMalloc failed: out of memory", "oom"),
        ("llama runner process has terminated: signal: killed", "oom"),
        ("llama runner process has terminated: GGML_ASSERT(ggml_nelements(a) == ne0*ne1) failed", "runner_crash"),
        ("llama runner process has terminated: exit status 2", "runner_crash"),
    ],
)
def test_a_terminated_runner_is_out_of_memory_only_when_it_says_so(text: str, kind: str) -> None:
    err = ollama_classify(ollama.ResponseError(text, 500), "gemma3:12b", "http://h:11434")
    assert err.kind == kind, err


def test_a_row_that_always_crashes_the_runner_ends_as_an_error_row(job: Any, emulator: OllamaEmulator) -> None:
    # Ollama wraps every runner death in "llama runner process has terminated: <why>"; only a <why> about
    # memory is out of memory. Taken for one, this row would stop the chunk as "persistent out of memory".
    crash = "llama runner process has terminated: GGML_ASSERT(ggml_nelements(a) == ne0*ne1) failed"
    emulator.inject(Fault.http(500, crash), times=None, match="candidate 2 writes")
    _, frame, _ = run_one_chunk(job, 6, in_flight=1, max_attempts=2)
    bad = frame.filter(pl.col("row_index") == 2).row(0, named=True)
    assert (bad["status"], bad["error_kind"], bad["attempts"]) == ("error", "runner_crash", 2), bad
    assert frame.filter(pl.col("status") == "ok").height == 5


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A host that drops packets: a listening socket whose accept queue is full and never drained, so a
    new connection's handshake hangs (what a stopped VM or a firewall's DROP does)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        fillers = [socket.socket() for _ in range(4)]
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(server.getsockname())
        try:
            yield f"http://127.0.0.1:{server.getsockname()[1]}"
        finally:
            for filler in fillers:
                filler.close()


@pytest.mark.parametrize("kind", ["ollama", "openai"])
def test_a_host_that_drops_packets_is_unreachable_within_the_request_deadline(blackhole: str, kind: str) -> None:
    # Under the runner's own deadline (request_timeout_s) the client's connect gives up first: an
    # outage, waited out within outage_budget_s, not a timeout charged to the row.
    backend = (
        OllamaBackend(blackhole, "gemma3:12b", 1.0, "5m") if kind == "ollama" else OpenAIBackend(blackhole, "m", 1.0)
    )
    options = {"num_predict": 8, "temperature": 0.0, "seed": 0}

    async def ask() -> None:
        await backend.open()
        try:
            await asyncio.wait_for(backend.chat(messages(0), options=options, schema=None), 1.0)
        finally:
            await backend.close()

    with pytest.raises(BackendError) as info:
        asyncio.run(ask())
    assert info.value.action == "unreachable", info.value


def test_structured_output_validated_typed_and_retried(job: Any, emulator: OllamaEmulator, tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {
            "score": {"type": "integer", "minimum": 0, "maximum": 10},
            "verdict": {"enum": ["hire", "pass"]},
        },
        "required": ["score", "verdict"],
    }
    (tmp_path / "s.json").write_text(json.dumps(schema))
    emulator.inject(Fault.invalid_json(), times=1, match="candidate 1 writes")
    emulator.inject(Fault.invalid_json(), times=None, match="candidate 2 writes")
    _, frame, _ = run_one_chunk(job, 4, output_schema=str(tmp_path / "s.json"), max_attempts=3)
    assert frame.schema["score"] == pl.Int64 and frame.schema["verdict"] == pl.String
    ok = frame.filter(pl.col("status") == "ok")
    assert ok["row_index"].to_list() == [0, 1, 3]
    for record in ok.iter_rows(named=True):
        expected = json.loads(answer_for(messages(record["row_index"]), schema))
        assert (record["score"], record["verdict"]) == (expected["score"], expected["verdict"])
    assert ok.filter(pl.col("row_index") == 1)["attempts"].item() == 2
    bad = frame.filter(pl.col("row_index") == 2).row(0, named=True)
    assert (bad["error_kind"], bad["attempts"], bad["score"]) == ("invalid_output", 3, None)
    assert bad["response"] and "does not match the schema" in bad["error"]  # the raw text is kept
    sent = [r.body["options"] for r in emulator.requests if r.prompt and "candidate 2 writes" in r.prompt]
    # Each resample asks with another seed and leaves greedy decoding, which would repeat the answer.
    assert [(o["seed"], o["temperature"]) for o in sent] == [(0, 0.0), (1, 0.7), (2, 0.7)]


def test_truncation_and_cut_answers_are_flagged(job: Any, emulator: OllamaEmulator) -> None:
    frame = pl.DataFrame({"id": ["short", "long"], "role": ["x", "x"], "text": ["hi", "word " * 2000]})
    settings = load_settings(None, job(frame=frame, chunk_size=2, options={"num_ctx": 512, "num_predict": 2}))
    run(settings, validate_input(settings).chunks[0])
    rows = pl.read_parquet(chunk_path(settings.output_dir, validate_input(settings).chunks[0]))
    assert rows["truncated"].to_list() == [False, True]
    assert rows["incomplete"].to_list() == [True, True] and rows["done_reason"].to_list() == ["length", "length"]
    sent = [r.body["options"] for r in emulator.requests if r.path == "/api/chat"]
    assert all(o["num_predict"] == 2 and o["num_ctx"] == 512 for o in sent)  # identical options, always num_predict


def test_empty_field_row_is_never_sent(job: Any, emulator: OllamaEmulator) -> None:
    frame = pl.DataFrame({"id": ["a", "b"], "role": ["x", "x"], "text": ["fine", ""]})
    settings = load_settings(None, job(frame=frame, chunk_size=2))
    run(settings, validate_input(settings).chunks[0])
    rows = pl.read_parquet(chunk_path(settings.output_dir, validate_input(settings).chunks[0]))
    assert rows["status"].to_list() == ["ok", "error"]
    assert rows.row(1, named=True)["error_kind"] == "empty_field" and rows.row(1, named=True)["attempts"] == 0
    assert len([r for r in emulator.requests if r.path == "/api/chat"]) == 1


def test_missing_model_stops_before_any_row(job: Any, emulator: OllamaEmulator) -> None:
    with pytest.raises(ChunkAborted, match=r"model 'gemma3:27b' not found .*ollama pull gemma3:27b") as info:
        run_one_chunk(job, 3, model="gemma3:27b")
    assert info.value.retryable is False
    assert not [r for r in emulator.requests if r.path == "/api/chat"]


def test_huge_rows_are_sent_whole_and_flagged_when_cut(job: Any, emulator: OllamaEmulator) -> None:
    huge = "x" * 3_000_000  # a 3 MB field
    frame = pl.DataFrame({"id": ["big", "small"], "role": ["x", "x"], "text": [huge, "tiny"]})
    settings = load_settings(None, job(frame=frame, chunk_size=2, options={"num_ctx": 8192, "num_predict": 16}))
    run(settings, validate_input(settings).chunks[0])
    rows = pl.read_parquet(chunk_path(settings.output_dir, validate_input(settings).chunks[0]))
    assert rows["status"].to_list() == ["ok", "ok"] and rows["truncated"].to_list() == [True, False]
    big = next(r for r in emulator.requests if r.path == "/api/chat" and r.prompt and "xxxx" in r.prompt)
    assert len(big.body["messages"][0]["content"]) > 3_000_000  # sent as it was; Ollama cut it


def test_trimmed_prompt_is_not_cut_by_the_server(job: Any, emulator: OllamaEmulator) -> None:
    frame = pl.DataFrame({"id": ["long"], "role": ["x"], "text": ["word " * 5000]})
    settings = load_settings(
        None, job(frame=frame, chunk_size=1, trim_field="text", options={"num_ctx": 1024, "num_predict": 64})
    )
    run(settings, validate_input(settings).chunks[0])
    row = pl.read_parquet(chunk_path(settings.output_dir, validate_input(settings).chunks[0])).row(0, named=True)
    assert (row["status"], row["trimmed"], row["truncated"]) == ("ok", True, False)
    assert row["prompt_tokens"] < 1024 - 64


def test_auto_in_flight_finds_the_backends_parallel_slots(job: Any) -> None:
    # Four slots at 10 ms a token: 400 tokens/s at most. Throughput doubles up to 4 in flight,
    # then only hides the client's own round trip (a queued request starts the moment a slot frees).
    with OllamaEmulator(parallel=4, per_token_s=0.01) as emu:
        settings = load_settings(
            None, job(160, chunk_size=160, in_flight="auto", max_in_flight=16, ollama_host=emu.host)
        )
        stats = run(settings, validate_input(settings).chunks[0])
    curve = stats.calibration
    # The controller is tested exactly in test_auto_in_flight.py; here, that it runs against a server:
    # cold at 4 (a quarter of 16), then up to 8 and 16, which also hide the client's round trip.
    assert curve is not None and {4, 8, 16} <= set(curve), curve
    assert stats.in_flight in (4, 8, 16) and stats.in_flight == best_in_flight(curve)
    assert emu.peak_in_flight == 4 and stats.ok == 160
    assert any("auto in-flight" in e for e in stats.events)


def test_row_values_never_become_paths(job: Any, emulator: OllamaEmulator, tmp_path: Path) -> None:
    frame = pl.DataFrame({"id": ["../../escape", "/etc/passwd"], "role": ["x", "x"], "text": ["../../../x", "~/y"]})
    settings = load_settings(None, job(frame=frame, chunk_size=2))
    run(settings, validate_input(settings).chunks[0])
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    # names come from chunk indices only
    snapshot = validate_input(settings).snapshot.relative_to(tmp_path).as_posix()  # named by the input's digest
    assert written == {
        "input.parquet",
        snapshot,
        "out/chunks/chunk-00000.parquet",
        "out/chunks/finished.jsonl",
        "out/.locks/chunk-00000.lock",
    }
    rows = pl.read_parquet(tmp_path / "out" / "chunks" / "chunk-00000.parquet")
    assert rows["id"].to_list() == ["../../escape", "/etc/passwd"]


def test_persistent_out_of_memory_lowers_num_ctx_when_allowed(job: Any) -> None:
    # A card that holds the weights plus 4 slots of 4k context, not of 8k (Ollama allocates num_ctx x parallel).
    with OllamaEmulator(models=["gemma3:12b"], parallel=4, vram_bytes=12 * 10**9) as emu:
        overrides = {"options": {"num_ctx": 8192, "num_predict": 64}, "oom_num_ctx_floor": 2048}
        settings, frame, stats = run_one_chunk(
            job, 12, in_flight=4, oom_backoff_s=0.01, ollama_host=emu.host, **overrides
        )
    assert frame["status"].to_list() == ["ok"] * 12  # no row was charged for the GPU's state
    assert stats.num_ctx == 4096 and stats.in_flight == 4
    assert any("num_ctx 8192 -> 4096" in e for e in stats.events)
    # Half-way (3 in a row at 1 in flight) the model was unloaded, Ollama's way: generate, no prompt, keep_alive 0.
    unloads = [r for r in emu.requests if r.path == "/api/generate" and r.body.get("keep_alive") == 0]
    assert len(unloads) == 1 and unloads[0].status == 200 and not unloads[0].body.get("prompt")
    assert any("unloading the model (keep_alive 0)" in e for e in stats.events)
    sent = [r.body["options"]["num_ctx"] for r in emu.requests if r.path == "/api/chat"]
    assert sent[-12:] == [4096] * 12 and set(sent[:-12]) == {8192}  # answered at 4096; all 8192 ones failed
    with pytest.raises(SettingsError, match="oom_num_ctx_floor 8192 is above options.num_ctx 4096"):
        load_settings(None, job(4, oom_num_ctx_floor=8192, options={"num_ctx": 4096}))
