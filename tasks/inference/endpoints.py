"""Before anything is sent: which endpoints answer and have the model, and what each says of itself."""

from __future__ import annotations

import asyncio
import logging

from tasks.inference.backends import BackendError, ServerInfo, make_backend
from tasks.settings.model import JobSettings

log = logging.getLogger(__name__)


class BackendUnavailable(RuntimeError):
    """No endpoint answers, or none has the model: nothing can run."""

    def __init__(self, message: str, backend: str = "ollama") -> None:
        super().__init__(message)
        self.backend = backend  # the hint differs: an Ollama server, an OpenAI-compatible one, a GGUF file


async def _check_one(settings: JobSettings) -> ServerInfo:
    backend = make_backend(settings)
    try:
        await backend.open()
        await backend.check()
        return await backend.describe()
    finally:
        await backend.close()


def check_backends(settings: JobSettings) -> tuple[list[JobSettings], list[str], list[ServerInfo]]:
    """The endpoints that answer and have the model, the problems of the others, and what each
    server that answered says of itself (slots, context per slot; see ServerInfo).

    Raises BackendUnavailable, naming host and model, when none does.
    """
    up, problems, servers = [], [], []
    for lane in settings.lanes():
        try:
            info = asyncio.run(_check_one(lane))
        except BackendError as err:
            problems.append(str(err))
            continue
        if lane.server_slots is None and info.parallel_slots:
            lane = lane.model_copy(update={"server_slots": info.parallel_slots})  # 'auto's ceiling
        up.append(lane)
        servers.append(info)
        if info.context_per_slot is not None and info.context_per_slot < lane.options.num_ctx:
            # The server's per-sequence context is fixed at its start: prompts the job thinks fit can fail.
            note = (
                f"{lane.server_label} gives each of its {info.parallel_slots} slots {info.context_per_slot} tokens "
                f"of context, less than options.num_ctx {lane.options.num_ctx}: longer prompts become "
                "context_length error rows; lower num_ctx or start the server with a larger context"
            )
            log.warning(note)
    if not up:
        raise BackendUnavailable(f"backend check failed: {'; '.join(problems)}", settings.backend)
    return up, problems, servers
