"""Which requests carry a grammar, the schema in the prompt, or llama.cpp's backend sampling (pure)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tasks.analysis.report import sampling_line
from tasks.inference.modes import AutoProbe, decide, engine_of, needs_describe, schema_instruction
from tasks.schema import ChunkStats
from tasks.settings.load import load_settings

SCHEMA: dict[str, Any] = {
    "title": "Fit",
    "type": "object",
    "properties": {
        "score": {"title": "Score", "type": "integer", "minimum": 0, "maximum": 10},
        "title": {"title": "Title", "type": "string"},  # a property named "title" is kept
    },
    "required": ["score", "title"],
}


def settings(backend: str = "openai", **extra: Any) -> Any:
    base: dict[str, Any] = {"input_path": "in.parquet", "prompt_template": "{text}", "output_dir": "out"}
    if backend == "openai":
        base |= {"base_url": "http://127.0.0.1:8080/v1", "model": "m"}
    return load_settings(None, {**base, "backend": backend, **extra})


@pytest.mark.parametrize(
    ("structured", "sampling", "engine", "want"),
    [
        # auto: a llama.cpp server validates and samples on the GPU; every other engine keeps the grammar.
        ("auto", "auto", "llama.cpp", ("validate", True)),
        ("auto", "auto", "openai-compatible", ("grammar", False)),
        # A grammar and backend sampling never go together, not even when backend sampling is 'on'.
        ("grammar", "auto", "llama.cpp", ("grammar", False)),
        ("grammar", "on", "llama.cpp", ("grammar", False)),
        ("validate", "on", "openai-compatible", ("validate", True)),
        ("validate", "off", "llama.cpp", ("validate", False)),
    ],
)
def test_the_decision_table(structured: str, sampling: str, engine: str, want: tuple[str, bool]) -> None:
    modes = decide(settings(structured_output=structured, backend_sampling=sampling), engine, SCHEMA)
    assert (modes.structured, modes.backend_sampling) == want
    assert modes.engine_schema == (SCHEMA if want[0] == "grammar" else None)
    assert ("backend_sampling" in modes.options({"seed": 1})) is want[1]


def test_without_an_output_schema_auto_samples_on_a_llama_cpp_server_only() -> None:
    auto = settings(backend_sampling="auto")
    assert (decide(auto, "llama.cpp", None).structured, decide(auto, "llama.cpp", None).backend_sampling) == (
        None,
        True,
    )
    assert decide(auto, "openai-compatible", None).backend_sampling is False
    assert decide(settings(), "llama.cpp", None).backend_sampling is False  # off unless asked (see config)
    # The embedded model and Ollama are known without asking; only an OpenAI-compatible server is asked.
    assert engine_of(settings("llamacpp"), None) == "llama.cpp (embedded)"
    assert decide(settings("llamacpp"), engine_of(settings("llamacpp"), None), SCHEMA).structured == "grammar"
    assert engine_of(settings("ollama"), None) == "ollama"
    assert needs_describe(settings()) and not needs_describe(settings("ollama"))
    assert not needs_describe(settings(structured_output="grammar", backend_sampling="off"))


def test_validate_states_the_schema_compactly_in_the_one_system_message() -> None:
    modes = decide(settings(structured_output="validate"), "llama.cpp", SCHEMA)
    user = {"role": "user", "content": "Rate: x"}
    alone = modes.messages([user])
    assert [m["role"] for m in alone] == ["system", "user"] and alone[1] == user
    text = alone[0]["content"]
    assert text.startswith("Answer with one JSON object and nothing else.")
    shown = json.loads(text.split("JSON Schema: ", 1)[1])
    # Generated titles go (tokens that say nothing); the property called "title" stays.
    assert shown == {
        "type": "object",
        "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 10}, "title": {"type": "string"}},
        "required": ["score", "title"],
    }
    assert " " not in text.split("JSON Schema: ", 1)[1]  # compact: no spaces between tokens
    # A job's own system prompt keeps its place and gets the instruction appended: Gemma's template refuses a
    # second system message.
    merged = modes.messages([{"role": "system", "content": "You screen candidates."}, user])
    assert [m["role"] for m in merged] == ["system", "user"]
    assert merged[0]["content"] == f"You screen candidates.\n\n{schema_instruction(SCHEMA)}"
    # Grammar mode leaves the messages as they are.
    grammar = decide(settings(structured_output="grammar"), "llama.cpp", SCHEMA)
    assert grammar.messages([user]) == [user]


def test_auto_probe_keeps_validation_only_while_answers_match() -> None:
    keeps = AutoProbe()
    assert [keeps.answered(v) for v in [True] * 6 + [False, True]] == [None] * 7 + [True]
    # A model that ignores the instruction is found out at its second invalid answer, not the eighth.
    ignores = AutoProbe()
    assert [ignores.answered(False), ignores.answered(False)] == [None, False]
    late = AutoProbe()
    assert [late.answered(v) for v in [True] * 5 + [False, False]] == [None] * 6 + [False]
    # Switching to the grammar turns backend sampling off with it.
    modes = decide(settings(), "llama.cpp", SCHEMA)
    assert (modes.with_grammar().structured, modes.with_grammar().backend_sampling) == ("grammar", False)


@pytest.mark.parametrize(
    ("extra", "mode", "sampled", "want"),
    [
        ({}, None, 0, "Requests: no llama.cpp backend sampling (backend_sampling: off)."),
        (
            {"backend_sampling": "on"},
            "validate",
            40,
            "Requests: the output schema was stated in the prompt, every answer validated (no grammar); "
            "llama.cpp backend sampling (GPU-side) on 40 of 40 requests "
            "(structured_output: auto, backend_sampling: on).",
        ),
        (
            {"backend_sampling": "auto"},
            "grammar",
            0,
            "Requests: the output schema went to the engine as a grammar; "
            "no llama.cpp backend sampling (requests carried a grammar) "
            "(structured_output: auto, backend_sampling: auto).",
        ),
    ],
)
def test_the_report_names_each_request_mode_and_setting_once(
    extra: dict[str, Any], mode: str | None, sampled: int, want: str
) -> None:
    stats = ChunkStats(
        index=0,
        rows=40,
        sent_rows=40,
        requests=40,
        engine="llama.cpp",
        structured_output=mode,
        backend_sampling_requests=sampled,
    )
    assert sampling_line(settings(**extra), [stats]) == want
