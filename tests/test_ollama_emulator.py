"""The Ollama emulator, driven through the real `ollama` client (never patched)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Literal

import httpx
import jsonschema
import ollama
import pytest
from pydantic import BaseModel, Field

from harness.ollama_emulator import (
    BUSY,
    CRASH,
    OOM,
    Fault,
    OllamaEmulator,
    answer_for,
    completion_for,
)
from harness.processes import wait_for

MODEL = "gemma3:12b"


def msgs(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You rate reviews."}, {"role": "user", "content": text}]


@pytest.fixture
def emu() -> Iterator[OllamaEmulator]:
    with OllamaEmulator([MODEL]) as e:
        yield e


_clients: list[ollama.Client] = []


def connect(host: str, timeout: float = 5) -> ollama.Client:
    """A client closed after the test: an open one's socket warns at garbage collection."""
    _clients.append(client := ollama.Client(host=host, timeout=timeout))
    return client


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


@pytest.fixture
def client(emu: OllamaEmulator) -> ollama.Client:
    return connect(emu.host)


class Nested(BaseModel):
    tag: str
    weight: float = Field(ge=0, le=1)


class Review(BaseModel):
    score: int = Field(ge=1, le=5)
    sentiment: Literal["pos", "neg", "neutral"]
    spam: bool
    confidence: float = Field(gt=0, lt=1)
    summary: str = Field(max_length=6)
    note: str | None
    tags: list[Nested]


# ---------------------------------------------------------------- answers
def test_chat_answer_equals_answer_for(client: ollama.Client) -> None:
    resp = client.chat(MODEL, msgs("great product, would buy again"), options={"num_predict": 256})
    expected = completion_for(msgs("great product, would buy again"), None, {"num_predict": 256})
    assert resp.message.content == answer_for(msgs("great product, would buy again"), None)
    assert resp.message.content == expected.content
    assert resp.message.content.endswith(": great product, would buy again")
    assert resp.message.role == "assistant" and resp.done and resp.done_reason == "stop"
    assert resp.model == MODEL
    assert (resp.prompt_eval_count, resp.eval_count) == (expected.prompt_eval_count, expected.eval_count)
    assert resp.total_duration and resp.eval_duration and resp.prompt_eval_duration


def test_answers_are_deterministic_and_prompt_specific() -> None:
    assert answer_for(msgs("a"), None) == answer_for(msgs("a"), None)
    assert answer_for(msgs("a"), None) != answer_for(msgs("b"), None)
    assert answer_for("x" * 100, None).endswith(": " + "x" * 40)


def test_generate_and_stream(client: ollama.Client) -> None:
    resp = client.generate(MODEL, "why is the sky blue?", stream=False)
    assert resp.response == answer_for("why is the sky blue?", None)
    parts = list(client.chat(MODEL, msgs("stream me"), stream=True))
    assert "".join(p.message.content for p in parts) == answer_for(msgs("stream me"), None)
    assert len(parts) > 2 and parts[-1].done and parts[-1].done_reason == "stop"
    assert not any(p.done for p in parts[:-1]) and parts[-1].eval_count


def test_schema_format_yields_valid_json(client: ollama.Client) -> None:
    schema = Review.model_json_schema()
    for i in range(20):  # many prompts: every hash-derived value must stay within the schema
        resp = client.chat(MODEL, msgs(f"review {i}"), format=schema, options={"num_predict": 512})
        assert resp.message.content == answer_for(msgs(f"review {i}"), schema)
        jsonschema.validate(json.loads(resp.message.content), schema)
        Review.model_validate_json(resp.message.content)
    resp = client.chat(MODEL, msgs("plain json"), format="json")
    assert json.loads(resp.message.content).keys() == {"answer"}


def test_num_predict_cut_gives_length(client: ollama.Client) -> None:
    schema = Review.model_json_schema()
    resp = client.chat(MODEL, msgs("cut me"), format=schema, options={"num_predict": 5})
    assert resp.done_reason == "length" and resp.eval_count == 5
    assert resp.message.content == completion_for(msgs("cut me"), schema, {"num_predict": 5}).content
    with pytest.raises(ValueError):
        json.loads(resp.message.content)


def test_overlong_prompt_is_silently_truncated(client: ollama.Client) -> None:
    resp = client.chat(MODEL, msgs("y" * 10_000), options={"num_ctx": 512, "num_predict": 64})
    assert resp.done and resp.prompt_eval_count == 512
    assert completion_for(msgs("y" * 10_000), None, {"num_ctx": 512}).truncated


