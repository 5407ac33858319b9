"""Read from and write to a real PostgreSQL (and SQLite): query in, chunks upserted by id, refusals before any request."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

from flows.batch_inference import batch_inference
from harness.ollama_emulator import OllamaEmulator
from harness.postgres_server import PASSWORD, PostgresServer
from tasks.io.sql import SqlError, TableSink
from tasks.plan.dataset import InputError, validate_input
from tasks.schema import RESULT_SCHEMA
from tasks.settings.load import load_settings
from tasks.settings.model import SettingsError, SqlSink
from tasks.storage.journal import finished_rows
from tasks.storage.sink import SinkBehind
from tests.test_kill import start_flow

pytestmark = pytest.mark.usefixtures("prefect_server")
_names = itertools.count()
SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "integer", "enum": [1, 2, 3, 4, 5]}, "reason": {"type": "string"}},
    "required": ["score", "reason"],
}


@pytest.fixture
def pg(postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> PostgresServer:
    monkeypatch.setenv("PGPASSWORD", PASSWORD)  # the only place the password lives
    return postgres


def candidates(pg: PostgresServer, n: int) -> str:
    """A fresh source table of n short records; returns its name."""
    name = f"candidates_{os.getpid()}_{next(_names)}"
    pg.sql(
        f"CREATE TABLE {name} AS SELECT 'r' || lpad(g::text, 5, '0') AS id, 'candidate ' || g || ' writes Python' "
        f"AS text, 'data engineer' AS role FROM generate_series(0, {n - 1}) g"
    )
    return name


def sql_job(job: Any, pg: PostgresServer, n: int, tmp_path: Path, **overrides: Any) -> tuple[dict[str, Any], str]:
    source = candidates(pg, n)
    settings = job(1)
    del settings["input_path"]
    settings["input_sql"] = {"uri": pg.uri(), "query": f"SELECT id, text, role FROM {source} ORDER BY id"}
    settings["sink"] = {"uri": pg.uri(), "table": f"scores_{source}"}
    settings.update(overrides)
    return settings, f"scores_{source}"


def table_rows(pg: PostgresServer, table: str) -> list[str]:
    return pg.sql(f"SELECT id FROM {table} ORDER BY id").split()


def inference_requests(emulator: OllamaEmulator) -> list[Any]:
    return [r for r in emulator.requests if r.path in ("/api/chat", "/api/generate", "/api/show")]


def test_query_in_typed_upsert_out(job: Any, pg: PostgresServer, emulator: OllamaEmulator, tmp_path: Path) -> None:
    schema = tmp_path / "score.json"
    schema.write_text(json.dumps(SCHEMA))
    settings, table = sql_job(job, pg, 20, tmp_path, output_schema=str(schema))
    manifest = batch_inference(overrides=settings)
    results = pl.read_parquet(Path(settings["output_dir"]) / "results.parquet")
    assert manifest["complete"] and results.height == 20 and results["status"].to_list() == ["ok"] * 20
    # Every row once, with the parsed fields as typed columns.
    assert table_rows(pg, table) == results["id"].to_list()
    columns = f"SELECT column_name, data_type FROM information_schema.columns WHERE table_name = '{table}'"
    types = dict(line.split("|", 1) for line in pg.sql(columns).splitlines())
    assert types["score"] == "bigint" and types["reason"] == "text" and types["attempts"] == "smallint"
    assert types["finished_at"] == "timestamp with time zone" and types["truncated"] == "boolean"
    stored = pg.sql(f"SELECT id, score, reason, response FROM {table} ORDER BY id").splitlines()
    first = results.row(0, named=True)
    assert stored[0] == f"{first['id']}|{first['score']}|{first['reason']}|{first['response']}"
    # The prompt came from the query's columns.
    assert "user: Role: data engineer\nCandidate: candidate 0 writes Python" in emulator.chat_prompts()
    # No password in anything the run wrote.
    written = [p for p in Path(settings["output_dir"]).rglob("*") if p.is_file() and p.suffix in (".json", ".md")]
    assert written and not [p for p in written if PASSWORD in p.read_text()]
    # The query's rows are pinned like a file's: one snapshot named by the digest of the rows.
    out = Path(settings["output_dir"])
    assert [p.name for p in out.glob("input-*.parquet")] == [f"input-{manifest['input_digest']}.parquet"]
    assert not (out / "inputs").exists()
    assert manifest["sink"]["chunks_pending"] == [] and re.fullmatch(
        r"query 'SELECT .*' on postgresql://scorer@[^:]+:\d+/hr", manifest["input"]
    )


def test_sigkill_mid_run_then_rerun_leaves_each_id_once(
    job: Any, pg: PostgresServer, emulator: OllamaEmulator, tmp_path: Path
) -> None:
    emulator.latency_s = 0.2  # a chunk of 16 at 4 in flight takes ~0.8 s: time to see chunk 0 in the table
    limit = f"gpu-sql-kill-{os.getpid()}"
    settings, table = sql_job(job, pg, 48, tmp_path, chunk_size=16, gpu_limit=limit)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(settings))
    parsed = load_settings(job_file)
    chunks = validate_input(parsed).chunks
    proc = start_flow(job_file, tmp_path / "flow.log")
    deadline = time.monotonic() + 120
    # Chunk 0 upserted (the sink delivers on its own thread, so wait for the table too) and chunk 1 under way.
    while sum(len(finished_rows(parsed.output_dir, c)) for c in chunks) < 24 or len(table_rows(pg, table)) < 16:
        assert proc.poll() is None, (tmp_path / "flow.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = table_rows(pg, table)
    assert 16 <= len(before) < 48 and len(before) % 16 == 0  # whole chunks only: one transaction each
    with get_client(sync_client=True) as client:  # the documented recovery of the killed run's GPU slot
        client.update_global_concurrency_limit(limit, GlobalConcurrencyLimitUpdate(active_slots=0))
    batch_inference(job_file=str(job_file))
    ids = table_rows(pg, table)
    assert ids == sorted(f"r{i:05d}" for i in range(48))  # every id, exactly once (sorted, no repeats)
    assert pg.sql(f"SELECT count(*), count(DISTINCT id) FROM {table}") == "48|48"
    results = pl.read_parquet(parsed.output_dir / "results.parquet")
    md5 = [hashlib.md5(r.encode()).hexdigest() for r in results["response"]]  # answers hold newlines
    assert pg.sql(f"SELECT md5(response) FROM {table} ORDER BY row_index").split() == md5


def test_a_sink_that_refused_a_chunk_catches_up_on_the_next_run(
    job: Any, pg: PostgresServer, emulator: OllamaEmulator, tmp_path: Path
) -> None:
    settings, table = sql_job(job, pg, 24, tmp_path, chunk_size=8)
    batch_inference(overrides={**settings, "output_dir": str(tmp_path / "warm")})  # creates the table
    pg.sql(f"TRUNCATE {table}")
    # The database refuses chunk 1 (as a full disk or a lost connection would): Parquet goes on.
    pg.sql(f"ALTER TABLE {table} ADD CONSTRAINT not_now CHECK (chunk <> 1)")
    with pytest.raises(SinkBehind, match=r"1 chunk\(s\) did not reach sink table .*chunk-00001.*not_now"):
        batch_inference(overrides=settings)
    out = Path(settings["output_dir"])
    assert pl.read_parquet(out / "results.parquet").height == 24
    assert len(table_rows(pg, table)) == 16
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sink"]["chunks_pending"] == ["chunk-00001"] and not manifest["complete"]
    pg.sql(f"ALTER TABLE {table} DROP CONSTRAINT not_now")
    sent = len(emulator.chat_prompts())
    manifest = batch_inference(overrides=settings)
    assert manifest["complete"] and manifest["sink"]["rows_upserted_this_run"] == 8  # only the missing chunk
    assert len(emulator.chat_prompts()) == sent  # nothing was asked again
    assert table_rows(pg, table) == [f"r{i:05d}" for i in range(24)]


def test_wrong_password_bad_query_and_incompatible_table_fail_before_any_request(
    job: Any, pg: PostgresServer, emulator: OllamaEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, table = sql_job(job, pg, 4, tmp_path)
    monkeypatch.setenv("PGPASSWORD", "not-the-password")
    with pytest.raises(
        InputError, match=r"cannot connect to postgresql://scorer@127.0.0.1:\d+/hr: .*password authentication failed"
    ):
        batch_inference(overrides=settings)
    monkeypatch.setenv("PGPASSWORD", PASSWORD)

    bad_query = {**settings, "input_sql": {**settings["input_sql"], "query": "SELECT id, txt FROM nowhere"}}
    with pytest.raises(
        InputError, match=r"input_sql query failed on .*nowhere.*\(query: SELECT id, txt FROM nowhere\)"
    ):
        batch_inference(overrides=bad_query)
    no_column = {
        **settings,
        "input_sql": {
            **settings["input_sql"],
            "query": "SELECT id, text FROM " + settings["input_sql"]["query"].split("FROM ")[1],
        },
    }
    with pytest.raises(
        InputError,
        match=r"input query 'SELECT id, text FROM .*' on .*: prompt_template uses 'role' which is not a column",
    ):
        batch_inference(overrides=no_column)

    pg.sql(f"CREATE TABLE {table} (id text PRIMARY KEY, status text)")
    with pytest.raises(SqlError, match=rf"sink table {table} .*column 'row_index' is missing \(it would hold bigint\)"):
        batch_inference(overrides=settings)
    pg.sql(f"DROP TABLE {table}")
    TableSink(SqlSink.model_validate(settings["sink"]), RESULT_SCHEMA).prepare()  # the table a run would create
    pg.sql(f"ALTER TABLE {table} ALTER COLUMN response TYPE integer USING NULL")
    with pytest.raises(SqlError, match=rf"sink table {table} .*column 'response' is integer, results need text"):
        batch_inference(overrides=settings)
    pg.sql(f"DROP TABLE {table}; CREATE TABLE {table} (id text, status text)")
    with pytest.raises(SqlError, match=r"column 'id' must be its primary key"):
        batch_inference(overrides=settings)
    down = {**settings, "sink": {**settings["sink"], "uri": pg.uri().replace(f":{pg.port}/", ":1/")}}
    with pytest.raises(SqlError, match=r"cannot connect to postgresql://scorer@127.0.0.1:1/hr: .*(refused|failed)"):
        batch_inference(overrides=down)  # a sink that is down at the start stops the run before it sends
    assert inference_requests(emulator) == []
    # The password in a URI is refused, and the refusal does not repeat it.
    leaky = {**settings, "sink": {**settings["sink"], "uri": pg.uri().replace("scorer@", f"scorer:{PASSWORD}@")}}
    with pytest.raises(SettingsError, match="PGPASSWORD") as caught:
        batch_inference(overrides=leaky)
    assert PASSWORD not in str(caught.value)


def test_env_reference_in_the_uri(pg: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.io.sql import read_query
    from tasks.settings.model import SqlInput

    source = candidates(pg, 3)
    monkeypatch.delenv("PGPASSWORD")
    monkeypatch.setenv("SCORER_DB_PASSWORD", PASSWORD)
    uri = pg.uri().replace("scorer@", "scorer:${SCORER_DB_PASSWORD}@")
    assert read_query(SqlInput(uri=uri, query=f"SELECT id FROM {source}")).height == 3
    monkeypatch.delenv("SCORER_DB_PASSWORD")
    with pytest.raises(SqlError, match="environment variable SCORER_DB_PASSWORD is not set"):
        read_query(SqlInput(uri=uri, query=f"SELECT id FROM {source}"))


def test_sqlite_in_and_out(job: Any, emulator: OllamaEmulator, tmp_path: Path) -> None:
    db = tmp_path / "hr.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE candidates (id INTEGER PRIMARY KEY, text TEXT, role TEXT)")
        conn.executemany("INSERT INTO candidates VALUES (?, ?, ?)", [(i, f"person {i}", "analyst") for i in range(10)])
    settings = job(1, chunk_size=4)
    del settings["input_path"]
    uri = f"sqlite:///{db}"
    settings |= {
        "input_sql": {"uri": uri, "query": "SELECT * FROM candidates"},
        "sink": {"uri": uri, "table": "scores"},
    }
    manifest = batch_inference(overrides=settings)
    assert manifest["complete"] and manifest["rows_ok"] == 10
    again = batch_inference(overrides=settings)  # a rerun writes nothing twice
    assert again["complete"] and again["sink"]["rows_upserted_this_run"] == 0
    # A damaged chunk file is set aside and redone: the redone file is delivered again (its marker
    # named the old file), the upsert by id keeps each row once.
    (Path(settings["output_dir"]) / "chunks" / "chunk-00001.parquet").write_bytes(b"torn")
    redone = batch_inference(overrides=settings)
    assert redone["complete"] and redone["sink"]["rows_upserted_this_run"] == 4
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT id, status, truncated, finished_at FROM scores ORDER BY row_index").fetchall()
    assert [r[0] for r in rows] == [str(i) for i in range(10)] and {r[1] for r in rows} == {"ok"}
    assert rows[0][2] == 0 and rows[0][3].endswith("Z")
    with pytest.raises(InputError, match=r"SQLite file .*missing.db does not exist"):
        batch_inference(
            overrides={**settings, "input_sql": {"uri": f"sqlite:///{tmp_path}/missing.db", "query": "SELECT 1"}}
        )
