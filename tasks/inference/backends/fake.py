"""An in-process backend for tests: scripted replies and faults, and a record of what it was asked.

Modelled on simonw/llm's MockModel: `enqueue()` what the next requests get, then read `history`.
Nothing here sleeps unless asked: a request yields to the event loop once (so requests in flight
interleave as against a real server) and answers, fails or hangs at once, as scripted; `delay`, when
given, makes a request take delay(requests in flight when it arrived) seconds, an engine that slows
with load (for the `in_flight: auto` runner tests, a few milliseconds).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from tasks.inference.backends.protocol import BackendError, Reply


class _Hang:
    def __repr__(self) -> str:
        return "HANG"


HANG: Final = _Hang()  # an outcome: the request never answers (until the runner gives up on it)

Outcome = str | Reply | BackendError | Exception | _Hang  # any other exception: a failure no backend classified
Answer = Callable[[list[dict[str, str]], dict[str, Any] | None], str]


def echo(messages: list[dict[str, str]], schema: dict[str, Any] | None) -> str:
    """The default answer: names the prompt, so a test can tell which row got which answer."""
    return f"answer to: {messages[-1]['content']}"


@dataclass
class Request:
    """One chat request as the backend saw it, and how it ended ('ok', an error kind, or 'hang')."""

    messages: list[dict[str, str]]
    options: dict[str, Any]
    schema: dict[str, Any] | None
    outcome: str = "pending"
    concurrent: int = 0  # requests out when it arrived, itself included

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class _Script:
    match: str | None  # a substring of the prompt, or None for any request
    outcomes: list[Outcome]
    forever: bool = False  # the last outcome repeats once the others are used


@dataclass
class FakeBackend:
    """Answers `answer(messages, schema)` unless a script says otherwise; records every request."""

    answer: Answer = echo
    check_error: BackendError | None = None  # what check() raises, if anything
    delay: Callable[[int], float] | None = None  # seconds a request takes, by requests in flight at its arrival
    history: list[Request] = field(default_factory=list)
    unloads: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    opened: bool = False
    closed: bool = False
    _scripts: list[_Script] = field(default_factory=list)

    def enqueue(self, *outcomes: Outcome, match: str | None = None) -> None:
        """The next requests (whose prompt contains `match`, if given) get these outcomes, in order."""
        self._scripts.append(_Script(match, list(outcomes)))

    def always(self, outcome: Outcome, match: str | None = None) -> None:
        """Every request (whose prompt contains `match`) gets `outcome` from now on."""
        self._scripts.append(_Script(match, [outcome], forever=True))

    def _next(self, prompt: str) -> Outcome | None:
        for script in self._scripts:
            if script.outcomes and (script.match is None or script.match in prompt):
                return script.outcomes[0] if script.forever else script.outcomes.pop(0)
        return None

    def requests_for(self, match: str) -> list[Request]:
        return [r for r in self.history if match in r.prompt]

    async def open(self) -> None:
        self.opened = True

    async def check(self) -> None:
        if self.check_error is not None:
            raise self.check_error

    async def chat(
        self, messages: list[dict[str, str]], *, options: dict[str, Any], schema: dict[str, Any] | None
    ) -> Reply:
        request = Request(messages, dict(options), schema)
        self.history.append(request)
        outcome = self._next(request.prompt)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        request.concurrent = self.in_flight
        try:
            await asyncio.sleep(self.delay(request.concurrent) if self.delay else 0)
            if isinstance(outcome, _Hang):
                request.outcome = "hang"
                await asyncio.Event().wait()
            if isinstance(outcome, BackendError):
                request.outcome = outcome.kind
                raise BackendError(outcome.kind, outcome.action, str(outcome), outcome.raw)  # a fresh one per raise
            if isinstance(outcome, Exception):
                request.outcome = type(outcome).__name__
                raise type(outcome)(*outcome.args)
            if isinstance(outcome, Reply):
                reply = outcome
            else:
                content = outcome if isinstance(outcome, str) else self.answer(messages, schema)
                reply = Reply(
                    content=content,
                    done_reason="stop",
                    prompt_tokens=len(request.prompt.split()),
                    completion_tokens=len(content.split()),
                )
        finally:
            self.in_flight -= 1
        request.outcome = "ok"
        return reply

    async def unload(self) -> None:
        self.unloads += 1

    async def close(self) -> None:
        self.closed = True
