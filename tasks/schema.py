"""The row contract: the result row model, the structured-output model, and their Polars schema."""

from __future__ import annotations

import importlib
import json
import types
import typing
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from tasks.settings.load import read_document

# Kinds of error a row can end with; the report groups errors by these.
ErrorKind = Literal[
    "empty_field",  # a template field was null/empty: nothing was sent
    "bad_request",  # the backend refused the request (HTTP 400)
    "context_length",  # the prompt does not fit the server's context (an OpenAI-compatible server's 400)
    "invalid_output",  # the answer never validated against the output schema
    "bad_response",  # the answer was no answer (empty, a proxy's HTML page, an error object with 200)
    "unexpected",  # the backend failed in a way it does not classify (the error names the exception)
    "timeout",
    "dropped",
    "busy",
    "runner_crash",
    "oom",
    "server_error",
    "unauthorized",
    "model_missing",
    "unreachable",
]


def encodable(value: Any) -> Any:
    """`value` with text UTF-8 cannot hold escaped: a lone surrogate such as '\\ud83d' (JSON allows
    one, some engines send one) becomes the six characters `\\ud83d`. Lists and dicts are walked."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {encodable(k): encodable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [encodable(v) for v in value]
    return value


class ResultRow(BaseModel):
    """One output row per input row: an answer or an error, never both missing."""

    model_config = ConfigDict(extra="forbid")

    row_index: int = Field(ge=0, description="Position of the row in the input file.")
    id: str = Field(description="The row's id (the input's id column, as text).")
    chunk: Annotated[int, pl.Int32] = Field(ge=0)
    status: Literal["ok", "error"]
    error_kind: ErrorKind | None = None
    error: str | None = None
    attempts: Annotated[int, pl.Int16] = Field(
        ge=0, description="Requests sent for this row (0 when nothing was sent)."
    )
    response: str | None = Field(None, description="Raw answer text, kept on error rows too.")
    done_reason: str | None = None
    truncated: bool = Field(False, description="The prompt filled the context: the backend may have cut it.")
    incomplete: bool = Field(False, description="The answer hit num_predict (done_reason 'length').")
    trimmed: bool = Field(False, description="trim_field was cut so the prompt fits the context.")
    prompt_tokens: Annotated[int, pl.Int32] | None = None
    completion_tokens: Annotated[int, pl.Int32] | None = None
    latency_ms: float | None = Field(None, description="Wall time of the last attempt, as the client saw it.")
    load_ms: float | None = None
    prompt_eval_ms: float | None = None
    eval_ms: float | None = None
    total_ms: float | None = None
    model: str
    finished_at: datetime
    parsed: dict[str, Any] | None = Field(None, description="Validated structured output, flattened into columns.")

    @field_validator("*", mode="before")
    @classmethod
    def _encodable(cls, value: Any) -> Any:
        # Every row is written as a UTF-8 journal line and to Parquet: text neither can encode is
        # stored escaped rather than failing the write (and with it the chunk), answers that came back ok too.
        return encodable(value)


class ChunkStats(BaseModel):
    """What one chunk did in this run; the flow joins it with telemetry for the report."""

    index: int
    rows: int = Field(description="Rows in the chunk.")
    endpoint: str | None = Field(None, description="Where the chunk ran: an Ollama URL or 'embedded'.")
    resumed_rows: int = Field(0, description="Rows already on disk from an earlier run, not sent again.")
    sent_rows: int = Field(
        0, description="Rows sent to the engine in this run (not those answered without a request: an empty field)."
    )
    ok: int = 0
    errors: int = 0
    requests: int = Field(0, description="Requests sent, retries included.")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    in_flight: int = Field(1, description="Requests kept in flight (for 'auto', the level it kept at the end).")
    num_ctx: int | None = Field(None, description="options.num_ctx in force at the end (lowered by persistent OOM).")
    calibration: dict[int, float] | None = Field(None, description="'auto' measurements: level -> throughput.")
    levels: dict[int, dict[str, Any]] | None = Field(
        None,
        description="Per in-flight level the chunk ran at ('auto' moves it): its windows [[start, end], ...] (epoch "
        "s) and latency_p50_ms of the answers in them; None with one level.",
    )
    engine: str | None = Field(None, description="The engine the chunk's requests went to (llama.cpp, ollama, ...).")
    structured_output: Literal["grammar", "validate"] | None = Field(
        None, description="How the output schema went: as a grammar, or stated in the prompt and validated."
    )
    backend_sampling_requests: int = Field(0, description="Requests sent with llama.cpp's backend sampling.")
    auto: dict[str, Any] | None = Field(
        None, description="'auto' in-flight state at the chunk's end (calibrate.AutoState): the next chunk carries on."
    )
    started_at: float = 0.0
    finished_at: float = 0.0
    first_answer_at: float | None = Field(None, description="When the chunk's first answer came back (epoch s).")
    events: list[str] = Field(default_factory=list, description="Recoveries and back-offs, with times.")

    @property
    def seconds(self) -> float:
        return max(self.finished_at - self.started_at, 1e-9)


PolarsType = pl.DataType | type[pl.DataType]


def _is_polars_type(value: object) -> bool:
    return isinstance(value, pl.DataType) or (isinstance(value, type) and issubclass(value, pl.DataType))


def _polars_type(annotation: Any, metadata: list[Any] | tuple[Any, ...] = ()) -> PolarsType:
    """Parquet column type of a field: `Annotated[int, pl.Int32]` names one; anything nested is JSON text."""
    if named := [m for m in metadata if _is_polars_type(m)]:
        return named[0]
    if typing.get_origin(annotation) is Annotated:
        return _polars_type(typing.get_args(annotation)[0], annotation.__metadata__)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _polars_type(args[0])
    if typing.get_origin(annotation) is Literal:
        values = typing.get_args(annotation)
        return _polars_type(type(values[0])) if len({type(v) for v in values}) == 1 else pl.String
    if annotation is datetime:
        return pl.Datetime("us", "UTC")
    return {bool: pl.Boolean, int: pl.Int64, float: pl.Float64, str: pl.String}.get(annotation, pl.String)


# The result file's columns, from ResultRow itself; `parsed` is flattened into columns of its own.
RESULT_SCHEMA: dict[str, PolarsType] = {
    name: _polars_type(info.annotation, info.metadata)
    for name, info in ResultRow.model_fields.items()
    if name != "parsed"
}

_JSON_TYPES: dict[str, type] = {"string": str, "integer": int, "number": float, "boolean": bool}


def model_from_json_schema(schema: dict[str, Any], source: str) -> type[BaseModel]:
    """A pydantic model for a flat object JSON Schema, keeping bounds, enums and lengths.

    Flat objects map to typed Parquet columns; nested values are kept as JSON text.
    """
    if schema.get("type") != "object" or not isinstance(schema.get("properties"), dict):
        raise ValueError(f"{source}: the output schema must be an object with 'properties'")
    required = set(schema.get("required", []))
    fields: dict[str, Any] = {}
    for name, prop in schema["properties"].items():
        if not isinstance(prop, dict):
            raise ValueError(f"{source}: property '{name}' must be an object")
        constraints = {
            "ge": prop.get("minimum"),
            "le": prop.get("maximum"),
            "min_length": prop.get("minLength"),
            "max_length": prop.get("maxLength"),
            "pattern": prop.get("pattern"),
            "description": prop.get("description"),
        }
        if "enum" in prop:
            annotation: Any = Literal[tuple(prop["enum"])]
        elif prop.get("type") in _JSON_TYPES:
            annotation = _JSON_TYPES[prop["type"]]
        elif prop.get("type") in ("array", "object"):
            annotation = list[Any] if prop["type"] == "array" else dict[str, Any]
        else:
            raise ValueError(f"{source}: property '{name}' has unsupported type {prop.get('type')!r}")
        kwargs = {k: v for k, v in constraints.items() if v is not None}
        if name in required:
            fields[name] = (annotation, Field(..., **kwargs))
        else:
            fields[name] = (annotation | None, Field(None, **kwargs))
    return create_model("StructuredOutput", __config__=ConfigDict(extra="forbid"), **fields)


def load_output_model(spec: str) -> type[BaseModel]:
    """Resolve `output_schema`: a JSON Schema file or 'module:Class' naming a pydantic model."""
    if spec.endswith(".json"):
        return model_from_json_schema(read_document(Path(spec), "output_schema file"), f"output_schema {spec}")
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"output_schema {spec!r} must be a .json file or 'module:Class'")
    try:
        model = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"output_schema {spec!r} cannot be imported: {exc}") from exc
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise ValueError(f"output_schema {spec!r} is not a pydantic model class")
    return model


def output_columns(model: type[BaseModel] | None) -> dict[str, PolarsType]:
    """Typed columns for the parsed fields; they must not collide with the result columns."""
    if model is None:
        return {}
    columns = {}
    for name, info in model.model_fields.items():
        if name in RESULT_SCHEMA:
            raise ValueError(f"output schema field '{name}' collides with a result column; rename it")
        columns[name] = _polars_type(info.annotation, info.metadata)
    return columns


def _parsed_cells(parsed: dict[str, Any] | None, parsed_columns: dict[str, Any]) -> dict[str, Any]:
    """The parsed fields as the columns' cells: nested values as JSON text."""
    cells = {}
    for name, dtype in parsed_columns.items():
        value = (parsed or {}).get(name)
        if dtype == pl.String and value is not None and not isinstance(value, str):
            value = json.dumps(value)
        cells[name] = value
    return cells


def rows_to_frame(rows: list[ResultRow], parsed_columns: dict[str, Any]) -> pl.DataFrame:
    """Result rows as one typed frame; parsed fields flattened (nested values as JSON text)."""
    records = [{**row.model_dump(exclude={"parsed"}), **_parsed_cells(row.parsed, parsed_columns)} for row in rows]
    return pl.DataFrame(records, schema={**RESULT_SCHEMA, **parsed_columns})


def unstorable(parsed: dict[str, Any], parsed_columns: dict[str, Any]) -> str | None:
    """Why a validated answer does not fit its typed columns, or None. JSON Schema's `integer` has no
    bound, an Int64 column has: a row journaled with 99999999999999999999 could never become Parquet,
    and every rerun would fail on it before sending anything."""
    try:
        pl.DataFrame([_parsed_cells(parsed, parsed_columns)], schema=parsed_columns)
    except (pl.exceptions.PolarsError, OverflowError, TypeError, ValueError) as exc:
        return " ".join(str(exc).split())[:300]
    return None
