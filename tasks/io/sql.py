"""SQL in and out through ADBC: a query read once into Polars, and a table each finished chunk is upserted into.

ADBC, not connectorx (measured, README "Read from and write to a database"): about as fast on a
170,000-row table, and libpq's own rules apply, so PGPASSWORD, ~/.pgpass and sslmode work and a
wrong password fails in milliseconds instead of after connectorx's 30 s of pool retries.
The password never sits in the settings: a URI holds no password or a ${VAR} reference, expanded
here, at connect time, and scrubbed from every message.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl

from tasks.settings.model import SqlInput, SqlSink

CONNECT_TIMEOUT_S = 10
_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class SqlError(RuntimeError):
    """A database cannot be used as configured; the message names the URI (never a password), query or column."""


def _expand(uri: str) -> tuple[str, list[str]]:
    """The URI with ${VAR} references filled from the environment, and the secrets to scrub."""
    secrets: list[str] = []

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise SqlError(f"{uri}: environment variable {name} is not set")
        secrets.append(os.environ[name])
        return os.environ[name]

    expanded = _REF.sub(fill, uri)
    if os.environ.get("PGPASSWORD"):
        secrets.append(os.environ["PGPASSWORD"])
    return expanded, [s for s in secrets if s]


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def dialect(uri: str) -> str:
    return "sqlite" if uri.startswith("sqlite:") else "postgresql"


def sqlite_path(uri: str) -> Path:
    """sqlite:///relative.db and sqlite:////absolute.db, as SQLAlchemy spells them."""
    return Path(uri.removeprefix("sqlite://").removeprefix("/"))


@contextmanager
def connect(uri: str, *, must_exist: bool = True) -> Iterator[Any]:
    """An ADBC DB-API connection (autocommit off: one transaction until commit)."""
    expanded, secrets = _expand(uri)
    try:
        if dialect(uri) == "sqlite":
            import adbc_driver_sqlite.dbapi as sqlite_driver

            path = sqlite_path(uri)
            if must_exist and not path.is_file():
                raise SqlError(f"{uri}: SQLite file {path} does not exist")
            conn = sqlite_driver.connect(str(path))
        else:
            import adbc_driver_postgresql.dbapi as postgres_driver  # type: ignore[import-untyped]

            if "connect_timeout=" not in expanded:  # libpq waits forever on a host that does not answer
                expanded += ("&" if "?" in expanded else "?") + f"connect_timeout={CONNECT_TIMEOUT_S}"
            conn = postgres_driver.connect(expanded)
    except SqlError:
        raise
    except Exception as exc:  # each driver raises its own error types
        raise SqlError(f"cannot connect to {uri}: {_scrub(_first_line(exc), secrets)}") from None
    try:
        yield conn
    finally:
        conn.close()


def read_query(source: SqlInput) -> pl.DataFrame:
    """The query's rows as one frame: read once, when the job is planned."""
    with connect(source.uri) as conn:
        try:
            return pl.read_database(source.query, conn)
        except Exception as exc:
            _, secrets = _expand(source.uri)
            raise SqlError(
                f"input_sql query failed on {source.uri}: {_scrub(_first_line(exc), secrets)} (query: {source.query})"
            ) from None


# ----------------------------------------------------------------------------------------- sink
# Column types per dialect, and the existing column types a column may be written into.
_PG_TYPES: dict[Any, tuple[str, set[str]]] = {
    pl.String: ("text", {"text", "character varying"}),
    pl.Int16: ("smallint", {"smallint", "integer", "bigint"}),
    pl.Int32: ("integer", {"integer", "bigint"}),
    pl.Int64: ("bigint", {"bigint"}),
    pl.Float64: ("double precision", {"double precision"}),
    pl.Boolean: ("boolean", {"boolean"}),
    pl.Datetime: ("timestamp with time zone", {"timestamp with time zone"}),
}
# SQLite keeps a declared type's affinity only: that is what must match.
_SQLITE_TYPES: dict[Any, tuple[str, set[str]]] = {
    pl.String: ("TEXT", {"TEXT"}),
    pl.Int16: ("INTEGER", {"INTEGER"}),
    pl.Int32: ("INTEGER", {"INTEGER"}),
    pl.Int64: ("INTEGER", {"INTEGER"}),
    pl.Float64: ("REAL", {"REAL"}),
    pl.Boolean: ("INTEGER", {"INTEGER"}),
    pl.Datetime: ("TEXT", {"TEXT"}),  # ISO 8601 in UTC
}


