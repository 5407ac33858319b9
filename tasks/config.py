"""The job's settings: one pydantic model, loaded from a YAML job file plus overrides."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import string
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class SettingsError(ValueError):
    """A job file or override that cannot run; the message names the file and field."""


class GenerationOptions(BaseModel):
    """Sampling and runner options, sent identically with every request of a job.

    Ollama reloads the model whenever a runner option (num_ctx, ...) changes between
    requests, so these are fixed for the whole job rather than per row.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_ctx: int = Field(4096, ge=256, le=131072, description="Context window in tokens (prompt + answer).")
    num_predict: int = Field(
        256,
        ge=1,
        le=32768,
        description="Most tokens generated per answer. Always set: unset, Ollama can run ~10x num_ctx tokens.",
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature; 0 is greedy.")
    seed: int = Field(
        0, ge=0, le=2**31 - 1, description="Sampling seed; a schema-invalid answer is resampled with seed+1, +2..."
    )
    top_k: int | None = Field(None, ge=1, le=1000, description="Top-k sampling; backend default when unset.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling; backend default when unset.")
    stop: list[str] | None = Field(None, max_length=8, description="Stop sequences.")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Presence penalty; unset: none.")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Frequency penalty; unset: none.")

    retry_temperature: float = Field(
        0.7,
        ge=0.0,
        le=2.0,
        description="Temperature for retries of a schema-invalid answer; a greedy retry would repeat it.",
    )

    def for_request(self, resample: int = 0) -> dict[str, Any]:
        """The `options` of one request. Resampling a schema-invalid answer moves the seed and
        leaves greedy decoding; a retry after a transport failure asks exactly the same again.

        Seed and temperature are sampling options: changing them does not reload the model.
        """
        opts = self.model_dump(exclude_none=True, exclude={"retry_temperature"})
        if resample:
            opts["seed"] = self.seed + resample
            opts["temperature"] = max(self.temperature, self.retry_temperature)
        return opts


LIMIT_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


class Endpoint(BaseModel):
    """One Ollama server (one per GPU: a single Ollama spread over several GPUs leaves them mostly idle)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(min_length=1, description="Ollama base URL, e.g. http://127.0.0.1:11435.")
    gpu_limit: str | None = Field(
        None,
        pattern=LIMIT_NAME,
        description="Prefect global concurrency limit held per chunk on this endpoint; unset means "
        "'gpu-<host>-<port>' (a loopback host is named after this machine), so every job that uses "
        "the same Ollama shares its limit.",
    )

    @property
    def limit_name(self) -> str:
        if self.gpu_limit:
            return self.gpu_limit
        url = urlparse(self.host if "://" in self.host else f"http://{self.host}")
        host = url.hostname or "localhost"
        if host in ("localhost", "127.0.0.1", "::1", "0.0.0.0"):
            host = socket.gethostname()
        return re.sub(r"[^A-Za-z0-9_.-]", "-", f"gpu-{host}-{url.port or 11434}")[:64]


_SECRET_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _uri_without_secrets(value: str) -> str:
    """Refuse a database URI that carries a password: it would land in parameters, job.json and
    the manifest. The password comes from the environment (PGPASSWORD, or a ${VAR} reference)."""
    parsed = urlparse(value)
    if parsed.scheme not in ("postgresql", "postgres", "sqlite"):
        raise ValueError(f"database URI must start with postgresql:// or sqlite:///, not {parsed.scheme or value!r}")
    password = parsed.password
    query_password = re.search(r"(?:^|&)password=([^&]*)", parsed.query)
    for found in (password, query_password.group(1) if query_password else None):
        if found and not _SECRET_REF.fullmatch(found):
            raise ValueError(
                "the database URI holds a password: leave it out and set PGPASSWORD in the environment, "
                "or write ${SOME_VAR} in its place"
            )
    return value


class SqlInput(BaseModel):
    """Rows from a database: a query, read once when the job is planned."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str = Field(
        description="postgresql://user@host:5432/db (password from PGPASSWORD or ${VAR}) or sqlite:///path/file.db."
    )
    query: str = Field(min_length=1, description="SELECT returning the id column and the prompt's columns.")

    @field_validator("uri")
    @classmethod
    def _no_password(cls, value: str) -> str:
        return _uri_without_secrets(value)


