"""The inference engines behind one Protocol (`protocol.py`), and `make_backend`, which picks one from the settings."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tasks.inference.backends.protocol import Action, Backend, BackendError, Reply, ServerInfo

if TYPE_CHECKING:
    from tasks.settings.model import JobSettings

__all__ = ["Action", "Backend", "BackendError", "Reply", "ServerInfo", "make_backend", "token_counter"]


def make_backend(settings: JobSettings) -> Backend:
    """The backend the settings name; imports lazily so each engine's package is optional."""
    if settings.backend == "ollama":
        from tasks.inference.backends.ollama import OllamaBackend

        return OllamaBackend(
            host=settings.ollama_base_url,
            model=settings.model,
            timeout_s=settings.request_timeout_s,
            keep_alive=settings.keep_alive,
        )
    if settings.backend == "openai":
        from tasks.inference.backends.openai import OpenAIBackend

        return OpenAIBackend(base_url=settings.server_label, model=settings.model, timeout_s=settings.request_timeout_s)
    from tasks.inference.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend(model_path=settings.model_path, model=settings.model, num_ctx=settings.options.num_ctx)


def token_counter(settings: JobSettings) -> Callable[[list[dict[str, str]]], int] | None:
    """The engine's own count of a request's prompt tokens, when trimming needs it and the engine offers it.

    Ollama's API has no tokenize endpoint, so for it trimming uses a conservative estimate.
    """
    if settings.trim_field is None or settings.backend == "ollama":
        return None
    if settings.backend == "openai":
        from tasks.inference.backends.openai import token_counter as server_counter

        return server_counter(settings.server_label, settings.model)
    from tasks.inference.backends.llamacpp import token_counter as llama_counter

    return llama_counter(settings.model_path, settings.options.num_ctx)
