"""Ollama through the official `ollama.AsyncClient` (native /api/chat, non-streaming)."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import httpx
import ollama

from tasks.inference.backends.protocol import (
    Action,
    BackendError,
    HttpBackend,
    Reply,
    ServerInfo,
    bad_response,
    connect_timeout_s,
    model_geometry,
)

# Texts Ollama puts in a 500 when the GPU runs out of memory (ollama's llm/status.go). "llama runner
# process has terminated: <why>" wraps every runner death: it is out of memory only when <why> says so,
# or is the host's OOM killer ("signal: killed"); a row whose prompt crashes the runner otherwise must
# end as an error row, not stop the job as "persistent out of memory".
_OOM_MARKERS = (
    "out of memory",
    "cudamalloc failed",
    "unable to allocate",  # loading: "error loading model: unable to allocate CUDA0 buffer" (ollama#5941, #8597)
    "failed to allocate",
    "model requires more system memory",
    "memory layout cannot be allocated",
    "terminated: signal: killed",
)
_CRASH_MARKERS = (
    "llama runner process has terminated",
    "unexpectedly stopped",
    "error was encountered while running the model",
)
PS_TIMEOUT_S = 1.0  # /api/ps is for telemetry: a busy server must not hold the sampler up
MIB = 1024 * 1024


# The last HTTP answer the current asyncio task got, for a malformed answer's error row: the client
# parses the body itself, and its errors (json's "Expecting value", pydantic's ValidationError for
# ChatResponse) do not carry it. Requests in flight together run in separate tasks, each with its
# own context, so none sees another's answer.
_answer: ContextVar[httpx.Response | None] = ContextVar("ollama_answer", default=None)


async def _keep_answer(response: httpx.Response) -> None:
    """httpx response hook: runs before the body is read; the client reads it right after."""
    _answer.set(response)


def _ms(ns: int | None) -> float | None:
    return ns / 1e6 if ns else None


def classify(exc: BaseException, model: str, host: str, answer: httpx.Response | None = None) -> BackendError:
    """Map a client exception to a kind and the action docs/how-it-works.md's failure table prescribes;
    `answer`: the HTTP answer the failed call got, if any."""
    if isinstance(exc, ollama.ResponseError):
        text = exc.error or ""
        lowered = text.lower()
        status = exc.status_code
        kind: str
        action: Action
        if status == 404:
            return BackendError(
                "model_missing",
                "fatal_job",
                f"model '{model}' not found on {host}: run `ollama pull {model}` there ({text})",
            )
        if status in (401, 403):
            return BackendError("unauthorized", "fatal_job", f"{host} refused the credentials ({status}: {text})")
        if status in (429, 503):  # 429: a rate-limiting proxy in front of a remote Ollama
            kind, action = "busy", "backoff"
        elif any(m in lowered for m in _OOM_MARKERS):
            kind, action = "oom", "oom"
        elif any(m in lowered for m in _CRASH_MARKERS):
            kind, action = "runner_crash", "retry"
        elif status >= 500:
            kind, action = "server_error", "retry"
        else:
            kind, action = "bad_request", "fatal_row"
        return BackendError(kind, action, f"HTTP {status}: {text}")
    if isinstance(exc, (ConnectionError, httpx.ConnectError, httpx.ConnectTimeout)):
        return BackendError("unreachable", "unreachable", f"cannot reach Ollama at {host}: {exc}")
    if isinstance(exc, httpx.TimeoutException):
        return BackendError("timeout", "retry", f"no answer in time ({type(exc).__name__})")
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        return BackendError("dropped", "retry", f"connection dropped ({type(exc).__name__}: {exc})")
    if answer is not None and answer.is_success:  # a 2xx the client could not make an answer of
        return bad_response(answer.content, exc)
    raise exc


class OllamaBackend(HttpBackend[ollama.AsyncClient]):
    """One Ollama server and model; options stay identical across a job so nothing reloads."""

    def __init__(self, host: str, model: str, timeout_s: float, keep_alive: int | str) -> None:
        self.host = host
        self.model = model
        self.keep_alive = keep_alive
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s(timeout_s))
        self._ps_client: ollama.Client | None = None

    def _connect(self) -> ollama.AsyncClient:
        # Credentials for a remote/proxied Ollama come from the environment only (the client sends
        # OLLAMA_API_KEY as a Bearer token), so they never travel through parameters, artifacts or files.
        return ollama.AsyncClient(host=self.host, timeout=self._timeout, event_hooks={"response": [_keep_answer]})

    async def check(self) -> None:
        _answer.set(None)
        try:
            await self.client.show(self.model)
        except Exception as exc:  # classify re-raises what it does not know
            raise classify(exc, self.model, self.host, _answer.get()) from exc

    async def describe(self) -> ServerInfo:
        # Ollama's API does not say how many requests it decodes together (OLLAMA_NUM_PARALLEL);
        # /api/show's model_info has the GGUF's architecture keys.
        _answer.set(None)
        try:
            shown = await self.client.show(self.model)
        except Exception as exc:
            raise classify(exc, self.model, self.host, _answer.get()) from exc
        return ServerInfo(engine="ollama", geometry=model_geometry(dict(shown.modelinfo or {})))

    async def chat(
        self, messages: list[dict[str, str]], *, options: dict[str, Any], schema: dict[str, Any] | None
    ) -> Reply:
        _answer.set(None)
        try:
            resp = await self.client.chat(
                model=self.model,
                messages=messages,
                format=schema,
                options=options,
                keep_alive=self.keep_alive,
                stream=False,
            )
        except Exception as exc:
            raise classify(exc, self.model, self.host, _answer.get()) from exc
        return Reply(
            content=resp.message.content or "",
            done_reason=resp.done_reason,
            prompt_tokens=resp.prompt_eval_count,
            completion_tokens=resp.eval_count,
            load_ms=_ms(resp.load_duration),
            prompt_eval_ms=_ms(resp.prompt_eval_duration),
            eval_ms=_ms(resp.eval_duration),
            total_ms=_ms(resp.total_duration),
        )

    async def unload(self) -> None:
        # Ollama's documented unload: a generate request without a prompt and keep_alive 0.
        try:
            await self.client.generate(model=self.model, keep_alive=0)
        except Exception as exc:
            raise classify(exc, self.model, self.host) from exc

    def loaded_sizes(self) -> tuple[float | None, float | None]:
        """`size` and `size_vram` (MiB) of this job's model as loaded now (/api/ps; another model kept on the
        CPU is not this job's spill); (None, None) without an answer. Synchronous, for the telemetry
        thread; its client lives until close()."""
        if self._ps_client is None:
            self._ps_client = ollama.Client(host=self.host, timeout=PS_TIMEOUT_S)  # OLLAMA_API_KEY too
        try:
            models = self._ps_client.ps().models
        except (ConnectionError, ollama.ResponseError, httpx.HTTPError, ValueError):
            return None, None
        ours = self.model if ":" in self.model else f"{self.model}:latest"  # as /api/ps names it
        mine = [m for m in models if ours in (m.model, m.name)]
        size = sum(m.size or 0 for m in mine)
        vram = sum(m.size_vram or 0 for m in mine)
        return size / MIB, vram / MIB

    async def close(self) -> None:
        await super().close()
        if self._ps_client is not None:
            self._ps_client.close()
            self._ps_client = None
