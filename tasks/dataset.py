"""Read and validate the input with Polars, plan chunks, and render each row's prompt."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict

from tasks import sources
from tasks.config import JobSettings

FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "ndjson", ".ndjson": "ndjson"}


class InputError(ValueError):
    """The input cannot be used; the message names the file or query, column or row."""


class ChunkSpec(BaseModel):
    """Rows [offset, offset + length) of the input; chunk k is the same rows on every rerun."""

    model_config = ConfigDict(frozen=True)

    index: int
    offset: int
    length: int
    source: str | None = None  # the input snapshot the rows come from (queries, OpenAI batch files)

    @property
    def name(self) -> str:
        return f"chunk-{self.index:05d}"


class JobPlan(BaseModel):
    """A validated input and its deterministic chunk plan."""

    model_config = ConfigDict(frozen=True)

    total_rows: int
    input_digest: str
    chunks: list[ChunkSpec]

    def shard(self, indices: list[int]) -> JobPlan:
        """The part of the plan one host runs: chunks by index, in the order given."""
        if not indices:
            raise InputError("a shard needs at least one chunk index")
        bad = [i for i in indices if not 0 <= i < len(self.chunks)]
        if bad or len(set(indices)) != len(indices):
            raise InputError(
                f"shard chunk indices {indices} must be distinct and in 0..{len(self.chunks) - 1} "
                "(the parent and this run must read the same input and chunk_size)"
            )
        chunks = [self.chunks[i] for i in indices]
        return self.model_copy(update={"chunks": chunks, "total_rows": sum(c.length for c in chunks)})


class PreparedRow(BaseModel):
    """One input row ready to send: its messages, or the reason it cannot be sent."""

    row_index: int
    id: str
    messages: list[dict[str, str]] | None = None
    options: dict[str, Any] | None = None  # this row's own sampling settings (an OpenAI batch line's body)
    error: str | None = None
    trimmed: bool = False


TokenCounter = Callable[[str], int]
TEMPLATE_TOKENS = 16  # chat-template markers around the messages
TRIM_MARK = " …[trimmed]"


def estimate_tokens(text: str) -> int:
    """A deliberately high token count when no tokenizer is at hand: 3 UTF-8 bytes per token
    (Gemma averages ~4 characters per token on English), so a trimmed prompt fits for sure."""
    return len(text.encode("utf-8")) // 3 + 1


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
    budget = settings.options.num_ctx - settings.options.num_predict - TEMPLATE_TOKENS

    def cut(keep: int) -> list[dict[str, str]]:
        return _render(settings, {**values, field: values[field][:keep] + TRIM_MARK})  # type: ignore[index]

    def fits(candidate: list[dict[str, str]]) -> bool:
        return sum(count(m["content"]) for m in candidate) <= budget

    if field is None or fits(messages):
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


def scan_input(path: Path) -> pl.LazyFrame:
    """A lazy scan of the input; CSV is read as text so prompts show values exactly as written."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"input {path}: unsupported format '{path.suffix}' (use {', '.join(FORMATS)})")
    if not path.is_file():
        raise InputError(f"input {path} does not exist")
    if fmt == "parquet":
        return pl.scan_parquet(path)
    if fmt == "csv":
        # Lossy decoding turns invalid UTF-8 bytes into U+FFFD instead of failing the whole job.
        return pl.scan_csv(path, infer_schema=False, encoding="utf8-lossy")
    return pl.scan_ndjson(path, infer_schema_length=None)


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes: a changed input must not resume into old answers."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()[:16]


def plan_chunks(total_rows: int, chunk_size: int, source: str | None = None) -> list[ChunkSpec]:
    return [
        ChunkSpec(index=i, offset=offset, length=min(chunk_size, total_rows - offset), source=source)
        for i, offset in enumerate(range(0, total_rows, chunk_size))
    ]