class SqlSink(BaseModel):
    """A table every finished chunk is upserted into (by id), following the Parquet ledger."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str = Field(description="Database URI, as for input_sql (no password inside).")
    table: str = Field(
        pattern=r"^([A-Za-z_][A-Za-z0-9_]{0,62}\.)?[A-Za-z_][A-Za-z0-9_]{0,62}$",
        description="Table name, optionally schema.table; created when missing.",
    )

    @field_validator("uri")
    @classmethod
    def _no_password(cls, value: str) -> str:
        return _uri_without_secrets(value)


class JobSettings(BaseModel):
    """Everything one batch job needs; unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        "batch",
        pattern=r"^[a-z0-9][a-z0-9-]{0,40}$",
        description="Job name; Prefect artifact keys are derived from it so each job keeps its own history.",
    )
    input_path: Path | None = Field(
        None, description="Input rows: .parquet, .csv or .jsonl/.ndjson, or an OpenAI batch request file (.jsonl)."
    )
    input_format: Literal["auto", "table", "openai_batch"] = Field(
        "auto",
        description="'openai_batch': one OpenAI Batch API request per line (custom_id, body.messages); 'auto' "
        "detects it from the first line of a .jsonl file; 'table': rows whose columns fill prompt_template.",
    )
    input_sql: SqlInput | None = Field(None, description="Read the rows from a database query instead of a file.")
    sink: SqlSink | None = Field(None, description="Also upsert every finished chunk into this database table.")
    openai_output: bool | None = Field(
        None,
        description="Write openai-output.jsonl (OpenAI/vLLM batch output lines); unset: when the input is an "
        "OpenAI batch file.",
    )
    id_column: str = Field("id", min_length=1, description="Column holding a unique, non-null id per row.")
    prompt_template: str | None = Field(
        None,
        min_length=1,
        description="User message with {column} fields filled from the row, e.g. 'Score this: {text}'.",
    )
    system_prompt: str | None = Field(None, description="Optional system message sent before every prompt.")
    trim_field: str | None = Field(
        None,
        description="A template field cut (and the row flagged `trimmed`) when the prompt would not fit "
        "num_ctx - num_predict; unset, an overlong prompt is sent whole and flagged `truncated` if cut.",
    )
    backend: Literal["ollama", "llamacpp"] = Field("llamacpp", description="Inference engine.")
    model: str = Field("gemma3:12b", min_length=1, description="Model name (Ollama tag; a label for llamacpp).")
    ollama_host: str | None = Field(
        None, description="Ollama base URL; unset means $OLLAMA_HOST, then http://127.0.0.1:11434."
    )
    endpoints: list[Endpoint] = Field(
        default_factory=list,
        description="Several Ollama servers (backend 'ollama'): chunks run on whichever endpoint is free, "
        "each endpoint holding its own GPU limit; a failing endpoint's chunks move to the others. "
        "Unset: the one server of ollama_host, guarded by gpu_limit.",
    )
    model_path: Path | None = Field(
        None, description="GGUF file for llamacpp; unset means Gemma 3 270M Q4_K_M from its PyPI package."
    )
    options: GenerationOptions = Field(default_factory=GenerationOptions, description="Generation options.")
    keep_alive: int | str = Field(-1, description="Ollama keep_alive: -1 keeps the model loaded for the whole job.")
    chunk_size: int = Field(5000, ge=1, le=1_000_000, description="Rows per chunk (one Prefect task each).")
    in_flight: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = Field(
        1,
        description="Requests kept in flight inside a chunk (match OLLAMA_NUM_PARALLEL), or 'auto': measure "
        "throughput at 1, 2, 4 ... on the first rows and keep the smallest level within 3 % of the best.",
    )
    max_in_flight: int = Field(16, ge=1, le=256, description="Highest level 'auto' tries.")
    request_timeout_s: float = Field(300.0, gt=0, le=86400, description="Per-request timeout in seconds.")
    max_attempts: int = Field(3, ge=1, le=20, description="Attempts per row before it becomes an error row.")
    outage_budget_s: float = Field(
        300.0, ge=0, le=86400, description="How long a chunk waits for an unreachable backend before failing."
    )
    stall_timeout_s: float = Field(
        900.0,
        gt=0,
        le=86400,
        description="Watchdog: fail the chunk (for a retry) when no request answers or fails for this long; "
        "keep it above request_timeout_s so single hung requests are retried first.",
    )
    oom_backoff_s: float = Field(
        5.0, ge=0, le=600, description="First wait after an out-of-memory answer (doubles per attempt, max 30 s)."
    )
    oom_num_ctx_floor: int | None = Field(
        None,
        ge=256,
        le=131072,
        description="Ollama: when out-of-memory persists at 1 in flight, halve options.num_ctx (the model reloads "
        "with a smaller KV cache) down to this floor before giving up; the rest of the run keeps the lowered "
        "value and the report lists each step. Unset: stop the chunk with advice instead.",
    )
    chunk_retries: int = Field(2, ge=0, le=20, description="Prefect retries of a chunk whose backend went away.")
    chunk_retry_delay_s: float = Field(60.0, ge=0, le=86400, description="Wait before a chunk retry.")
    output_dir: Path = Field(
        description="Where chunks, results.parquet and manifest.json go; '{date}' becomes the run's scheduled date."
    )
    output_schema: str | None = Field(
        None,
        description="Structured output: a JSON Schema file (.json) or a pydantic model as 'module:Class'.",
    )
    gpu_limit: str = Field(
        "gpu", pattern=LIMIT_NAME, description="Prefect global concurrency limit held per chunk (one endpoint)."
    )
    slot_timeout_s: float = Field(
        6 * 3600.0, gt=0, description="How long a chunk waits for the GPU slot before failing with a clear message."
    )
    checkpoint_rows: int = Field(256, ge=1, le=100_000, description="Finished rows buffered before a checkpoint file.")
    checkpoint_every_s: float = Field(2.0, gt=0, le=3600, description="Longest time finished rows stay in memory only.")
    telemetry_interval_s: float = Field(1.0, ge=0.05, le=60, description="GPU/host sampling interval.")
    production_rows: int = Field(170_000, ge=1, description="Row count of the full production job, for the ETA.")

    @field_validator("prompt_template")
    @classmethod
    def _template_parses(cls, value: str | None) -> str | None:
        if value is not None:
            template_fields(value)  # raises ValueError with the reason
        return value

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive_form(cls, value: int | str) -> int | str:
        # Ollama parses strings as Go durations ("10m", "1h30m") or plain seconds.
        if isinstance(value, str) and not re.fullmatch(r"-?\d+|(\d+(\.\d+)?(ms|s|m|h))+", value):
            raise ValueError("keep_alive must be seconds (-1 = forever) or a duration like '10m', '1h30m'")
        return value

    @property
    def workers(self) -> int:
        """Request slots a chunk opens: the fixed level, or the ceiling 'auto' may reach."""
        return self.max_in_flight if self.in_flight == "auto" else int(self.in_flight)

    @model_validator(mode="after")
    def _backend_fields(self) -> JobSettings:
        if (self.input_path is None) == (self.input_sql is None):
            raise ValueError("set exactly one of input_path (a file) and input_sql (a database query)")
        if self.input_sql is not None and self.input_format == "openai_batch":
            raise ValueError("input_format 'openai_batch' reads a file: set input_path")
        batch_possible = (
            self.input_format != "table"
            and self.input_path is not None
            and (self.input_path.suffix.lower() in (".jsonl", ".ndjson"))
        )
        if self.prompt_template is None and not batch_possible:
            # Only an OpenAI batch file brings its own messages; whether a .jsonl is one is seen when it is read.
            raise ValueError("prompt_template is required: the user message, with {column} fields from the row")
        if self.trim_field is not None and self.trim_field not in self.template_fields:
            raise ValueError(f"trim_field '{self.trim_field}' is not a field of prompt_template")
        if self.backend == "llamacpp" and self.ollama_host is not None:
            raise ValueError("ollama_host is set but backend is 'llamacpp'")
        if self.backend == "ollama" and self.model_path is not None:
            raise ValueError("model_path is set but backend is 'ollama' (Ollama loads its own models)")
        if self.oom_num_ctx_floor is not None and self.oom_num_ctx_floor > self.options.num_ctx:
            raise ValueError(
                f"oom_num_ctx_floor {self.oom_num_ctx_floor} is above options.num_ctx {self.options.num_ctx}"
            )
        if self.endpoints:
            if self.backend != "ollama":
                raise ValueError("endpoints are Ollama servers: set backend: ollama")
            if self.ollama_host is not None:
                raise ValueError("set either ollama_host (one server) or endpoints (several), not both")
            for what, names in (
                ("host", [e.host.rstrip("/") for e in self.endpoints]),
                ("gpu_limit", [e.limit_name for e in self.endpoints]),
            ):
                if dupes := sorted({n for n in names if names.count(n) > 1}):
                    raise ValueError(f"endpoints: {what} {', '.join(dupes)} is listed twice")
        return self

    def lanes(self) -> list[JobSettings]:
        """One settings object per endpoint (its host and GPU limit), or just this one."""
        return [
            self.model_copy(update={"ollama_host": e.host, "gpu_limit": e.limit_name, "endpoints": []})
            for e in self.endpoints
        ] or [self]

    @field_validator("output_dir")
    @classmethod
    def _output_dir_placeholders(cls, value: Path) -> Path:
        try:
            str(value).format(date="2000-01-01")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"output_dir may only use the {{date}} placeholder ({exc!r})") from exc
        return value

    def for_run_date(self, day: date) -> JobSettings:
        """Fill `{date}` in output_dir, so a nightly job gets one directory per scheduled day."""
        return self.model_copy(update={"output_dir": Path(str(self.output_dir).format(date=day.isoformat()))})

    @property
    def ollama_base_url(self) -> str:
        return self.ollama_host or os.environ.get("OLLAMA_HOST") or "http://127.0.0.1:11434"

    @property
    def template_fields(self) -> list[str]:
        return template_fields(self.prompt_template) if self.prompt_template else []

    @property
    def input_label(self) -> str:
        """Where the rows come from, for messages and the manifest (a URI never holds a password)."""
        if self.input_sql is not None:
            query = " ".join(self.input_sql.query.split())
            return f"query '{query if len(query) <= 120 else query[:117] + '...'}' on {self.input_sql.uri}"
        return str(self.input_path)

    def answer_fingerprint(self, input_digest: str, schema_json: str | None) -> str:
        """Hash of everything that changes the answers, so a rerun never mixes two configurations."""
        keyed = self.model_dump(
            mode="json",
            include={
                "trim_field",
                "id_column",
                "prompt_template",
                "system_prompt",
                "backend",
                "model",
                "model_path",
                "options",
                "chunk_size",
            },
        )
        keyed["input"] = input_digest
        keyed["schema"] = schema_json
        return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def template_fields(template: str) -> list[str]:
    """The {column} names a prompt template uses, in order, each once."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(
            f"prompt_template is not a valid template ({exc}); write literal braces as {{{{ and }}}}"
        ) from exc
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if not name or any(c in name for c in ".[]"):
            raise ValueError(f"prompt_template field {{{name}}} must name a column, e.g. {{text}}")
        if spec or conv:
            raise ValueError(f"prompt_template field {{{name}}} may not use format specs or conversions")
        if name not in names:
            names.append(name)
    return names


def merge_overrides(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_overrides(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(job_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> JobSettings:
    """Read a YAML job file, apply overrides (nested dicts merge), validate.

    Relative paths stay relative to the working directory, which a deployment's pull step
    sets to the project root.
    """
    data: dict[str, Any] = {}
    source = "overrides"
    if job_file is not None:
        path = Path(job_file)
        source = str(path)
        if not path.is_file():
            raise SettingsError(f"job file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise SettingsError(f"job file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise SettingsError(f"job file {path} must hold a mapping of settings, not {type(loaded).__name__}")
        data = loaded or {}
        source = str(path)
    data = merge_overrides(data, overrides or {})
    try:
        return JobSettings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(settings)'}: {err['msg']}" for err in exc.errors()
        )
        # `from None`: pydantic's own text repeats each input value, and a refused URI may hold a password.
        raise SettingsError(f"invalid job settings in {source}: {problems}") from None