def _sqlite_affinity(declared: str) -> str:
    """SQLite's affinity rules (section 3.1 of its datatype page), in their order."""
    upper = declared.upper()
    if "INT" in upper:
        return "INTEGER"
    if any(k in upper for k in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if "BLOB" in upper or not upper:
        return "BLOB"
    if any(k in upper for k in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _table_ref(table: str) -> str:
    return ".".join(_quote(part) for part in table.split("."))


class TableSink:
    """Upserts finished chunks into one table, keyed by `id`, one transaction per chunk."""

    def __init__(self, sink: SqlSink, columns: dict[str, Any]) -> None:
        self.sink = sink
        self.columns = columns  # name -> Polars type: the result schema with the parsed fields
        self.dialect = dialect(sink.uri)
        self.types = _SQLITE_TYPES if self.dialect == "sqlite" else _PG_TYPES
        self.key = hashlib.sha256(f"{sink.uri}\n{sink.table}".encode()).hexdigest()[:12]

    def _sql_type(self, dtype: Any) -> tuple[str, set[str]]:
        return self.types[pl.Datetime if isinstance(dtype, pl.Datetime) or dtype == pl.Datetime else dtype]

    def _existing(self, cur: Any) -> list[dict[str, Any]]:
        """Columns of the table as it is now (empty when it does not exist)."""
        schema, _, name = self.sink.table.rpartition(".")
        if self.dialect == "sqlite":
            cur.execute(f"PRAGMA {_quote(schema) + '.' if schema else ''}table_info({_quote(name)})")
            return [
                {"name": r[1], "type": _sqlite_affinity(r[2]), "declared": r[2], "not_null": bool(r[3]),
                 "default": r[4], "pk": bool(r[5])}
                for r in cur.fetchall()
            ]  # fmt: skip
        in_schema = f"'{schema}'" if schema else "current_schema()"
        cur.execute(
            "SELECT c.column_name, c.data_type, c.is_nullable = 'NO', c.column_default, c.character_maximum_length, "
            "EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = i.indkey[0] WHERE i.indrelid = (quote_ident(c.table_schema) || '.' || "
            "quote_ident(c.table_name))::regclass AND i.indisunique AND i.indnkeyatts = 1 "
            "AND a.attname = c.column_name) "
            f"FROM information_schema.columns c WHERE c.table_schema = {in_schema} AND c.table_name = '{name}' "
            "ORDER BY c.ordinal_position"
        )
        return [
            {"name": r[0], "type": r[1], "declared": r[1] + (f"({r[4]})" if r[4] else ""), "not_null": bool(r[2]),
             "default": r[3], "pk": bool(r[5]), "limited": r[4] is not None}
            for r in cur.fetchall()
        ]  # fmt: skip

    def _incompatibility(self, existing: list[dict[str, Any]]) -> str | None:
        found = {c["name"]: c for c in existing}
        if "id" not in found or not found["id"]["pk"]:
            return "column 'id' must be its primary key (or a unique key) so rows are upserted by id"
        for name, dtype in self.columns.items():
            wanted, accepted = self._sql_type(dtype)
            column = found.get(name)
            if column is None:
                return f"column '{name}' is missing (it would hold {wanted})"
            if column["type"] not in accepted or column.get("limited"):
                return f"column '{name}' is {column['declared']}, results need {wanted}"
        for column in existing:
            if column["name"] not in self.columns and column["not_null"] and column["default"] is None:
                return f"column '{column['name']}' is NOT NULL without a default, and the results do not fill it"
        return None

    def prepare(self, *, create: bool = True) -> None:
        """Before the first request: reach the database, create the table (`create`) or refuse an incompatible one."""
        if self.dialect == "sqlite" and not (path := sqlite_path(self.sink.uri)).is_file():
            if not path.parent.is_dir():  # SQLite makes the file, not its folder (ADBC then says "out of memory")
                raise SqlError(f"sink {self.sink.uri}: the folder {path.parent} does not exist")
            if not create:
                return  # nothing to check yet, and connecting would create the file
        with connect(self.sink.uri, must_exist=False) as conn:
            cur = conn.cursor()
            try:
                existing = self._existing(cur)
                if existing:
                    if problem := self._incompatibility(existing):
                        raise SqlError(
                            f"sink table {self.sink.table} on {self.sink.uri} cannot take the results: {problem}. "
                            "Alter or drop it, or name another table"
                        )
                    return
                if not create:
                    return
                columns = ", ".join(
                    f"{_quote(n)} {self._sql_type(t)[0]}{' PRIMARY KEY' if n == 'id' else ''}"
                    for n, t in self.columns.items()
                )
                cur.execute(f"CREATE TABLE IF NOT EXISTS {_table_ref(self.sink.table)} ({columns})")
                conn.commit()
            except SqlError:
                raise
            except Exception as exc:
                raise SqlError(
                    f"sink table {self.sink.table} on {self.sink.uri}: {_scrub(_first_line(exc), _expand(self.sink.uri)[1])}"
                ) from None
            finally:
                cur.close()

    def upsert(self, frame: pl.DataFrame) -> int:
        """Insert or update every row of `frame` by id, all in one transaction."""
        frame = frame.select(list(self.columns))
        if self.dialect == "sqlite":
            frame = frame.with_columns(
                pl.col(pl.Datetime).dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ"), pl.col(pl.Boolean).cast(pl.Int64)
            )
        names = ", ".join(_quote(n) for n in self.columns)
        updates = ", ".join(f"{_quote(n)} = excluded.{_quote(n)}" for n in self.columns if n != "id")
        with connect(self.sink.uri, must_exist=False) as conn:
            cur = conn.cursor()
            try:
                cur.adbc_ingest("batch_sink_stage", frame.to_arrow(), mode="create", temporary=True)
                # `WHERE true` keeps SQLite from reading ON CONFLICT as part of a join.
                cur.execute(
                    f"INSERT INTO {_table_ref(self.sink.table)} ({names}) SELECT {names} FROM batch_sink_stage "
                    f"WHERE true ON CONFLICT (id) DO UPDATE SET {updates}"
                )
                cur.execute("DROP TABLE batch_sink_stage")
                conn.commit()
            except Exception as exc:
                raise SqlError(
                    f"upsert into {self.sink.table} on {self.sink.uri} failed: "
                    f"{_scrub(_first_line(exc), _expand(self.sink.uri)[1])}"
                ) from None
            finally:
                cur.close()
        return frame.height
