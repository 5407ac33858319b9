"""How a chunk's requests carry the output schema (a grammar, or the prompt) and whether llama.cpp
samples on the GPU: settings plus what the engine is, decided once per chunk. Pure: no I/O."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Literal

from tasks.settings.model import JobSettings

# ServerInfo.engine of a server whose /props answered (tasks/inference/backends/openai.py).
LLAMA_CPP_SERVER = "llama.cpp"

# 'auto' on a llama.cpp server starts without the grammar and lets the model's first answers decide: at
# least PROBE_VALID of the first PROBE_ANSWERS must match the schema, else the rest of the job (retries of
# the rows that failed included) goes with the grammar. At 7 of 8 a valid answer costs ~1.15 requests,
# under what the grammar costs: llama.cpp samples it on the CPU, ~2x the time per token on its CPU server
# and 3.4x on the embedded model here (the README's Structured output has the figures). Gemma 3 270M, a
# base model, answered prose without a grammar (0 of 15 valid, 45 requests) and 15 of 15 with one, so it
# gets the grammar after 2 wasted requests.
PROBE_ANSWERS = 8
PROBE_VALID = 7


@dataclass
class AutoProbe:
    """The first answers of an 'auto' chunk sent without a grammar, counted."""

    answers: int = 0
    valid: int = 0

    def answered(self, valid: bool) -> bool | None:
        """Count one answer: False as soon as PROBE_VALID of PROBE_ANSWERS can no longer be reached (a
        model that ignores the instruction costs 2 requests, not 8), True once it is; None: not yet."""
        self.answers += 1
        self.valid += valid
        if self.answers - self.valid > PROBE_ANSWERS - PROBE_VALID:
            return False
        return True if self.answers >= PROBE_ANSWERS else None


@dataclass(frozen=True)
class RequestModes:
    """What every request of a chunk sends; `why` says it in words for the report."""

    structured: Literal["grammar", "validate"] | None  # None: the job has no output schema
    backend_sampling: bool
    schema: dict[str, Any] | None = None  # the output model's JSON Schema

    @property
    def engine_schema(self) -> dict[str, Any] | None:
        """The schema the engine turns into a grammar, or None when the answer is only validated."""
        return self.schema if self.structured == "grammar" else None

    def messages(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The row's messages; in validate mode the schema is stated in the system message."""
        if self.structured != "validate" or self.schema is None:
            return messages
        instruction = schema_instruction(self.schema)
        # One system message: Gemma's chat template folds the system message into the first user turn
        # and refuses a conversation whose roles do not alternate, so a second one would fail.
        if messages and messages[0]["role"] == "system":
            first = {**messages[0], "content": f"{messages[0]['content']}\n\n{instruction}"}
            return [first, *messages[1:]]
        return [{"role": "system", "content": instruction}, *messages]

    def with_grammar(self) -> RequestModes:
        """The same chunk with the grammar, hence without backend sampling (never together)."""
        return replace(self, structured="grammar", backend_sampling=False)

    def options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The request's options; `backend_sampling` rides along for the OpenAI backend to send."""
        return {**options, "backend_sampling": True} if self.backend_sampling else options


def schema_instruction(schema: dict[str, Any]) -> str:
    """The system message of validate mode: one JSON object matching the schema, shown compactly."""
    compact = json.dumps(_without_titles(schema), separators=(",", ":"), ensure_ascii=False)
    return f"Answer with one JSON object and nothing else. It must match this JSON Schema: {compact}"


def _without_titles(node: Any) -> Any:
    """The schema without pydantic's generated `title`s (tokens that tell the model nothing); a
    property that is itself named `title` stays."""
    if isinstance(node, list):
        return [_without_titles(item) for item in node]
    if not isinstance(node, dict):
        return node
    kept: dict[str, Any] = {}
    for key, value in node.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            kept[key] = {name: _without_titles(sub) for name, sub in value.items()}
        else:
            kept[key] = _without_titles(value)
    return kept


def engine_of(settings: JobSettings, described: str | None) -> str:
    """The engine's name: the embedded model and Ollama are known from the settings; an
    OpenAI-compatible server says what it is (`described`, from Backend.describe)."""
    if settings.backend == "llamacpp":
        return "llama.cpp (embedded)"
    if settings.backend == "ollama":
        return "ollama"
    return described or "openai-compatible"


def needs_describe(settings: JobSettings) -> bool:
    """Only an OpenAI-compatible server's engine is unknown until it is asked (GET /props)."""
    return settings.backend == "openai" and "auto" in (settings.structured_output, settings.backend_sampling)


def decide(settings: JobSettings, engine: str, schema: dict[str, Any] | None) -> RequestModes:
    """The chunk's request modes from the settings and the engine."""
    structured: Literal["grammar", "validate"] | None = None
    if schema is not None:
        if settings.structured_output == "auto":
            structured = "validate" if engine == LLAMA_CPP_SERVER else "grammar"
        else:
            structured = settings.structured_output
    # A grammar is sampled on the host anyway: llama.cpp's sampler turns backend sampling off for it
    # (common/sampling.cpp). Its server still installs the backend sampler for the slot when asked
    # (server-context.cpp), and common_sampler_sample asserts no grammar for a token sampled there; a
    # CPU-only llama-server answered such a request as without it, but nothing is gained: never ask.
    grammar = structured == "grammar"
    if settings.backend_sampling == "on":
        sampling = not grammar
    elif settings.backend_sampling == "auto":
        sampling = engine == LLAMA_CPP_SERVER and not grammar
    else:
        sampling = False
    return RequestModes(structured=structured, backend_sampling=sampling, schema=schema)
