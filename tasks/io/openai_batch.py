"""OpenAI Batch API files: request lines in (custom_id, method, url, body), output lines out.

The same format vLLM's `run-batch` reads and writes, so files prepared for either run here
unchanged and their output readers read ours. Per-line sampling settings (max_tokens,
temperature, top_p, seed, stop, penalties) are honoured per request: they do not reload a model.
What would vary a job-wide setting is refused before any request, naming the line: another
model (a reload), runner options such as num_ctx (Ollama reloads the model when they change),
and a different response_format (it fixes the typed columns of the results and the sink).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from tasks.schema import model_from_json_schema
from tasks.settings.model import GenerationOptions

CHAT_URL = "/v1/chat/completions"
MESSAGES, OPTIONS, FORMAT = "__messages", "__options", "__format"  # columns of the parsed frame
COLUMNS = [MESSAGES, OPTIONS, FORMAT]  # what the input snapshot keeps of each line, besides its id

# Body keys mapped onto a request's options, and the option each becomes.
_SAMPLING = {
    "max_tokens": "num_predict",
    "max_completion_tokens": "num_predict",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
_IGNORED = {"model", "messages", "response_format", "user", "metadata", "store", "service_tier"}
_RUNNER = {"options", "num_ctx", "num_gpu", "num_batch", "num_thread", "keep_alive", "max_model_len"}


class BatchFileError(ValueError):
    """A request line the job cannot run as written; the message names the file, line and setting."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1)
    method: Literal["POST"]
    url: str
    body: dict[str, Any]


def looks_like_batch(path: Path) -> bool:
    """A .jsonl whose first line is an object with custom_id and body: an OpenAI batch file."""
    if path.suffix.lower() not in (".jsonl", ".ndjson") or not path.is_file():
        return False
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(first, dict) and "custom_id" in first and "body" in first
    return False


def _text(content: str | list[dict[str, Any]], where: str) -> str:
    """Message content as text; content parts other than text cannot go to a text model."""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text":
            raise BatchFileError(f"{where}: content part of type {part.get('type')!r} is not supported (text only)")
        texts.append(str(part.get("text", "")))
    return "".join(texts)


