"""The job's input validated and cut into chunks before any request: columns, ids, the pinned snapshot."""

from __future__ import annotations

import csv
import hashlib
import json
import tempfile
from pathlib import Path

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from tasks.io import openai_batch, sources, sql
from tasks.schema import output_columns
from tasks.settings.model import JobSettings
from tasks.storage.files import write_atomic
from tasks.storage.outdir import make_output_dir

FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "ndjson", ".ndjson": "ndjson"}


class InputError(ValueError):
    """The input cannot be used; the message names the file or query, column or row."""


class ChunkSpec(BaseModel):
    """Rows [offset, offset + length) of the input; chunk k is the same rows on every rerun."""

    model_config = ConfigDict(frozen=True)

    index: int
    offset: int
    length: int

    @property
    def name(self) -> str:
        return f"chunk-{self.index:05d}"


class JobPlan(BaseModel):
    """A validated input and its deterministic chunk plan."""

    model_config = ConfigDict(frozen=True)

    total_rows: int
    input_digest: str
    chunks: list[ChunkSpec]
    snapshot: Path = Field(description="The validated rows, read once at planning; every chunk reads these.")
    response_format: str | None = Field(
        None, description="An OpenAI batch file's response_format (JSON), shared by its lines: the output model."
    )
    notes: list[str] = Field(default_factory=list, description="What the input check wants the user to know.")

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


