"""The job's settings: one pydantic model and its parts (options, endpoints, SQL input and sink, scale-out hosts)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.settings.fingerprint import ANSWER_FIELDS
from tasks.settings.template import fill_date, template_fields


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
DEFAULT_OLLAMA_MODEL = "gemma3:12b"
DEFAULT_AUTO_CEILING = 16  # 'auto's highest level when neither max_in_flight nor the server's slots are known
DEFAULT_GGUF_LABEL = "gemma-3-270m-q4_k_m"  # the file name of the default GGUF (tasks/inference/backends/llamacpp.py)


class Endpoint(BaseModel):
    """One inference server, one per GPU (a single server spread over several GPUs leaves them mostly idle)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(
        min_length=1,
        description="The server's base URL: Ollama's (http://127.0.0.1:11435) or, for backend 'openai', "
        "the OpenAI-compatible one (http://127.0.0.1:8080/v1).",
    )
    gpu_limit: str | None = Field(
        None,
        pattern=LIMIT_NAME,
        description="Prefect global concurrency limit held per chunk on this endpoint; unset means "
        "'gpu-<host>-<port>' (a loopback host is named after this machine), so every job that uses "
        "the same server shares its limit.",
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


DatabaseUri = Annotated[str, AfterValidator(_uri_without_secrets)]  # a URI with no password in it


class SqlInput(BaseModel):
    """Rows from a database: a query, read once when the job is planned."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: DatabaseUri = Field(
        description="postgresql://user@host:5432/db (password from PGPASSWORD or ${VAR}) or sqlite:///path/file.db."
    )
    query: str = Field(min_length=1, description="SELECT returning the id column and the prompt's columns.")


class SqlSink(BaseModel):
    """A table every finished chunk is upserted into (by id), following the Parquet ledger."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: DatabaseUri = Field(description="Database URI, as for input_sql (no password inside).")
    table: str = Field(
        pattern=r"^([A-Za-z_][A-Za-z0-9_]{0,62}\.)?[A-Za-z_][A-Za-z0-9_]{0,62}$",
        description="Table name, optionally schema.table; created when missing.",
    )


class JobSettings(BaseModel):
    """Everything one batch job needs; unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        "batch",
        pattern=r"^[a-z0-9][a-z0-9-]{0,40}$",
        description="Job name; Prefect artifact keys are derived from it (<name>-progress, -chunks, -report) so "
        "each job keeps its own history.",
    )
    input_path: Path | None = Field(
        None,
        description="Input rows: .parquet, .csv or .jsonl/.ndjson, or an OpenAI batch request file (.jsonl). "
        "Set this or input_sql.",
    )
    input_format: Literal["auto", "table", "openai_batch"] = Field(
        "auto",
        description="'openai_batch': one OpenAI Batch API request per line (custom_id, body.messages); 'auto' "
        "takes a .jsonl whose first line has custom_id and body for one; 'table': rows whose columns fill "
        "prompt_template.",
    )
    input_sql: SqlInput | None = Field(None, description="Read the rows from a database query instead of a file.")
    sink: SqlSink | None = Field(None, description="Also upsert every finished chunk into this database table.")
    openai_output: bool | None = Field(
        None,
        description="Write openai-output.jsonl (OpenAI/vLLM batch output lines); unset: when the input is an "
        "OpenAI batch file.",
    )
    id_column: str = Field(
        "id", min_length=1, description="Column holding a unique, non-null id per row (written as text)."
    )
    prompt_template: str | None = Field(
        None,
        min_length=1,
        description="User message with {column} fields filled from the row, e.g. 'Score this: {text}' ({{ and }} "
        "for literal braces). Required unless the input is an OpenAI batch file.",
    )
    system_prompt: str | None = Field(None, description="Optional system message sent before every prompt.")
    trim_field: str | None = Field(
        None,
        description="A template field cut (and the row flagged `trimmed`) when the prompt would not fit "
        "num_ctx - num_predict; counted with the model's tokenizer on llamacpp, with the server's tokenizer and "
        "chat template on 'openai' where it offers them (llama.cpp, vLLM), a conservative estimate (3 bytes/token) "
        "on Ollama. Unset, an overlong prompt is sent whole and flagged `truncated` if cut.",
    )
    backend: Literal["ollama", "llamacpp", "openai"] = Field(
        "llamacpp",
        description="Inference engine: 'ollama', the embedded 'llamacpp', or 'openai' for any OpenAI-compatible "
        "chat-completions server (vLLM, SGLang, llama.cpp's llama-server, Ollama's /v1).",
    )
    model: str = Field(
        min_length=1,
        description="Model name: the Ollama tag (unset: gemma3:12b); for 'openai' the id the server lists at "
        "GET /v1/models (required); for llamacpp a label, unset the GGUF file's name.",
    )
    ollama_host: str | None = Field(
        None, description="Ollama base URL; unset means $OLLAMA_HOST, then http://127.0.0.1:11434."
    )
    base_url: str | None = Field(
        None, description="Backend 'openai': the API root, e.g. http://127.0.0.1:8000/v1 (key: $OPENAI_API_KEY only)."
    )
    server_slots: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Sequences the server decodes together (OLLAMA_NUM_PARALLEL, vLLM --max-num-seqs), for the "
        "verdict; llama.cpp's server says it itself. Unset and unsaid, the report calls it unknown.",
    )
    endpoints: list[Endpoint] = Field(
        default_factory=list,
        description="Several servers (backend 'ollama' or 'openai'): chunks run on whichever endpoint is free, "
        "each endpoint holding its own GPU limit; a failing endpoint's chunks move to the others. "
        "E.g. [{host: http://127.0.0.1:11434}, {host: http://127.0.0.1:11435}]. Unset: the one server of "
        "ollama_host / base_url, guarded by gpu_limit.",
    )
    model_path: Path | None = Field(
        None,
        description="GGUF file for llamacpp (any GGUF, also one Ollama stored: ~/.ollama/models/blobs/sha256-...); "
        "unset means Gemma 3 270M Q4_K_M from its PyPI package.",
    )
    options: GenerationOptions = Field(
        default_factory=GenerationOptions,
        description="Sampling and runner options, sent identically with every request (a changed runner option "
        "reloads the model in Ollama); see GenerationOptions below.",
    )
    keep_alive: int | str = Field(-1, description="Ollama keep_alive: -1 keeps the model loaded for the whole job.")
    chunk_size: int = Field(5000, ge=1, le=1_000_000, description="Rows per chunk (one Prefect task each).")
    in_flight: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = Field(
        1,
        description="Requests kept in flight inside a chunk (match OLLAMA_NUM_PARALLEL), or 'auto': measure "
        "throughput by level on the real rows (from the level the last run of the job kept, else a quarter of "
        "the ceiling), keep the smallest level within 3 % of the best, and re-probe its neighbours now and then "
        "for the whole run.",
    )
    max_in_flight: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Highest level 'auto' tries (never above the server's slots: server_slots, or what "
        "llama.cpp's server says); unset: the server's slots, else 16.",
    )
    request_timeout_s: float = Field(
        300.0,
        gt=0,
        le=86400,
        description="Total time per request in seconds (the ollama client has none by default).",
    )
    max_attempts: int = Field(3, ge=1, le=20, description="Attempts per row before it becomes an error row.")
    outage_budget_s: float = Field(
        300.0,
        ge=0,
        le=86400,
        description="How long a chunk waits for an unreachable backend before failing, also when the outage "
        "began between two chunks.",
    )
    stall_timeout_s: float = Field(
        1200.0,
        gt=0,
        le=86400,
        description="Watchdog: fail the chunk (for a retry) when no request answers or fails, timeouts aside, for "
        "this long. Never less than max_attempts x request_timeout_s plus the back-offs between them: a row whose "
        "requests all time out ends as an error row first (at 1 in flight nothing else answers meanwhile).",
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
        "value and the report lists each step. Answers do not change for prompts that fit; longer ones are cut and "
        "flagged `truncated`. Unset: stop the chunk with advice instead.",
    )
    chunk_retries: int = Field(
        2,
        ge=0,
        le=20,
        description="Prefect retries of a failed chunk; a retry resumes after the checkpointed rows. With several "
        "endpoints (or hosts): how often a failing endpoint gets work again, after chunk_retry_delay_s.",
    )
    chunk_retry_delay_s: float = Field(60.0, ge=0, le=86400, description="Wait before a chunk retry.")
    output_dir: Path = Field(
        description="Where chunks, results.parquet and manifest.json go; '{date}' becomes the run's scheduled date "
        "(the only placeholder: no format specs or attributes)."
    )
    run_date: date | None = Field(
        None,
        description="The date '{date}' in output_dir stands for; unset: the run's scheduled date (today for a CLI "
        "run). Set it to rerun an unfinished night's directory on a later day: --set run_date=2026-11-26.",
    )
    output_schema: str | None = Field(
        None,
        description="Structured output: a JSON Schema file (.json) or a pydantic model as 'module:Class'.",
    )
    structured_output: Literal["auto", "grammar", "validate"] = Field(
        "auto",
        description="How output_schema is enforced. 'grammar': the schema goes to the engine, which constrains "
        "sampling to it (llama.cpp samples that grammar on the CPU, token by token); 'validate': no grammar, the "
        "schema is stated in the system message and every answer is validated, an invalid one resampled with the "
        "next seed up to max_attempts; 'auto': on a llama.cpp server validate while the first answers match (7 of "
        "the first 8), else the grammar; the grammar on other engines. Changes answers.",
    )
    # Off by default: experimental, and its gain on a 12B model is unmeasured. The one H100 measurement (12.5 s
    # a request with it, 0.64 s without) ran while the server's host prompt cache thrashed: it measured that.
    backend_sampling: Literal["auto", "on", "off"] = Field(
        "off",
        description="llama.cpp's GPU-side sampling (experimental): only the sampled token comes back to the host. "
        "'auto': asked for on a llama.cpp server (its /props answers) for requests without a grammar; 'on': on "
        "every grammar-free request of backend 'openai'; 'off' (the default): never. Never sent with a grammar. "
        "Measure it on your card before turning it on.",
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
    gpus: list[Annotated[int, Field(ge=0)]] | None = Field(
        None,
        min_length=1,
        description="The GPUs this job's engine runs on, by NVML index (nvidia-smi's numbers): the verdict, GPU "
        "figures and energy read only these. Unset: every GPU NVML sees, which misleads on a machine whose other "
        "GPUs are idle or run other work. Every GPU is still sampled into telemetry/samples.parquet.",
    )
    production_rows: int = Field(170_000, ge=1, description="Row count of the full production job, for the ETA.")

    @model_validator(mode="before")
    @classmethod
    def _model_label(cls, data: Any) -> Any:
        # Unset, the model is what actually runs: Ollama's default tag, or the GGUF llamacpp loads
        # (never an Ollama tag on results the embedded model wrote).
        if isinstance(data, dict) and data.get("model") is None:
            if data.get("backend") == "openai":
                raise ValueError("backend 'openai' needs model: the id the server lists at GET <base_url>/models")
            path = data.get("model_path")
            embedded = data.get("backend", "llamacpp") == "llamacpp"
            label = (Path(str(path)).stem if path else DEFAULT_GGUF_LABEL) if embedded else DEFAULT_OLLAMA_MODEL
            data = {**data, "model": label}
        return data

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
    def in_flight_ceiling(self) -> int:
        """Request slots a chunk opens: the fixed level, or the ceiling 'auto' may reach."""
        if self.in_flight != "auto":
            return int(self.in_flight)
        # More in flight than the server has slots only queues: its slots cap 'auto' too.
        caps = [n for n in (self.max_in_flight, self.server_slots) if n]
        return min(*caps, 256) if caps else DEFAULT_AUTO_CEILING

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
        if self.backend != "llamacpp" and self.model_path is not None:
            raise ValueError(f"model_path is set but backend is '{self.backend}' (the server loads its own models)")
        if self.backend != "openai" and self.base_url is not None:
            raise ValueError(f"base_url is set but backend is '{self.backend}' (ollama_host names an Ollama server)")
        if self.backend == "openai":
            if self.ollama_host is not None:
                raise ValueError("ollama_host is set but backend is 'openai': set base_url")
            if self.base_url is None and not self.endpoints:
                raise ValueError("backend 'openai' needs base_url (e.g. http://127.0.0.1:8080/v1) or endpoints")
        if self.backend_sampling == "on" and self.backend != "openai":
            raise ValueError(
                f"backend_sampling 'on' is a llama.cpp server's (backend 'openai'); backend '{self.backend}' "
                "samples on the host"
            )
        if self.oom_num_ctx_floor is not None and self.oom_num_ctx_floor > self.options.num_ctx:
            raise ValueError(
                f"oom_num_ctx_floor {self.oom_num_ctx_floor} is above options.num_ctx {self.options.num_ctx}"
            )
        if self.endpoints:
            if self.backend == "llamacpp":
                raise ValueError("endpoints are servers: set backend: ollama or openai")
            if self.ollama_host is not None or self.base_url is not None:
                raise ValueError("set either ollama_host / base_url (one server) or endpoints (several), not both")
            for what, names in (
                ("host", [e.host.rstrip("/") for e in self.endpoints]),
                ("gpu_limit", [e.limit_name for e in self.endpoints]),
            ):
                if dupes := sorted({n for n in names if names.count(n) > 1}):
                    raise ValueError(f"endpoints: {what} {', '.join(dupes)} is listed twice")
        return self

    def lanes(self) -> list[JobSettings]:
        """One settings object per endpoint (its host and GPU limit), or just this one."""
        url_field = "base_url" if self.backend == "openai" else "ollama_host"
        return [
            self.model_copy(update={url_field: e.host, "gpu_limit": e.limit_name, "endpoints": []})
            for e in self.endpoints
        ] or [self]

    @field_validator("output_dir")
    @classmethod
    def _output_dir_placeholders(cls, value: Path) -> Path:
        fill_date(str(value), "2000-01-01")  # raises ValueError naming what is not allowed
        return value

    def for_run_date(self, day: date) -> JobSettings:
        """Fill `{date}` in output_dir, so a nightly job gets one directory per scheduled day."""
        return self.model_copy(update={"output_dir": Path(fill_date(str(self.output_dir), day.isoformat()))})

    @property
    def ollama_base_url(self) -> str:
        return self.ollama_host or os.environ.get("OLLAMA_HOST") or "http://127.0.0.1:11434"

    @property
    def server_label(self) -> str:
        """Where requests go: the server's URL, or 'embedded' for the in-process model."""
        if self.backend == "ollama":
            return self.ollama_base_url
        if self.backend == "openai":
            return (self.base_url or "").rstrip("/")
        return "embedded"

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
        keyed = self.model_dump(mode="json", include=set(ANSWER_FIELDS))
        if keyed["structured_output"] == "grammar":
            # What every run did before the setting existed: their directories keep their fingerprint.
            del keyed["structured_output"]
        keyed["input"] = input_digest
        keyed["schema"] = schema_json
        return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


class Host(BaseModel):
    """One GPU host: the work queue its worker polls, and settings only it uses."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    queue: str = Field(
        pattern=r"^[a-z0-9][a-z0-9-]{0,40}$",
        description="Work queue of the host's worker (in the shard deployment's pool); names its artifacts and "
        "its default GPU limit.",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Job settings for this host only: ollama_host, endpoints (one per GPU), in_flight, gpu_limit. "
        "Without gpu_limit or endpoints the host's chunks hold the limit 'gpu-<queue>'.",
    )

    def settings_overrides(self) -> dict[str, Any]:
        if "gpu_limit" in self.overrides or "endpoints" in self.overrides:
            return self.overrides
        return {"gpu_limit": f"gpu-{self.queue}", **self.overrides}
