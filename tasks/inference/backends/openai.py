"""Any OpenAI-compatible chat-completions server (vLLM, SGLang, llama.cpp's llama-server, Ollama's /v1)
through the official `openai.AsyncOpenAI` client."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import httpx
import httpx2
import openai

from tasks.inference.backends.protocol import (
    Action,
    BackendError,
    HttpBackend,
    Reply,
    ServerInfo,
    bad_response,
    connect_timeout_s,
)

# What the engines put in a 400 for a prompt longer than a sequence's context:
# llama.cpp "request (N tokens) exceeds the available context size (M tokens)" / "is larger than
# the max context size"; vLLM and SGLang "maximum context length is N tokens".
_CONTEXT_MARKERS = (
    "exceeds the available context size",
    "max context size",
    "maximum context length",
    "context length",
)
_OOM_MARKERS = ("out of memory", "cudamalloc failed", "failed to allocate")

# Local servers usually want no key, but the client refuses to start without one; a placeholder
# keeps it from reading a key from anywhere but the environment variable named below.
_NO_KEY = "not-set"


def _api_key() -> str:
    return os.environ.get("OPENAI_API_KEY") or _NO_KEY


def server_root(base_url: str) -> str:
    """llama.cpp serves /props, /tokenize and /health beside /v1, not under it."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        text = error.get("message") if isinstance(error, dict) else error
        if text:
            return str(text)
    return exc.message


def classify(exc: BaseException, model: str, base_url: str) -> BackendError:
    """Map a client exception onto the runner's failure kinds and actions."""
    if isinstance(exc, openai.APIStatusError):
        status, text = exc.status_code, _message(exc)
        lowered = text.lower()
        kind: str
        action: Action
        if status == 404:
            return BackendError("model_missing", "fatal_job", f"{base_url} does not serve model '{model}' ({text})")
        if status in (401, 403):
            return BackendError(
                "unauthorized",
                "fatal_job",
                f"{base_url} refused the credentials ({status}: {text}); check OPENAI_API_KEY",
            )
        if status in (429, 503):
            kind, action = "busy", "backoff"
        elif any(m in lowered for m in _OOM_MARKERS):
            kind, action = "oom", "oom"
        elif status == 400 and any(m in lowered for m in _CONTEXT_MARKERS):
            kind, action = "context_length", "fatal_row"
            text = f"prompt does not fit the server's context ({text}); set trim_field or a larger server context"
        elif status >= 500:
            kind, action = "server_error", "retry"
        else:
            kind, action = "bad_request", "fatal_row"
        return BackendError(kind, action, f"HTTP {status}: {text}")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        if isinstance(cause, (httpx2.ConnectError, httpx2.ConnectTimeout)):
            return BackendError("unreachable", "unreachable", f"cannot reach {base_url}: {cause}")
        if isinstance(exc, openai.APITimeoutError):
            return BackendError("timeout", "retry", "no answer in time")
        return BackendError("dropped", "retry", f"connection dropped ({type(cause).__name__}: {cause})")
    raise exc