def scan_input(path: Path) -> pl.LazyFrame:
    """A lazy scan of the input; CSV is read as text so prompts show values exactly as written."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"input {path}: unsupported format '{path.suffix}' (use {', '.join(FORMATS)})")
    if (problem := sources.file_problem(path)) is not None:
        raise InputError(problem)
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


def _ragged_csv_lines(path: Path) -> None:
    """Every CSV record must have the header's field count. Polars reads a record with extra
    fields when only some columns are selected and fails on it later, naming no line."""
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, [])
        bad = []
        for record in reader:
            if len(record) != len(header) and record:  # a blank line is no record
                bad.append(f"line {reader.line_num} has {len(record)} fields")
                if len(bad) == 3:
                    break
    if bad:
        raise InputError(f"input {path}: the header has {len(header)} fields but {'; '.join(bad)}")


def _bad_jsonl_line(path: Path, exc: Exception) -> InputError:
    """Polars says "character 15" or "line 0"; find the real line (1-based) and what is wrong with it."""
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as err:
                return InputError(f"input {path}: line {number} is not valid JSON ({err})")
            if not isinstance(value, dict):
                return InputError(f"input {path}: line {number} is a JSON {type(value).__name__}, not an object")
    return InputError(f"input {path} cannot be read: {exc}")


def _write_snapshot(settings: JobSettings, rows: pl.LazyFrame, target: Path) -> None:
    """The id as text and the columns the prompts need (a batch file's messages and options), in input
    order: the run's pinned copy of the input, so a file replaced or edited, or a table updated, during
    the run cannot mix two inputs into one result."""
    wanted = openai_batch.COLUMNS if openai_batch.MESSAGES in rows.collect_schema() else settings.template_fields
    frame = rows.select(pl.col(sources.id_column(settings)).cast(pl.String).alias("__id"), *wanted)
    make_output_dir(target.parent, create=True)
    # Synced before the rename, like every output: shards of one job write the same bytes, whichever lands is right.
    write_atomic(target, frame.sink_parquet)


def snapshot_path(out: Path, digest: str) -> Path:
    return out / f"input-{digest}.parquet"


def _pinned(snapshot: Path) -> bool:
    """A whole snapshot is there. One torn by a crash of an earlier version, or damaged on disk, is made
    again from the input it is named after, instead of failing every rerun on an unreadable file."""
    try:
        pl.read_parquet_schema(snapshot)
    except (pl.exceptions.PolarsError, OSError):
        return False
    return True


def pinned_snapshot(out: Path) -> Path | None:
    """The snapshot of the run that owns `out` (its job.json names the input digest), if any."""
    try:
        digest = json.loads((out / "job.json").read_text(encoding="utf-8")).get("input_digest")
    except (OSError, ValueError):
        return None
    return snapshot_path(out, digest) if digest else None


def job_snapshot(settings: JobSettings) -> Path:
    """The snapshot a chunk reads: the owning run's, or (a chunk run on its own) one pinned now."""
    return pinned_snapshot(settings.output_dir) or validate_input(settings).snapshot


def snapshot_response_format(snapshot: Path) -> str | None:
    """The response_format an OpenAI batch file's snapshot keeps (None for any other input)."""
    if openai_batch.FORMAT not in pl.scan_parquet(snapshot).collect_schema():
        return None
    return pl.scan_parquet(snapshot).select(openai_batch.FORMAT).head(1).collect().item()


def plan_chunks(total_rows: int, chunk_size: int) -> list[ChunkSpec]:
    return [
        ChunkSpec(index=i, offset=offset, length=min(chunk_size, total_rows - offset))
        for i, offset in enumerate(range(0, total_rows, chunk_size))
    ]


_COUNTED = "counted from 1, the header not counted; row_index in the results is one less"
_COUNTED_ROWS = "counted from 1; row_index in the results is one less"  # a query's rows, a batch file's requests


def _rows(indices: list[int]) -> str:
    """0-based row indices as a person counts a file's data rows: `rows 1, 3 and 4`."""
    shown = [str(i + 1) for i in indices]
    return f"row {shown[0]}" if len(shown) == 1 else f"rows {', '.join(shown[:-1])} and {shown[-1]}"


def _check_columns(settings: JobSettings, label: str, columns: list[str]) -> None:
    col = sources.id_column(settings)
    if col not in columns:
        raise InputError(f"input {label}: id column '{col}' not found (columns: {', '.join(columns)})")
    missing = [f for f in settings.template_fields if f not in columns]
    if missing:
        raise InputError(
            f"input {label}: prompt_template uses {', '.join(repr(m) for m in missing)} "
            f"which {'is not a column' if len(missing) == 1 else 'are not columns'} (columns: {', '.join(columns)})"
        )


def _pin_file(settings: JobSettings) -> tuple[str, Path, pl.DataType]:
    """Check a table file's columns and records, snapshot it (named by the file's digest): the
    digest, the snapshot and the id column's type."""
    path = settings.input_path
    assert path is not None  # a table is a file
    scan = scan_input(path)
    fmt = FORMATS[path.suffix.lower()]
    try:
        schema = scan.collect_schema()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise (
            _bad_jsonl_line(path, exc) if fmt == "ndjson" else InputError(f"input {path} cannot be read: {exc}")
        ) from exc
    _check_columns(settings, str(path), schema.names())
    if fmt == "csv":
        _ragged_csv_lines(path)
    digest = file_digest(path)
    snapshot = snapshot_path(settings.output_dir, digest)
    if not _pinned(snapshot):
        try:
            _write_snapshot(settings, scan, snapshot)
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise (
                _bad_jsonl_line(path, exc) if fmt == "ndjson" else InputError(f"input {path} cannot be read: {exc}")
            ) from exc
        if file_digest(path) != digest:
            snapshot.unlink(missing_ok=True)
            raise InputError(f"input {path} changed while it was being read; start the job once it is complete")
    return digest, snapshot, schema[settings.id_column]


def _pin_frame(settings: JobSettings) -> tuple[str, Path, pl.DataType, str | None]:
    """Read a query or an OpenAI batch file whole, check its columns and snapshot it (named by the
    digest of its rows: a rerun whose query returns other rows is refused like a changed file):
    the digest, the snapshot, the id column's type and a batch file's response_format."""
    frame = sources.read_frame(settings)
    _check_columns(settings, settings.input_label, frame.columns)
    digest = sources.frame_digest(frame)
    snapshot = snapshot_path(settings.output_dir, digest)
    if not _pinned(snapshot):
        _write_snapshot(settings, frame.lazy(), snapshot)
    response_format = frame[openai_batch.FORMAT][0] if openai_batch.FORMAT in frame.columns and frame.height else None
    return digest, snapshot, frame.schema[sources.id_column(settings)], response_format


def validate_input(settings: JobSettings, *, pin: bool = True) -> JobPlan:
    """Check every input row before any request (columns, record shapes, ids), and pin the input:
    a snapshot of the rows the prompts need goes into the output directory, read by every chunk.

    `pin=False` checks the same without touching the output directory (the command line's
    pre-flight: a job refused there leaves the directory as it was).
    """
    make_output_dir(settings.output_dir, create=False)  # made with the snapshot, once the input passed
    if not pin:
        with tempfile.TemporaryDirectory(prefix="preflight-") as scratch:
            return validate_input(settings.model_copy(update={"output_dir": Path(scratch)}))
    if settings.input_path is not None and (problem := sources.file_problem(settings.input_path)) is not None:
        raise InputError(problem)  # before what its kind needs: a missing batch file is missing, not template-less
    kind = sources.input_kind(settings)
    try:
        sources.check_template(settings, kind)
        if kind == "table":
            digest, snapshot, dtype = _pin_file(settings)
            response_format = None
        else:
            digest, snapshot, dtype, response_format = _pin_frame(settings)
            model = sources.output_model(settings, response_format)  # an output_schema as well is refused here
    except (sql.SqlError, openai_batch.BatchFileError) as exc:
        raise InputError(str(exc)) from None
    if response_format and not settings.output_schema:
        try:
            output_columns(model)  # a response_format field named like a result column
        except ValueError as exc:
            raise InputError(f"input {settings.input_label}: response_format: {exc}") from None
    path = settings.input_label
    col = sources.id_column(settings)
    counted = _COUNTED if kind == "table" else _COUNTED_ROWS
    ids = pl.scan_parquet(snapshot).select(pl.col("__id").alias(col)).with_row_index("row").collect()
    nulls = ids.filter(pl.col(col).is_null() | (pl.col(col).str.strip_chars() == ""))
    if nulls.height:
        rows = _rows(nulls["row"].head(5).to_list())
        raise InputError(f"input {path}: {nulls.height} row(s) have a null or empty '{col}' (data {rows}; {counted})")
    dupes = ids.filter(pl.col(col).is_duplicated())
    if dupes.height:
        first = dupes.group_by(col, maintain_order=True).agg(pl.col("row")).head(3)
        shown = "; ".join(f"'{r[col]}' at data {_rows(r['row'])}" for r in first.iter_rows(named=True))
        raise InputError(f"input {path}: duplicate ids in '{col}': {shown} ({counted}); ids must be unique")
    if ids.height == 0:
        raise InputError(f"input {path} has no rows")
    notes = []
    if dtype != pl.String:
        example = ids[col][0]
        notes.append(
            f"id column '{col}' holds {dtype} values; they are written as text (the first is '{example}')"
            + ("; use integer or text ids if '.0' is not wanted" if dtype.is_float() else "")
        )
    return JobPlan(
        total_rows=ids.height,
        input_digest=digest,
        chunks=plan_chunks(ids.height, settings.chunk_size),
        snapshot=snapshot,
        response_format=response_format,
        notes=notes,
    )