def test_think_is_rejected(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as exc:
        client.chat(MODEL, msgs("hi"), think=True)
    assert exc.value.status_code == 400 and "does not support thinking" in exc.value.error


# ---------------------------------------------------------------- metadata endpoints
def test_metadata_endpoints(emu: OllamaEmulator, client: ollama.Client) -> None:
    root = httpx.get(emu.host + "/")
    assert root.status_code == 200 and root.text == "Ollama is running"
    assert httpx.get(emu.host + "/api/version").json() == {"version": "0.12.6"}
    listed = client.list().models
    assert [m.model for m in listed] == [MODEL] and listed[0].details.family == "gemma3"
    assert listed[0].size and listed[0].digest
    shown = client.show(MODEL)
    assert shown.details.quantization_level == "Q4_K_M" and shown.capabilities == ["completion"]
    with pytest.raises(ollama.ResponseError) as exc:
        client.show("nope:1b")
    assert exc.value.status_code == 404 and exc.value.error == "model 'nope:1b' not found"
    assert httpx.get(emu.host + "/api/nothing").status_code == 404


def test_unknown_model_is_404(client: ollama.Client) -> None:
    for call in (lambda: client.chat("llama9:70b", msgs("x")), lambda: client.generate("llama9:70b", "x")):
        with pytest.raises(ollama.ResponseError) as exc:
            call()
        assert exc.value.status_code == 404 and exc.value.error == "model 'llama9:70b' not found"


def test_ps_lists_used_models_and_cpu_spill() -> None:
    with OllamaEmulator([MODEL], spill_fraction=0.25, parallel=2) as emu:
        client = connect(emu.host, timeout=5)
        assert client.ps().models == []
        client.chat(MODEL, msgs("hi"), options={"num_ctx": 8192}, keep_alive=-1)
        (m,) = client.ps().models
        assert m.model == MODEL and m.context_length == 8192 and m.details.family == "gemma3"
        assert m.size_vram == int(m.size * 0.75) and m.expires_at.year > 2100
        raw = httpx.get(emu.host + "/api/ps").json()["models"][0]
        assert set(raw) == {"name", "model", "size", "size_vram", "digest", "details", "expires_at", "context_length"}


def test_load_unload_and_reload_churn() -> None:
    with OllamaEmulator([MODEL], load_s=0.05) as emu:
        client = connect(emu.host, timeout=5)
        assert client.generate(MODEL).done_reason == "load"
        assert [m.model for m in client.ps().models] == [MODEL]
        assert client.generate(MODEL, keep_alive=0).done_reason == "unload"
        assert client.ps().models == []
        first = client.chat(MODEL, msgs("a"), options={"num_ctx": 4096})
        warm = client.chat(MODEL, msgs("b"), options={"num_ctx": 4096})
        churn = client.chat(MODEL, msgs("c"), options={"num_ctx": 8192})  # option change reloads
        assert first.load_duration >= 50_000_000 and churn.load_duration >= 50_000_000
        assert warm.load_duration < 10_000_000
        assert client.chat(MODEL, []).done_reason == "load"


# ---------------------------------------------------------------- faults
@pytest.mark.parametrize(
    ("fault", "status", "text"),
    [
        (Fault.oom(), 500, OOM),
        (Fault.runner_crash(), 500, CRASH),
        (Fault.busy(), 503, BUSY),
        (Fault.bad_request("invalid format"), 400, "invalid format"),
        (Fault.not_found(MODEL), 404, f"model '{MODEL}' not found"),
        (Fault.http(502, "bad gateway"), 502, "bad gateway"),
    ],
)
def test_http_faults_surface_as_response_error(
    emu: OllamaEmulator, client: ollama.Client, fault: Fault, status: int, text: str
) -> None:
    emu.inject(fault)
    with pytest.raises(ollama.ResponseError) as exc:
        client.chat(MODEL, msgs("boom"))
    assert (exc.value.status_code, exc.value.error) == (status, text)
    assert client.chat(MODEL, msgs("boom")).done  # times=1: the next request is served
    first, second = emu.requests
    assert (first.status, first.fault, second.status, second.fault) == (status, fault.name, 200, None)


def test_drop_is_remote_protocol_error(emu: OllamaEmulator, client: ollama.Client) -> None:
    emu.inject(Fault.drop())
    with pytest.raises(httpx.RemoteProtocolError):
        client.chat(MODEL, msgs("dropped"))
    assert client.chat(MODEL, msgs("after")).done
    assert [(r.status, r.fault) for r in emu.requests] == [(None, "drop"), (200, None)]


def test_hang_is_read_timeout_and_holds_no_slot(emu: OllamaEmulator) -> None:
    emu.inject(Fault.hang())
    with pytest.raises(httpx.ReadTimeout):
        connect(emu.host, timeout=0.5).chat(MODEL, msgs("hung"))
    assert connect(emu.host, timeout=2).chat(MODEL, msgs("next")).done
    # The emulator notices the client left and ends the hung handler: soon, not at a set time.
    wait_for(lambda: emu.requests[0].t_end is not None, 5, "the hung handler to end", interval_s=0.01)
    hung = emu.requests[0]
    assert hung.fault == "hang" and hung.status is None and hung.t_end is not None


def test_stop_and_release_end_hangs_promptly() -> None:
    emu = OllamaEmulator([MODEL]).start()
    emu.inject(Fault.hang(), times=2)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            connect(emu.host, timeout=10).chat(MODEL, msgs("hung"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    # Both requests hang (their fault taken, so release_hangs() reaches them) before the release.
    wait_for(lambda: [r.fault for r in emu.requests] == ["hang", "hang"], 5, "two hung requests", interval_s=0.01)
    emu.release_hangs()
    threads[0].join(2)
    t0 = time.monotonic()
    emu.stop()
    for t in threads:
        t.join(2)
        assert not t.is_alive()
    assert time.monotonic() - t0 < 1.5
    assert len(errors) == 2 and all(isinstance(e, (httpx.RemoteProtocolError, httpx.ReadError)) for e in errors)


def test_invalid_json_fault(emu: OllamaEmulator, client: ollama.Client) -> None:
    emu.inject(Fault.invalid_json())
    resp = client.chat(MODEL, msgs("x"), format=Review.model_json_schema())
    assert resp.done_reason == "stop" and resp.message.content.startswith('{"score": "not a number"')
    with pytest.raises(ValueError):
        Review.model_validate_json(resp.message.content)


@pytest.mark.parametrize("fault", [Fault.empty_body(), Fault.html(), Fault.error_200(), Fault.no_message()])
def test_malformed_answers_are_a_200_the_client_cannot_parse(
    emu: OllamaEmulator, client: ollama.Client, fault: Fault
) -> None:
    emu.inject(fault)
    with pytest.raises(ValueError):  # json's JSONDecodeError or pydantic's ValidationError for ChatResponse
        client.chat(MODEL, msgs("x"))
    assert client.chat(MODEL, msgs("x")).done
    assert [(r.status, r.fault) for r in emu.requests] == [(200, fault.name), (200, None)]


def test_lone_surrogate_fault(emu: OllamaEmulator, client: ollama.Client) -> None:
    emu.inject(Fault.lone_surrogate())
    assert client.chat(MODEL, msgs("x")).message.content == answer_for(msgs("x")) + "\ud83d"


def test_match_targeted_faults_are_fifo(emu: OllamaEmulator, client: ollama.Client) -> None:
    emu.inject(Fault.oom(), times=2, match="row-7")
    emu.inject(Fault.runner_crash(), match="row-7")
    outcomes = []
    for i in [1, 7, 2, 7, 7, 7]:
        try:
            client.chat(MODEL, msgs(f"row-{i}"))
            outcomes.append("ok")
        except ollama.ResponseError as exc:
            outcomes.append("oom" if exc.error == OOM else "crash")
    assert outcomes == ["ok", "oom", "ok", "oom", "crash", "ok"]
    assert emu.chat_prompts() == [r.prompt for r in emu.requests if r.status == 200]
    assert len(emu.chat_prompts()) == 3 and all("row-7" not in p for p in emu.chat_prompts()[:2])


def test_unlimited_fault_and_clear(emu: OllamaEmulator, client: ollama.Client) -> None:
    emu.inject(Fault.oom(), times=None)
    for _ in range(3):
        with pytest.raises(ollama.ResponseError):
            client.chat(MODEL, msgs("x"))
    emu.clear_faults()
    assert client.chat(MODEL, msgs("x")).done


def _fault_sequence(seed: int) -> list[str | None]:
    with OllamaEmulator([MODEL]) as emu:
        emu.random_faults(0.5, seed=seed, kinds=[Fault.oom(), Fault.busy(), Fault.invalid_json()])
        client = connect(emu.host, timeout=5)
        for i in range(30):
            with contextlib.suppress(ollama.ResponseError):
                client.chat(MODEL, msgs(f"soak {i}"))
        return [r.fault for r in emu.requests]


def test_random_faults_are_seeded() -> None:
    seq = _fault_sequence(7)
    assert seq == _fault_sequence(7) and seq != _fault_sequence(8)
    assert 5 <= sum(f is not None for f in seq) <= 25 and {"oom", "busy", "invalid_json"} <= set(seq)


# ---------------------------------------------------------------- capacity
def test_parallel_slots_cap_in_flight() -> None:
    with OllamaEmulator([MODEL], parallel=2, latency_s=0.2) as emu:

        async def run() -> list[ollama.ChatResponse]:
            async with ollama.AsyncClient(host=emu.host, timeout=5) as client:
                return await asyncio.gather(*(client.chat(MODEL, msgs(f"p{i}")) for i in range(6)))

        t0 = time.monotonic()
        responses = asyncio.run(run())
        elapsed = time.monotonic() - t0
        assert [r.message.content for r in responses] == [answer_for(msgs(f"p{i}"), None) for i in range(6)]
        assert emu.peak_in_flight == 2 and emu.peak_pending == 6
        assert 0.6 <= elapsed < 1.5  # three waves of two
        assert emu.in_flight == 0 and emu.pending == 0
        # queued requests report their wait in total_duration, as Ollama does
        assert max(r.total_duration for r in responses) >= 0.55e9


def test_per_token_time_is_service_time() -> None:
    with OllamaEmulator([MODEL], per_token_s=0.01) as emu:
        t0 = time.monotonic()
        resp = connect(emu.host, timeout=5).chat(MODEL, msgs("tokens"))
        assert time.monotonic() - t0 >= resp.eval_count * 0.01
        assert resp.eval_duration == pytest.approx(resp.eval_count * 0.01e9)


def test_max_queue_gives_503() -> None:
    with OllamaEmulator([MODEL], parallel=1, max_queue=1, latency_s=0.3) as emu:

        async def one(client: ollama.AsyncClient, i: int) -> str:
            try:
                await client.chat(MODEL, msgs(f"q{i}"))
                return "ok"
            except ollama.ResponseError as exc:
                assert exc.error == BUSY
                return str(exc.status_code)

        async def run() -> list[str]:
            async with ollama.AsyncClient(host=emu.host, timeout=5) as client:
                return await asyncio.gather(*(one(client, i) for i in range(4)))

        assert sorted(asyncio.run(run())) == ["503", "503", "ok", "ok"]
        assert emu.peak_pending == 2


# ---------------------------------------------------------------- lifecycle
def test_down_and_up_on_same_port() -> None:
    with OllamaEmulator([MODEL], latency_s=0.5) as emu:
        port = emu.port
        client = connect(emu.host, timeout=5)
        client.generate(MODEL)
        errors: list[BaseException] = []

        def in_flight() -> None:
            try:
                client.chat(MODEL, msgs("cut"))
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=in_flight)
        t.start()
        wait_for(lambda: emu.in_flight == 1, 5, "the chat to be in flight", interval_s=0.01)  # then cut it
        emu.down()
        t.join(2)
        assert errors and isinstance(errors[0], (httpx.RemoteProtocolError, httpx.ReadError))
        with pytest.raises(ConnectionError):
            connect(emu.host, timeout=1).chat(MODEL, msgs("refused"))
        emu.up()
        assert emu.port == port
        assert client.ps().models == []  # a restarted Ollama has nothing loaded
        assert client.chat(MODEL, msgs("back")).message.content == answer_for(msgs("back"), None)


def test_records() -> None:
    with OllamaEmulator([MODEL]) as emu:
        client = connect(emu.host, timeout=5)
        client.chat(MODEL, msgs("one"), options={"temperature": 0, "seed": 1})
        client.list()
        (chat, tags) = emu.requests
        assert (chat.method, chat.path, chat.status, tags.path) == ("POST", "/api/chat", 200, "/api/tags")
        assert chat.body["options"] == {"temperature": 0, "seed": 1} and chat.body["stream"] is False
        assert chat.t_start <= chat.t_end and "one" in chat.prompt and tags.prompt is None
        emu.reset_stats()
        assert emu.requests == [] and emu.chat_prompts() == []
