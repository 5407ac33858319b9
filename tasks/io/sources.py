"""Where a job's rows come from: a table file, an OpenAI batch file, or a SQL query.

Queries and OpenAI batch files are read once, at planning, into one Polars frame, which
tasks/plan/dataset.py checks and pins like any input (the snapshot `input-<digest>.parquet` every
chunk reads), so a query that would answer differently a minute later cannot shift rows between
chunks. Their digest is of the rows themselves (`frame_digest`), so a rerun whose query returns
other rows is refused like a changed input file.
"""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel

from tasks.io import openai_batch, sql
from tasks.schema import load_output_model
from tasks.settings.model import JobSettings

Kind = Literal["table", "openai_batch", "sql"]


def input_kind(settings: JobSettings) -> Kind:
    if settings.input_sql is not None:
        return "sql"
    if settings.input_format == "openai_batch":
        return "openai_batch"
    if settings.input_format == "auto" and settings.input_path and openai_batch.looks_like_batch(settings.input_path):
        return "openai_batch"
    return "table"


def id_column(settings: JobSettings) -> str:
    """The column that holds each row's id: custom_id in an OpenAI batch file."""
    return "custom_id" if input_kind(settings) == "openai_batch" else settings.id_column


def read_frame(settings: JobSettings) -> pl.DataFrame:
    """The rows of a query or an OpenAI batch file (their errors name the query, file and line)."""
    if settings.input_sql is not None:
        return sql.read_query(settings.input_sql)
    assert settings.input_path is not None
    if (problem := file_problem(settings.input_path)) is not None:
        raise openai_batch.BatchFileError(problem)
    return openai_batch.read_batch(settings.input_path)


def file_problem(path: Path) -> str | None:
    """Why `path` cannot be an input file (None when it is a regular file). A named pipe, a socket or a
    device exists but is no file: the input is read several times (digest, checks, snapshot), a pipe once."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return f"input {path} does not exist"
    except OSError as exc:
        return f"input {path} cannot be read: {exc.strerror}"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return f"input {path} is a directory, not a file"
    kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    return f"input {path} is {kind}, not a regular file: the job reads its input more than once; write it to a file"


def frame_digest(frame: pl.DataFrame) -> str:
    """sha256 of the rows as JSON lines (column names included): what the answers depend on."""
    return hashlib.sha256(frame.write_ndjson().encode("utf-8")).hexdigest()[:16]


def wants_openai_output(settings: JobSettings) -> bool:
    """openai-output.jsonl is written when asked for, or (unset) when the input is an OpenAI batch file."""
    return settings.openai_output if settings.openai_output is not None else input_kind(settings) == "openai_batch"


def check_template(settings: JobSettings, kind: Kind) -> None:
    """An OpenAI batch file brings its messages; a table needs a template to build them."""
    label = settings.input_label
    if kind == "openai_batch":
        # Told so by input_format, or recognised by its first line: the message says which.
        seen = (
            "is read as an OpenAI batch file (input_format)"
            if settings.input_format != "auto"
            else "is an OpenAI batch file"
        )
        given = [f for f in ("prompt_template", "system_prompt", "trim_field") if getattr(settings, f) is not None]
        if given:
            raise openai_batch.BatchFileError(
                f"input {label} {seen}: its lines carry the messages, so {', '.join(given)} "
                "cannot apply (remove it, or set input_format: table)"
            )
        if settings.id_column not in ("id", "custom_id"):  # "id" is the default: not a choice the user made
            raise openai_batch.BatchFileError(f"input {label} is an OpenAI batch file: its ids are custom_id")
    elif settings.prompt_template is None:
        batch = " (an OpenAI batch file is told by its first line: an object with custom_id and body)"
        suffix = settings.input_path.suffix.lower() if settings.input_path else ""
        raise openai_batch.BatchFileError(
            f"input {label}: set prompt_template (the user message built from columns)"
            + (batch if suffix in (".jsonl", ".ndjson") else "")
        )


def output_model(settings: JobSettings, response_format: str | None) -> type[BaseModel] | None:
    """The structured-output model: output_schema, or the response_format an OpenAI batch file's
    lines share (JobPlan.response_format; the JSON text "null" when they set none)."""
    if settings.output_schema:
        if response_format not in (None, "null"):
            raise openai_batch.BatchFileError(
                f"input {settings.input_label} sets response_format and the job sets output_schema: keep one"
            )
        return load_output_model(settings.output_schema)
    return openai_batch.output_model(response_format, settings.input_label) if response_format else None


def batch_row(record: dict[str, Any]) -> tuple[list[dict[str, str]], dict[str, Any] | None]:
    """Messages and per-line option overrides of one snapshot row of an OpenAI batch file."""
    options = record[openai_batch.OPTIONS]
    return json.loads(record[openai_batch.MESSAGES]), json.loads(options) if options else None
