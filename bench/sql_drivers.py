"""Measure Polars reading a 170,000-row table of short records from PostgreSQL: ADBC vs connectorx.

    python -m bench.sql_drivers [--rows 170000] [--repeats 7]

Starts a throw-away PostgreSQL (harness/postgres_server.py), prints one JSON document: median and
best seconds per engine (first call, which loads the driver, reported apart), and how long each
takes to report a wrong password.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import polars as pl

from harness.postgres_server import PASSWORD, PostgresServer

QUERY = "SELECT id, text, role, years FROM candidates ORDER BY id"


def _time(call: Any) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=170_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with PostgresServer() as pg:
        pg.sql(
            "CREATE TABLE candidates AS SELECT 'r' || lpad(g::text, 6, '0') AS id, "
            "'candidate ' || g || ' writes Python and SQL, ' || (g % 20) || ' years in data engineering' AS text, "
            f"'data engineer' AS role, g % 20 AS years FROM generate_series(1, {args.rows}) g"
        )
        os.environ["PGPASSWORD"] = PASSWORD
        # connectorx ignores PGPASSWORD: it needs the password inside the URI.
        uris = {"adbc": pg.uri(), "connectorx": pg.uri().replace("scorer@", f"scorer:{PASSWORD}@")}
        result: dict[str, Any] = {"rows": args.rows, "repeats": args.repeats, "engines": {}}
        for engine, uri in uris.items():
            first = _time(lambda e=engine, u=uri: pl.read_database_uri(QUERY, u, engine=e))
            runs = [
                _time(lambda e=engine, u=uri: pl.read_database_uri(QUERY, u, engine=e)) for _ in range(args.repeats)
            ]
            result["engines"][engine] = {
                "first_s": round(first, 3),
                "median_s": round(statistics.median(runs), 3),
                "best_s": round(min(runs), 3),
            }
        # The sink's cost per chunk: one 5,000-row chunk of result rows upserted (insert, then update).
        from datetime import UTC, datetime

        from tasks.io.sql import TableSink
        from tasks.settings.model import SqlSink

        from tasks.schema import RESULT_SCHEMA, ResultRow, rows_to_frame

        now = datetime.now(UTC)
        rows = [
            ResultRow(row_index=i, id=f"r{i:06d}", chunk=0, status="ok", attempts=1, response='{"score": 3}' * 8,
                      model="gemma3:12b", finished_at=now, prompt_tokens=300, completion_tokens=40)
            for i in range(5000)
        ]  # fmt: skip
        frame = rows_to_frame(rows, {})
        sink = TableSink(SqlSink(uri=pg.uri(), table="bench_scores"), dict(RESULT_SCHEMA))
        sink.prepare()
        result["upsert_5000_rows_s"] = {
            "insert": round(_time(lambda: sink.upsert(frame)), 3),
            "update": round(statistics.median(_time(lambda: sink.upsert(frame)) for _ in range(args.repeats)), 3),
        }
        bad = {
            "adbc": pg.uri().replace("scorer@", "scorer:wrong@"),
            "connectorx": uris["connectorx"].replace(PASSWORD, "wrong"),
        }
        for engine, uri in bad.items():
            started = time.perf_counter()
            try:
                pl.read_database_uri(QUERY, uri, engine=engine)
            except Exception as exc:  # each driver raises its own type
                result["engines"][engine]["wrong_password_s"] = round(time.perf_counter() - started, 2)
                result["engines"][engine]["wrong_password_error"] = str(exc).splitlines()[0][:160]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
