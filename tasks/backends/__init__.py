"""One small Protocol for "an engine that answers a chat request", and the errors it may raise."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from tasks.config import JobSettings

# What the chunk runner does with each failure (the README's failure table):
#   retry        - transient: dropped connection, timeout, runner crash, server error
#   backoff      - the server asked us to slow down (503 queue full)
#   oom          - out of memory: back off, lower in-flight, retry
#   unreachable  - server down: wait within the outage budget, then fail the chunk
#   fatal_row    - this request can never succeed (400): error row, no retry
#   fatal_job    - nothing can succeed (model missing): stop before/at the first row
Action = Literal["retry", "backoff", "oom", "unreachable", "fatal_row", "fatal_job"]


class BackendError(Exception):
    """A failed request, classified so the runner can pick its action."""

    def __init__(self, kind: str, action: Action, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.action = action


@dataclass(frozen=True, slots=True)
class Reply:
    """What a backend returned for one request; durations in milliseconds."""

    content: str
    done_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    load_ms: float | None = None
    prompt_eval_ms: float | None = None
    eval_ms: float | None = None
    total_ms: float | None = None


class Backend(Protocol):
    """An inference engine. Constructors do no I/O; `open` connects or loads."""

    name: str

    async def open(self) -> None: ...

    async def check(self) -> None:
        """Raise BackendError (unreachable / model missing) before any row is sent."""

    async def chat(
        self, messages: list[dict[str, str]], *, options: dict[str, Any], schema: dict[str, Any] | None
    ) -> Reply: ...

    async def unload(self) -> None:
        """Free the GPU memory the model holds; the next request loads it again (no-op if in-process)."""

    async def close(self) -> None: ...


def make_backend(settings: JobSettings) -> Backend:
    """The backend the settings name; imports lazily so each engine's package is optional."""
    if settings.backend == "ollama":
        from tasks.backends.ollama import OllamaBackend

        return OllamaBackend(
            host=settings.ollama_base_url,
            model=settings.model,
            timeout_s=settings.request_timeout_s,
            keep_alive=settings.keep_alive,
        )
    from tasks.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend(model_path=settings.model_path, model=settings.model, num_ctx=settings.options.num_ctx)


def token_counter(settings: JobSettings) -> Callable[[str], int] | None:
    """The engine's own tokenizer when trimming needs one and the engine offers it.

    Ollama's API has no tokenize endpoint, so for it trimming uses a conservative estimate.
    """
    if settings.trim_field is None or settings.backend != "llamacpp":
        return None
    from tasks.backends.llamacpp import token_counter as llama_counter

    return llama_counter(settings.model_path, settings.options.num_ctx)