def _options(body: dict[str, Any], where: str) -> dict[str, Any]:
    """The line's sampling settings as option overrides, checked against the options' bounds."""
    overrides: dict[str, Any] = {}
    for key, value in body.items():
        if key in _RUNNER:
            raise BatchFileError(
                f"{where}: body.{key} is a runner setting; Ollama reloads the model when it changes between "
                "requests, so it is set once for the job (options in the job file)"
            )
        if key in _SAMPLING:
            if value is not None:
                overrides[_SAMPLING[key]] = [value] if key == "stop" and isinstance(value, str) else value
        elif key == "n" and value not in (None, 1):
            raise BatchFileError(f"{where}: body.n={value}: one answer per request only")
        elif key in ("stream", "logprobs", "parallel_tool_calls") and value:
            raise BatchFileError(f"{where}: body.{key}=true is not supported in a batch")
        elif key not in _IGNORED and key not in ("n", "stream", "logprobs", "parallel_tool_calls"):
            raise BatchFileError(f"{where}: body.{key} is not supported; remove it or run the line elsewhere")
    try:
        GenerationOptions.model_validate(overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise BatchFileError(f"{where}: {'.'.join(map(str, first['loc']))} {first['msg']}") from None
    return overrides


def read_batch(path: Path) -> pl.DataFrame:
    """One row per request line: custom_id, the messages and option overrides as JSON text, and the
    response_format every line shares. Raises BatchFileError naming the line."""
    ids: list[str] = []
    messages: list[str] = []
    options: list[str | None] = []
    shared: dict[str, Any] = {}  # setting -> (value, first line), for settings every line must share
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"input {path} line {number}"
            try:
                request = _Request.model_validate_json(line)
            except ValidationError as exc:
                first = exc.errors()[0]
                raise BatchFileError(f"{where}: {'.'.join(map(str, first['loc'])) or 'line'}: {first['msg']}") from None
            if request.url != CHAT_URL:
                raise BatchFileError(f"{where}: url {request.url!r} is not supported (only {CHAT_URL})")
            body = request.body
            try:
                chat = [_Message.model_validate(m) for m in body.get("messages") or []]
            except ValidationError as exc:
                first = exc.errors()[0]
                raise BatchFileError(
                    f"{where}: body.messages.{'.'.join(map(str, first['loc']))}: {first['msg']}"
                ) from None
            if not chat:
                raise BatchFileError(f"{where}: body.messages is missing or empty")
            for key in ("model", "response_format"):
                value = json.dumps(body.get(key), sort_keys=True)
                seen, first_line = shared.setdefault(key, (value, number))
                if value != seen:
                    why = (
                        "one model per job (another would be loaded)"
                        if key == "model"
                        else ("it fixes the typed result columns, so every line must share it")
                    )
                    raise BatchFileError(f"{where}: body.{key} differs from line {first_line}: {why}")
            rendered = [
                {"role": "system" if m.role == "developer" else m.role, "content": _text(m.content, where)}
                for m in chat
            ]
            overrides = _options(body, where)
            ids.append(request.custom_id)
            messages.append(json.dumps(rendered, ensure_ascii=False))
            options.append(json.dumps(overrides) if overrides else None)
    response_format = shared.get("response_format", ("null", 0))[0]
    if ids:
        output_model(response_format, str(path))  # an unusable schema fails here, before any request
    return pl.DataFrame(
        {"custom_id": ids, MESSAGES: messages, OPTIONS: options, FORMAT: [response_format] * len(ids)},
        schema={"custom_id": pl.String, MESSAGES: pl.String, OPTIONS: pl.String, FORMAT: pl.String},
    )


def output_model(response_format_json: str, source: str) -> type[BaseModel] | None:
    """The structured-output model a shared response_format asks for (None: plain text)."""
    response_format = json.loads(response_format_json)
    if not response_format or response_format.get("type") == "text":
        return None
    if response_format.get("type") == "json_object":
        # Any JSON object: the engine is asked for JSON, nothing becomes a typed column.
        return create_model("JsonObject", __config__=ConfigDict(extra="allow"))
    if response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise BatchFileError(f"{source}: response_format.json_schema.schema is missing")
        try:
            return model_from_json_schema(schema, f"{source}: response_format")
        except ValueError as exc:
            raise BatchFileError(str(exc)) from None
    raise BatchFileError(f"{source}: response_format type {response_format.get('type')!r} is not supported")


# ------------------------------------------------------------------------------------- output
def _output_line(row: dict[str, Any], model: str, fingerprint: str) -> dict[str, Any]:
    """One result row as an OpenAI batch output line (vLLM writes the same shape)."""
    digest = hashlib.sha256(f"{fingerprint}\n{row['id']}".encode()).hexdigest()[:24]
    line: dict[str, Any] = {"id": f"batch_req_{digest}", "custom_id": row["id"], "response": None, "error": None}
    if row["status"] != "ok":
        line["error"] = {"code": row["error_kind"], "message": row["error"]}
        return line
    prompt, completion = row["prompt_tokens"] or 0, row["completion_tokens"] or 0
    line["response"] = {
        "status_code": 200,
        "request_id": f"req_{digest}",
        "body": {
            "id": f"chatcmpl-{digest}",
            "object": "chat.completion",
            "created": int(row["finished_at"].timestamp()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": row["response"]},
                    "logprobs": None,
                    "finish_reason": "length" if row["done_reason"] == "length" else "stop",
                }
            ],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        },
    }
    return line


def write_output(results: Path, target: Path, model: str, fingerprint: str) -> Path:
    """results.parquet as an OpenAI batch output file, in input order, streamed in batches."""
    from tasks.storage.files import write_atomic  # store imports dataset, which reads batch files through this module

    wanted = ["id", "status", "error_kind", "error", "response", "done_reason", "prompt_tokens",
              "completion_tokens", "finished_at"]  # fmt: skip

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as handle:
            for batch in pl.scan_parquet(results).select(wanted).collect_batches():
                for row in batch.iter_rows(named=True):
                    handle.write(json.dumps(_output_line(row, model, fingerprint), ensure_ascii=False) + "\n")

    write_atomic(target, write)
    return target