class OpenAIBackend(HttpBackend[openai.AsyncOpenAI]):
    """One OpenAI-compatible server and model. The client's own retries are off: the chunk runner's
    policy (back-off, outage budget, OOM adaptation) is the only one, and it sees every failure."""

    def __init__(self, base_url: str, model: str, timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s

    def _connect(self) -> openai.AsyncOpenAI:
        timeout = openai.Timeout(self.timeout_s, connect=connect_timeout_s(self.timeout_s))
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=_api_key(), max_retries=0, timeout=timeout)

    async def check(self) -> None:
        try:
            served = [m.id async for m in self.client.models.list()]
        except Exception as exc:
            raise classify(exc, self.model, self.base_url) from exc
        if self.model not in served:
            raise BackendError(
                "model_missing",
                "fatal_job",
                f"{self.base_url} does not serve model '{self.model}'; it serves: {', '.join(served) or 'nothing'}",
            )

    async def describe(self) -> ServerInfo:
        """What the server says of itself: llama.cpp's /props has its parallel slots and per-slot
        context; other engines answer 404 there and calibration decides the level alone."""
        async with httpx.AsyncClient(timeout=10.0, headers=_auth_headers()) as http:
            try:
                resp = await http.get(f"{server_root(self.base_url)}/props")
                props = resp.json() if resp.status_code == 200 else {}
            except (httpx.HTTPError, ValueError):
                props = {}
        if not isinstance(props, dict) or "total_slots" not in props:
            return ServerInfo(engine="openai-compatible")
        n_ctx = (props.get("default_generation_settings") or {}).get("n_ctx")
        return ServerInfo(
            engine="llama.cpp",
            parallel_slots=int(props["total_slots"]),
            context_per_slot=int(n_ctx) if n_ctx else None,
            build=str(props.get("build_info") or "") or None,
        )

    async def chat(
        self, messages: list[dict[str, str]], *, options: dict[str, Any], schema: dict[str, Any] | None
    ) -> Reply:
        extra: dict[str, Any] = {}
        if "top_k" in options:
            extra["top_k"] = options["top_k"]  # not in OpenAI's API; vLLM, SGLang and llama.cpp take it
        if options.get("backend_sampling"):
            extra["backend_sampling"] = True  # llama.cpp's: sample on the GPU (tasks/inference/modes.py decides)
        try:
            # The raw answer, parsed below: the client returns a proxy's HTML page as a string and an
            # error object as a ChatCompletion without choices, and the row must keep what came back.
            raw = await self.client.chat.completions.with_raw_response.create(
                model=self.model,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=options["num_predict"],
                temperature=options["temperature"],
                seed=options["seed"],
                top_p=options.get("top_p", openai.omit),
                stop=options.get("stop", openai.omit),
                presence_penalty=options.get("presence_penalty", openai.omit),
                frequency_penalty=options.get("frequency_penalty", openai.omit),
                response_format={"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
                if schema
                else openai.omit,
                extra_body=extra or None,
            )
        except Exception as exc:
            raise classify(exc, self.model, self.base_url) from exc
        try:
            resp = raw.parse()
            choice = resp.choices[0]
            content = choice.message.content or ""
            # The client builds its models without validating them: what the row keeps is checked here.
            if not isinstance(content, str):
                raise TypeError(f"message content is {type(content).__name__}, not text")
            if choice.finish_reason is not None and not isinstance(choice.finish_reason, str):
                raise TypeError(f"finish_reason is {choice.finish_reason!r}, not text")
            usage = resp.usage
            # llama.cpp's server times each request's prompt processing and generation; others send none.
            timings = (resp.model_extra or {}).get("timings") or {}
            return Reply(
                content=content,
                done_reason=choice.finish_reason,
                prompt_tokens=_count(usage, "prompt_tokens"),
                completion_tokens=_count(usage, "completion_tokens"),
                prompt_eval_ms=_ms(timings.get("prompt_ms")),
                eval_ms=_ms(timings.get("predicted_ms")),
            )
        except Exception as exc:  # an HTTP 200 that is not a chat completion
            raise bad_response(raw.http_response.content, exc) from exc

    async def unload(self) -> None:
        pass  # an OpenAI-compatible server keeps its model for its whole life; nothing to ask


def _count(usage: Any, name: str) -> int | None:
    value = getattr(usage, name, None)
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise TypeError(f"usage.{name} is {value!r}, not a count")


def _ms(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _auth_headers() -> dict[str, str]:
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def token_counter(base_url: str, model: str) -> Callable[[list[dict[str, str]]], int] | None:
    """Count a request's prompt tokens as the server will, chat template included, or None where
    the server cannot say (trimming then falls back to a cautious estimate).

    llama.cpp renders the template at /apply-template and counts at /tokenize; vLLM's /tokenize
    takes the messages directly. The template's markers are tens of tokens, so counting the
    message texts alone would let a trimmed prompt overflow the context by that much.
    """
    root, headers = server_root(base_url), _auth_headers()

    def post(path: str, body: dict[str, Any]) -> Any:
        # A connection per call: counting runs only for rows that may not fit, and nothing is left open.
        resp = httpx.post(f"{root}{path}", json=body, headers=headers, timeout=30.0)
        resp.raise_for_status()
        return resp.json()

    def llama_cpp(messages: list[dict[str, str]]) -> int:
        prompt = post("/apply-template", {"messages": messages})["prompt"]
        return len(post("/tokenize", {"content": prompt, "add_special": True})["tokens"])

    def vllm(messages: list[dict[str, str]]) -> int:
        return int(post("/tokenize", {"model": model, "messages": messages})["count"])

    probe = [{"role": "user", "content": "probe"}]
    for count in (llama_cpp, vllm):
        try:
            count(probe)
        except (httpx.HTTPError, KeyError, TypeError, ValueError):
            continue
        return _failing_as_backend(count, root)
    return None


def _failing_as_backend(
    count: Callable[[list[dict[str, str]]], int], root: str
) -> Callable[[list[dict[str, str]]], int]:
    """A counter whose failure later (a server restarting answers 503) is the chunk's BackendError, retried
    like an outage, not a raw HTTP error that ends the run."""

    def counted(messages: list[dict[str, str]]) -> int:
        try:
            return count(messages)
        except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
            raise BackendError("unreachable", "unreachable", f"counting prompt tokens at {root} failed: {exc}") from exc

    return counted
