"""A chunk's rows turned into prompts: the template filled, long fields trimmed to fit the context."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import BaseModel

from tasks.io import openai_batch, sources
from tasks.plan.dataset import ChunkSpec, InputError, job_snapshot
from tasks.settings.model import JobSettings


class PreparedRow(BaseModel):
    """One input row ready to send: its messages, or the reason it cannot be sent."""

    row_index: int
    id: str
    messages: list[dict[str, str]] | None = None
    options: dict[str, Any] | None = None  # this row's own sampling settings (an OpenAI batch line's body)
    error: str | None = None
    trimmed: bool = False


TokenCounter = Callable[[list[dict[str, str]]], int]  # a request's messages -> prompt tokens
TEMPLATE_TOKENS = 16  # chat-template markers around the messages
TRIM_MARK = " …[trimmed]"


def estimate_tokens(text: str) -> int:
    """A deliberately high token count when no tokenizer is at hand: 3 UTF-8 bytes per token
    (Gemma averages ~4 characters per token on English), so a trimmed prompt fits for sure."""
    return len(text.encode("utf-8")) // 3 + 1


def estimate_prompt_tokens(messages: list[dict[str, str]]) -> int:
    """estimate_tokens over a request's messages, with the chat template's markers."""
    return sum(estimate_tokens(m["content"]) for m in messages) + TEMPLATE_TOKENS


def _render(settings: JobSettings, values: dict[str, str]) -> list[dict[str, str]]:
    assert settings.prompt_template is not None  # checked when the input was validated
    messages = [{"role": "user", "content": settings.prompt_template.format(**values)}]
    if settings.system_prompt:
        messages.insert(0, {"role": "system", "content": settings.system_prompt})
    return messages


def _fit(settings: JobSettings, values: dict[str, str], count: TokenCounter) -> tuple[list[dict[str, str]], bool]:
    """Messages for the row, with `trim_field` cut (binary search on its length) until the prompt
    leaves num_predict tokens for the answer."""
    messages = _render(settings, values)
    field = settings.trim_field
    if field is None:
        return messages, False
    budget = settings.options.num_ctx - settings.options.num_predict

    def cut(keep: int) -> list[dict[str, str]]:
        return _render(settings, {**values, field: values[field][:keep] + TRIM_MARK})

    def fits(candidate: list[dict[str, str]]) -> bool:
        return count(candidate) <= budget

    if fits(messages):
        return messages, False
    # No token spans 16 characters in practice: this bounds the search without tokenizing megabytes.
    low, high = 0, min(len(values[field]), 16 * budget)
    while low < high:
        mid = (low + high + 1) // 2
        if fits(cut(mid)):
            low = mid
        else:
            high = mid - 1
    return cut(low), True


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, list | dict):  # a list or struct column: JSON, not Python's repr
        text = json.dumps(value, ensure_ascii=False, default=str)
    else:
        text = value if isinstance(value, str) else str(value)
    return text if text.strip() else None


def prepare_chunk(
    settings: JobSettings,
    chunk: ChunkSpec,
    skip: set[int] | frozenset[int] = frozenset(),
    count_tokens: TokenCounter | None = None,
    snapshot: Path | None = None,
) -> list[PreparedRow]:
    """Read one chunk's rows (only the columns the prompt needs) and render their messages.

    Values are substituted with str.format, which never re-parses them: braces or
    instructions inside the data stay data. Rows with a null or empty field are not
    sent; they become error rows.
    """
    fields = settings.template_fields
    snapshot = snapshot or job_snapshot(settings)
    try:
        frame = pl.scan_parquet(snapshot).with_row_index("__row").slice(chunk.offset, chunk.length).collect()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputError(f"the input snapshot {snapshot} cannot be read ({exc}): delete it and rerun") from exc
    if frame.height != chunk.length:
        raise InputError(f"the input snapshot {snapshot} has no rows {chunk.offset}..{chunk.offset + chunk.length - 1}")
    batch = openai_batch.MESSAGES in frame.columns  # an OpenAI batch file: each line brings its messages
    prepared = []
    for record in frame.iter_rows(named=True):
        row_index = record["__row"]
        if row_index in skip:
            continue
        if batch:
            messages, options = sources.batch_row(record)
            prepared.append(PreparedRow(row_index=row_index, id=record["__id"], messages=messages, options=options))
            continue
        values = {f: _text(record[f]) for f in fields}
        empty = [f for f, v in values.items() if v is None]
        if empty:
            prepared.append(
                PreparedRow(
                    row_index=row_index, id=record["__id"], error=f"empty template field(s): {', '.join(empty)}"
                )
            )
            continue
        messages, trimmed = _fit(settings, values, count_tokens or estimate_prompt_tokens)  # type: ignore[arg-type]
        prepared.append(PreparedRow(row_index=row_index, id=record["__id"], messages=messages, trimmed=trimmed))
    return prepared