def _open(settings: JobSettings) -> tuple[pl.LazyFrame, str | None, str | None]:
    """The rows to validate, the digest of a frame read whole (None: hash the file), and its snapshot."""
    kind = sources.input_kind(settings)
    try:
        sources.check_template(settings, kind)
        if kind == "table":
            assert settings.input_path is not None
            return scan_input(settings.input_path), None, None
        frame = sources.read_frame(settings)
    except (sources.sql.SqlError, sources.openai_batch.BatchFileError) as exc:
        raise InputError(str(exc)) from None
    digest = sources.frame_digest(frame)
    return frame.lazy(), digest, str(sources.snapshot(settings, frame, digest))


def validate_input(settings: JobSettings) -> JobPlan:
    """Check the input before any request: columns present, ids unique and non-null."""
    path = settings.input_label
    scan, digest, snapshot = _open(settings)
    try:
        columns = scan.collect_schema().names()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputError(f"input {path} cannot be read: {exc}") from exc
    col = sources.id_column(settings)
    if col not in columns:
        raise InputError(f"input {path}: id column '{col}' not found (columns: {', '.join(columns)})")
    missing = [f for f in settings.template_fields if f not in columns]
    if missing:
        raise InputError(
            f"input {path}: prompt_template uses {', '.join(repr(m) for m in missing)} "
            f"which {'is not a column' if len(missing) == 1 else 'are not columns'} (columns: {', '.join(columns)})"
        )
    try:
        ids = scan.select(pl.col(col).cast(pl.String)).with_row_index("row").collect()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputError(f"input {path} cannot be read: {exc}") from exc
    nulls = ids.filter(pl.col(col).is_null() | (pl.col(col).str.strip_chars() == ""))
    if nulls.height:
        rows = ", ".join(str(r) for r in nulls["row"].head(5).to_list())
        raise InputError(
            f"input {path}: {nulls.height} row(s) have a null or empty '{col}' (rows {rows}; first row is 0)"
        )
    dupes = ids.filter(pl.col(col).is_duplicated())
    if dupes.height:
        first = dupes.group_by(col, maintain_order=True).agg(pl.col("row")).head(3)
        shown = "; ".join(f"'{r[col]}' at rows {r['row']}" for r in first.iter_rows(named=True))
        raise InputError(f"input {path}: duplicate ids in '{col}': {shown}")
    if ids.height == 0:
        raise InputError(f"input {path} has no rows")
    return JobPlan(
        total_rows=ids.height,
        input_digest=digest or file_digest(settings.input_path),  # type: ignore[arg-type]
        chunks=plan_chunks(ids.height, settings.chunk_size, snapshot),
    )


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text if text.strip() else None


def prepare_chunk(
    settings: JobSettings,
    chunk: ChunkSpec,
    skip: set[int] | frozenset[int] = frozenset(),
    count_tokens: TokenCounter | None = None,
) -> list[PreparedRow]:
    """Read one chunk's rows (only the columns the prompt needs) and render their messages.

    Values are substituted with str.format, which never re-parses them: braces or
    instructions inside the data stay data. Rows with a null or empty field are not
    sent; they become error rows.
    """
    fields = settings.template_fields
    batch = sources.input_kind(settings) == "openai_batch"
    wanted = [sources.openai_batch.MESSAGES, sources.openai_batch.OPTIONS] if batch else fields
    scan = pl.scan_parquet(chunk.source) if chunk.source else scan_input(settings.input_path)  # type: ignore[arg-type]
    frame = (
        scan.with_row_index("__row")
        .slice(chunk.offset, chunk.length)
        .select("__row", pl.col(sources.id_column(settings)).cast(pl.String).alias("__id"), *wanted)
        .collect()
    )
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
        messages, trimmed = _fit(settings, values, count_tokens or estimate_tokens)  # type: ignore[arg-type]
        prepared.append(PreparedRow(row_index=row_index, id=record["__id"], messages=messages, trimmed=trimmed))
    return prepared
