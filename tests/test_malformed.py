"""A malformed answer is a row problem, never a run problem (issue 23).

An HTTP 200 that is no answer (empty, a proxy's HTML page, an error object, no message), an
exception no backend classifies, and text UTF-8 cannot hold (a lone surrogate) each end as one
row's outcome while the rest of the chunk completes. Ollama and OpenAI-compatible servers are the
emulator over real HTTP through the real clients; the embedded engine gets a Llama-like stand-in
(llama-cpp-python is third-party); the runner's own handling is on the fake backend.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from flows.batch_inference import batch_inference
from harness.ollama_emulator import PROXY_PAGE, Fault, OllamaEmulator, answer_for
from tasks.inference.backends import make_backend
from tasks.inference.backends.fake import FakeBackend
from tasks.inference.backends.llamacpp import LlamaCppBackend
from tasks.inference.backends.protocol import RAW_KEPT, Reply, bad_response
from tasks.plan.dataset import ChunkSpec
from tasks.schema import ChunkStats, ResultRow
from tasks.settings.load import load_settings
from tasks.storage.journal import ChunkWriter, read_journal
from tests.test_chunk import prompt, run, settings_for
from tests.test_openai_backend import openai_job, run_one

ROW = "candidate 1 writes"  # the row the faults target
# Each malformed 200 and a piece of the body its error row must keep, natively and on /v1.
NATIVE = [
    (Fault.empty_body(), ""),
    (Fault.html(), PROXY_PAGE),
    (Fault.error_200("boom"), '{"error": "boom"}'),
    (Fault.no_message(), '"done_reason": "stop"'),
    (Fault.wrong_types(), '"done_reason": 1'),
]
OPENAI = [
    (Fault.empty_body(), ""),
    (Fault.html(), PROXY_PAGE),
    (Fault.error_200("boom"), '"message": "boom"'),
    (Fault.no_message(), '"finish_reason": "stop"'),
    (Fault.wrong_types(), '"finish_reason": 1'),
]
IDS = [fault.name for fault, _ in NATIVE]


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt(i)}]


def ollama_chunk(job: Any, n: int, **overrides: Any) -> tuple[pl.DataFrame, ChunkStats]:
    settings = load_settings(None, job(n, chunk_size=n, **overrides))
    return run(settings, make_backend(settings))


def row(frame: pl.DataFrame, index: int) -> dict[str, Any]:
    return frame.filter(pl.col("row_index") == index).row(0, named=True)


# ---------------------------------------------------------------- the runner, on the fake backend
def test_an_always_malformed_row_is_a_bad_response_error_row_and_the_chunk_completes(offline_job: Any) -> None:
    fake = FakeBackend()
    fake.always(bad_response(PROXY_PAGE.encode(), ValueError("Expecting value")), match=ROW)
    frame, stats = run(settings_for(offline_job, 3, max_attempts=3), fake)
    bad = row(frame, 1)
    assert (bad["status"], bad["error_kind"], bad["attempts"]) == ("error", "bad_response", 3)
    assert bad["response"] == PROXY_PAGE and bad["error"] == "malformed answer (ValueError: Expecting value)"
    assert frame["status"].to_list() == ["ok", "error", "ok"] and (stats.ok, stats.errors, stats.requests) == (2, 1, 5)


def test_a_malformed_first_answer_then_a_good_one_is_an_ok_row(offline_job: Any) -> None:
    fake = FakeBackend()
    fake.enqueue(bad_response(b"", ValueError("Expecting value")), match=ROW)
    frame, _ = run(settings_for(offline_job, 3), fake)
    assert frame["status"].to_list() == ["ok"] * 3 and frame["attempts"].to_list() == [1, 2, 1]
    assert row(frame, 1)["response"] == f"answer to: {prompt(1)}"


def test_an_exception_no_backend_classified_is_retried_then_an_error_row(offline_job: Any) -> None:
    fake = FakeBackend()
    fake.always(RuntimeError("llama_decode returned -1"), match=ROW)
    fake.enqueue(KeyError("choices"), match="candidate 2 writes")
    frame, stats = run(settings_for(offline_job, 4, max_attempts=2), fake)
    bad = row(frame, 1)
    assert (bad["status"], bad["error_kind"], bad["attempts"]) == ("error", "unexpected", 2)
    assert bad["error"] == "RuntimeError: llama_decode returned -1" and bad["response"] is None
    assert row(frame, 2)["status"] == "ok" and row(frame, 2)["attempts"] == 2
    assert [r.outcome for r in fake.requests_for(ROW)] == ["RuntimeError", "RuntimeError"]
    assert (stats.ok, stats.errors) == (3, 1)


def test_an_answer_its_columns_cannot_hold_is_an_error_row_and_the_chunk_completes(
    offline_job: Any, tmp_path: Path
) -> None:
    # JSON Schema's integer has no bound; the Int64 column has. Journaled as ok, this row could never
    # become Parquet, and every rerun would fail on the journal before sending anything.
    schema = tmp_path / "years.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"years": {"type": "integer"}}}))
    fake = FakeBackend()
    fake.always(Reply('{"years": 99999999999999999999}', "stop", 5, 9), match=ROW)
    fake.always(Reply('{"years": 7}', "stop", 5, 4))
    frame, stats = run(settings_for(offline_job, 3, max_attempts=2, output_schema=str(schema)), fake)
    bad = row(frame, 1)
    assert (bad["status"], bad["error_kind"], bad["attempts"]) == ("error", "invalid_output", 2)
    assert bad["error"].startswith("answer does not fit its columns: ") and "99999999999999999999" in bad["response"]
    assert frame["years"].to_list() == [7, None, 7] and (stats.ok, stats.errors) == (2, 1)


def test_a_malformed_body_is_kept_bounded() -> None:
    err = bad_response(b"x" * (RAW_KEPT + 10), ValueError("Expecting value"))
    assert err.raw == "x" * RAW_KEPT + "... (10 more characters)" and err.action == "retry"
    assert bad_response(b"<p>\xff</p>", ValueError("no")).raw == "<p>\\xff</p>"  # bytes that are not UTF-8


def test_an_ok_answer_utf8_cannot_hold_is_stored_escaped(offline_job: Any) -> None:
    fake = FakeBackend()
    fake.enqueue(Reply("half an emoji \ud83d", "stop", 3, 4), match=ROW)
    frame, _ = run(settings_for(offline_job, 3), fake)
    assert row(frame, 1)["status"] == "ok" and row(frame, 1)["response"] == "half an emoji \\ud83d"


def test_text_utf8_cannot_hold_is_escaped_in_the_journal_and_parquet(tmp_path: Path) -> None:
    writer = ChunkWriter(tmp_path, ChunkSpec(index=0, offset=0, length=1), {"reason": pl.String}, 10, 60.0)
    writer.add(
        ResultRow(
            row_index=0,
            id="r0",
            chunk=0,
            status="error",
            error_kind="invalid_output",
            error="HTTP 500: \udcff",
            attempts=1,
            response='{"reason": "\ud83d"}',
            parsed={"reason": "\ud83d", "nested": ["\udc00"]},
            model="m",
            finished_at=datetime.now(UTC),
        )
    )
    (journal,) = (tmp_path / "chunks").glob("*.journal-*.jsonl")
    (back,) = read_journal(journal).rows
    assert (back.error, back.response) == ("HTTP 500: \\udcff", '{"reason": "\\ud83d"}')
    assert back.parsed == {"reason": "\\ud83d", "nested": ["\\udc00"]}
    assert writer.finish()["reason"].to_list() == ["\\ud83d"]


# ---------------------------------------------------------------- Ollama: the real `ollama` client over HTTP
@pytest.mark.parametrize(("fault", "kept"), NATIVE, ids=IDS)
def test_ollama_malformed_answers_end_as_bad_response_rows(
    job: Any, emulator: OllamaEmulator, fault: Fault, kept: str
) -> None:
    emulator.inject(fault, times=None, match=ROW)
    frame, stats = ollama_chunk(job, 4, max_attempts=2)
    bad = row(frame, 1)
    assert (bad["status"], bad["error_kind"], bad["attempts"]) == ("error", "bad_response", 2)
    assert kept in bad["response"] and bad["error"].startswith("malformed answer (")
    assert frame["status"].to_list() == ["ok", "error", "ok", "ok"] and stats.requests == 5


@pytest.mark.parametrize(("fault", "kept"), NATIVE, ids=IDS)
def test_ollama_a_malformed_first_answer_is_retried(
    job: Any, emulator: OllamaEmulator, fault: Fault, kept: str
) -> None:
    emulator.inject(fault, match=ROW)
    frame, _ = ollama_chunk(job, 3)
    assert frame["status"].to_list() == ["ok"] * 3 and frame["attempts"].to_list() == [1, 2, 1]
    assert row(frame, 1)["response"] == answer_for(messages(1))


def test_ollama_an_answer_with_a_lone_surrogate_is_kept_escaped(job: Any, emulator: OllamaEmulator) -> None:
    emulator.inject(Fault.lone_surrogate(), match=ROW)
    frame, _ = ollama_chunk(job, 3)
    assert frame["status"].to_list() == ["ok"] * 3 and frame["attempts"].to_list() == [1, 1, 1]
    assert row(frame, 1)["response"] == answer_for(messages(1)) + "\\ud83d"


# ---------------------------------------------------------------- OpenAI-compatible: the real `openai` client
@pytest.mark.parametrize(("fault", "kept"), OPENAI, ids=IDS)
def test_openai_malformed_answers_end_as_bad_response_rows(
    job: Any, emulator: OllamaEmulator, fault: Fault, kept: str
) -> None:
    emulator.inject(fault, times=None, match=ROW)
    frame, stats = run_one(openai_job(job, emulator, 4, max_attempts=2))
    bad = row(frame, 1)
    assert (bad["status"], bad["error_kind"], bad["attempts"]) == ("error", "bad_response", 2)
    assert kept in bad["response"] and bad["error"].startswith("malformed answer (")
    assert frame["status"].to_list() == ["ok", "error", "ok", "ok"] and stats.requests == 5


@pytest.mark.parametrize(("fault", "kept"), OPENAI, ids=IDS)
def test_openai_a_malformed_first_answer_is_retried(
    job: Any, emulator: OllamaEmulator, fault: Fault, kept: str
) -> None:
    emulator.inject(fault, match=ROW)
    frame, _ = run_one(openai_job(job, emulator, 3))
    assert frame["status"].to_list() == ["ok"] * 3 and frame["attempts"].to_list() == [1, 2, 1]
    assert row(frame, 1)["response"] == answer_for(messages(1))


def test_openai_an_answer_with_a_lone_surrogate_is_kept_escaped(job: Any, emulator: OllamaEmulator) -> None:
    emulator.inject(Fault.lone_surrogate(), match=ROW)
    frame, _ = run_one(openai_job(job, emulator, 3))
    assert frame["status"].to_list() == ["ok"] * 3
    assert row(frame, 1)["response"] == answer_for(messages(1)) + "\\ud83d"


# ---------------------------------------------------------------- embedded llama.cpp, with a Llama-like stand-in
def completion(content: Any) -> dict[str, Any]:
    """What llama_cpp.Llama.create_chat_completion returns (the OpenAI shape, as a dict)."""
    message = {"role": "assistant", "content": content}
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": usage,
    }


class ScriptedLlama:
    """Stands in for llama_cpp.Llama: answers each prompt from `script` (a completion dict, or an
    exception to raise), in order; prompts not scripted get a good completion."""

    def __init__(self, script: dict[str, list[Any]]) -> None:
        self.script = script

    def create_chat_completion(self, *, messages: list[dict[str, str]], **_: Any) -> Any:
        text = messages[-1]["content"]
        outcomes = next((o for match, o in self.script.items() if match in text), [])
        outcome = (outcomes.pop(0) if len(outcomes) > 1 else outcomes[0]) if outcomes else completion(f"fine: {text}")
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


class StandInLlamaCpp(LlamaCppBackend):
    """The embedded backend with the stand-in instead of a GGUF: only `open` (the model load) differs."""

    def __init__(self, llm: ScriptedLlama) -> None:
        super().__init__(model_path=None, model="stand-in", num_ctx=512)
        self.stand_in = llm

    async def open(self) -> None:
        self._llm = self.stand_in


def test_embedded_malformed_completions_and_unknown_exceptions_are_row_outcomes(offline_job: Any) -> None:
    llm = ScriptedLlama(
        {
            ROW: [{"choices": []}],  # always: no choice at all
            "candidate 2 writes": [completion(["parts"]), completion("second try")],  # content that is not text
            "candidate 3 writes": [RuntimeError("llama_decode returned -3")],  # always
            "candidate 4 writes": [completion("half an emoji \ud83d")],
        }
    )
    frame, stats = run(settings_for(offline_job, 5, max_attempts=2), StandInLlamaCpp(llm))
    assert frame["status"].to_list() == ["ok", "error", "ok", "error", "ok"]
    bad = row(frame, 1)
    assert (bad["error_kind"], bad["attempts"], bad["response"]) == ("bad_response", 2, "{'choices': []}")
    assert (row(frame, 2)["attempts"], row(frame, 2)["response"]) == (2, "second try")
    crashed = row(frame, 3)
    assert (crashed["error_kind"], crashed["attempts"]) == ("unexpected", 2)
    assert crashed["error"] == "RuntimeError: llama_decode returned -3"
    assert row(frame, 4)["response"] == "half an emoji \\ud83d" and stats.requests == 8


# ---------------------------------------------------------------- the whole flow
@pytest.mark.usefixtures("prefect_server")
def test_the_run_completes_with_a_malformed_row_and_a_rerun_sends_nothing_again(
    job: Any, emulator: OllamaEmulator
) -> None:
    emulator.inject(Fault.html(), times=None, match=ROW)
    emulator.inject(Fault.lone_surrogate(), match="candidate 9 writes")
    settings = job(12, max_attempts=2)
    state = batch_inference(overrides=settings, return_state=True)
    manifest = state.result()
    assert state.is_completed() and manifest["complete"]
    assert (manifest["rows_ok"], manifest["rows_error"]) == (11, 1)
    results = pl.read_parquet(Path(settings["output_dir"]) / "results.parquet")
    bad = row(results, 1)
    assert (bad["error_kind"], bad["attempts"], bad["response"]) == ("bad_response", 2, PROXY_PAGE)
    assert row(results, 9)["response"] == answer_for(messages(9)) + "\\ud83d"
    on_disk = json.loads((Path(settings["output_dir"]) / "manifest.json").read_text())
    assert on_disk["complete"]
    emulator.reset_stats()
    assert batch_inference(overrides=settings)["complete"]  # the rerun finds every row on disk
    assert emulator.chat_prompts() == []
