"""One small Protocol for "an engine that answers a chat request", and the errors it may raise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

# What the chunk runner does with each failure (docs/how-it-works.md, its failure table):
#   retry        - transient: dropped connection, timeout, runner crash, server error, malformed answer
#   backoff      - the server asked us to slow down (503 queue full)
#   oom          - out of memory: back off, lower in-flight, retry
#   unreachable  - server down: wait within the outage budget, then fail the chunk
#   fatal_row    - this request can never succeed (400): error row, no retry
#   fatal_job    - nothing can succeed (model missing): stop before/at the first row
Action = Literal["retry", "backoff", "oom", "unreachable", "fatal_row", "fatal_job"]


class BackendError(Exception):
    """A failed request, classified so the runner can pick its action; `raw`: what came back, if
    anything, for the error row's `response`."""

    def __init__(self, kind: str, action: Action, message: str, raw: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.action = action
        self.raw = raw


def connect_timeout_s(request_timeout_s: float) -> float:
    """A connect that hangs (a host that drops packets) ends well before the request's own deadline, so
    it is told as unreachable (waited out within the outage budget), not as a timeout charged to the row."""
    return min(10.0, request_timeout_s / 2)


RAW_KEPT = 2000  # characters of a malformed answer an error row keeps: enough to tell a proxy's page


def bad_response(body: bytes | str, why: BaseException) -> BackendError:
    """An HTTP 200 (or an engine's return) that is no answer: empty, a proxy's HTML page, an error
    object, an answer without its message. Retried like a failed request: a proxy's hiccup passes,
    and a row that always gets one ends as an error row that keeps the start of the body."""
    text = body.decode("utf-8", "backslashreplace") if isinstance(body, bytes) else body
    kept = text if len(text) <= RAW_KEPT else f"{text[:RAW_KEPT]}... ({len(text) - RAW_KEPT} more characters)"
    reason = " ".join(str(why).split())[:300]  # pydantic's message runs over several lines
    return BackendError("bad_response", "retry", f"malformed answer ({type(why).__name__}: {reason})", raw=kept)


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


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What an engine says of itself, for the report and the verdict; None where it does not say."""

    engine: str
    parallel_slots: int | None = None  # sequences the server decodes together (llama.cpp --parallel)
    context_per_slot: int | None = None  # tokens of KV cache each of those sequences gets
    build: str | None = None
    geometry: dict[str, Any] | None = None  # the model's KV-cache shape (model_geometry), where the engine says


def model_geometry(metadata: dict[str, Any]) -> dict[str, Any] | None:
    """The KV-cache shape from GGUF-style metadata (a GGUF header, Ollama's /api/show model_info):
    architecture, layers, KV heads, head dimension, sliding window; None when a key is missing."""
    arch = metadata.get("general.architecture")
    try:
        layers = int(metadata[f"{arch}.block_count"])
        kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv") or metadata[f"{arch}.attention.head_count"])
        head_dim = int(
            metadata.get(f"{arch}.attention.key_length")
            or int(metadata[f"{arch}.embedding_length"]) // int(metadata[f"{arch}.attention.head_count"])
        )
    except (KeyError, TypeError, ValueError):
        return None
    window = metadata.get(f"{arch}.attention.sliding_window")
    return {
        "arch": arch,
        "layers": layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "sliding_window": int(window) if window else None,
    }


class Backend(Protocol):
    """An inference engine. Constructors do no I/O; `open` connects or loads."""

    async def open(self) -> None: ...

    async def check(self) -> None:
        """Raise BackendError (unreachable / model missing) before any row is sent."""

    async def describe(self) -> ServerInfo:
        """What the server says of its slots and context, after `check`."""

    async def chat(
        self, messages: list[dict[str, str]], *, options: dict[str, Any], schema: dict[str, Any] | None
    ) -> Reply: ...

    async def unload(self) -> None:
        """Free the GPU memory the model holds; the next request loads it again (no-op if in-process)."""

    async def close(self) -> None: ...


class _Closable(Protocol):
    async def close(self) -> None: ...


ClientT = TypeVar("ClientT", bound=_Closable)


class HttpBackend(Generic[ClientT]):
    """The client an HTTP backend holds: made by `open` inside the event loop that uses it (an async
    connection pool cannot move between loops), closed by `close`."""

    _client: ClientT | None = None

    def _connect(self) -> ClientT:
        raise NotImplementedError

    async def open(self) -> None:
        self._client = self._connect()

    @property
    def client(self) -> ClientT:
        if self._client is None:
            raise RuntimeError(f"{type(self).__name__}.open() was not called")
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
