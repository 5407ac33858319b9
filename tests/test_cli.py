"""What an operator meets: the real command line (`python -m flows.batch_inference`) in its own process."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import psutil
import pytest
import yaml
from prefect.settings import PREFECT_API_URL

from harness.ollama_emulator import Fault, OllamaEmulator
from harness.processes import start_cli

ROOT = Path(__file__).resolve().parents[1]


def cli(
    job_file: Path, *args: str, api: bool = True, timeout: float = 180, flow: str = "batch_inference"
) -> subprocess.CompletedProcess[str]:
    """Run a flow's CLI to its end; with `api`, against this session's Prefect server."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)
    if api:
        env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
    return subprocess.run(
        [sys.executable, "-m", f"flows.{flow}", "--config", str(job_file), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_file(tmp_path: Path, settings: dict[str, Any], name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(settings))
    return path


def tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under path with its size and mtime: what 'left as it was' compares."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        ({"chunk_sise": 8}, 3, "chunk_sise: unknown setting; did you mean `chunk_size`?"),
        ({"options": {"num_predict": 64, "temprature": 0.5}}, 3, "did you mean `temperature`?"),
        ({"prompt_template": "Role: {role} {missing}"}, 4, "'missing' which is not a column"),
        ({"ollama_host": "http://127.0.0.1:9"}, 6, "cannot reach Ollama at http://127.0.0.1:9"),
        ({"model": "llama9:999b"}, 6, "ollama pull llama9:999b"),
        ({"output_schema": "nowhere/schema.json"}, 3, "output_schema file nowhere/schema.json does not exist"),
        (
            {"output_schema": "tasks.schema:ResultRow"},
            3,
            "output schema field 'row_index' collides with a result column",
        ),
    ],
)
def test_user_errors_are_one_message_and_a_hint_before_any_server(
    job: Any, emulator: OllamaEmulator, tmp_path: Path, change: dict[str, Any], code: int, message: str
) -> None:
    settings = {**job(5), **change}
    done = cli(job_file(tmp_path, settings), api=False)  # no server: one would start only after the checks
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), done.stderr
    assert message in lines[0]
    assert "Traceback" not in done.stderr and "temporary Prefect server" not in done.stderr
    assert not Path(settings["output_dir"]).exists()  # nothing claimed, nothing written
    assert [r for r in emulator.requests if r.path == "/api/chat"] == []
    debug = cli(job_file(tmp_path, settings), "--debug", api=False)
    assert debug.returncode == code and "Traceback" in debug.stderr


def test_an_output_dir_that_cannot_be_made_is_named_before_any_server(
    job: Any, emulator: OllamaEmulator, tmp_path: Path
) -> None:
    (tmp_path / "afile").write_text("not a directory")
    settings = {**job(5), "output_dir": str(tmp_path / "afile" / "out")}
    done = cli(job_file(tmp_path, settings), api=False)
    assert done.returncode == 5, done.stderr
    lines = done.stderr.strip().splitlines()
    assert (
        lines[0]
        == f"error: output_dir {tmp_path / 'afile' / 'out'} cannot be made or written: {tmp_path / 'afile'} is a file"
    )
    assert lines[1].startswith("hint: point output_dir at a directory this user can make and write")
    assert "temporary Prefect server" not in done.stderr and emulator.requests == []
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    dangling = cli(job_file(tmp_path, {**settings, "output_dir": str(tmp_path / "gone" / "out")}), api=False)
    assert dangling.returncode == 5 and f"{tmp_path / 'gone'} is a link to nothing" in dangling.stderr


def test_scale_out_hosts_are_checked_with_the_job_before_any_request(
    job: Any, emulator: OllamaEmulator, tmp_path: Path
) -> None:
    settings = job(5)
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text("- queue: host-a\n- queue: Host_B\n")  # upper case and '_': not a work queue name
    bad = cli(job_file(tmp_path, settings), "--hosts", str(hosts), api=False, flow="scale_out")
    assert bad.returncode == 2 and bad.stderr.startswith("error: hosts:") and "queue" in bad.stderr, bad.stderr
    missing = cli(job_file(tmp_path, settings), "--hosts", str(tmp_path / "no.yaml"), api=False, flow="scale_out")
    assert missing.returncode == 3 and f"--hosts file {tmp_path / 'no.yaml'} does not exist" in missing.stderr
    for done in (bad, missing):
        assert "Traceback" not in done.stderr and "temporary Prefect server" not in done.stderr
    assert emulator.requests == [] and not Path(settings["output_dir"]).exists()


def test_what_the_command_line_needs_around_the_job_is_said_at_once(job: Any, tmp_path: Path) -> None:
    path = job_file(tmp_path, job(5))
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # nothing listens there
    cases = [
        ([], None, "error: --config JOB.yaml is required (or every setting as --set key=value)"),
        (["--config", str(path)], env, "error: no Prefect server answers at PREFECT_API_URL=http://127.0.0.1:9/api"),
    ]
    for args, environment, said in cases:
        done = subprocess.run(
            [sys.executable, "-m", "flows.batch_inference", *args],
            cwd=ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2 and done.stderr.startswith(said), done.stderr
        assert "Traceback" not in done.stderr and "manifest.json" not in done.stderr
    scale = cli(path, "--host", "host-a", "--chunks-per-run", "0", api=False, flow="scale_out")
    assert scale.returncode == 2 and "--chunks-per-run: a whole number of at least 1, not '0'" in scale.stderr
    assert not Path(job(5)["output_dir"]).exists()


def test_scale_out_checks_each_hosts_settings_and_needs_the_shared_server_not_a_local_backend(
    job: Any, emulator: OllamaEmulator, tmp_path: Path
) -> None:
    settings = {**job(5), "ollama_host": "http://127.0.0.1:9"}  # the parent's machine has no Ollama: fine
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text("- queue: host-a\n  overrides: {in_flght: 3}\n- queue: host-b\n")
    typo = cli(job_file(tmp_path, settings), "--hosts", str(hosts), api=False, flow="scale_out")
    assert typo.returncode == 3, typo.stderr
    assert "error: host host-a: invalid job settings in " in typo.stderr
    assert "in_flght (from an override): unknown setting; did you mean `in_flight`?" in typo.stderr
    local = cli(job_file(tmp_path, settings), "--host", "host-a", api=False, flow="scale_out")
    assert local.returncode == 2 and "scale-out needs the Prefect server the hosts' workers poll" in local.stderr
    sink = {**settings, "sink": {"uri": f"sqlite:///{tmp_path}/nodir/hr.db", "table": "scores"}}
    refused = cli(job_file(tmp_path, sink), "--host", "host-a", api=False, flow="scale_out")
    assert refused.returncode == 7 and "the folder" in refused.stderr, refused.stderr  # the shards deliver to it
    for done in (typo, local, refused):
        assert "Traceback" not in done.stderr and "temporary Prefect server" not in done.stderr, done.stderr
    assert not Path(settings["output_dir"]).exists()


@pytest.mark.usefixtures("prefect_server")
def test_scale_out_against_a_server_without_the_shard_deployment_says_so(job: Any, tmp_path: Path) -> None:
    settings = job(5)
    done = cli(job_file(tmp_path, settings), "--host", "host-a", flow="scale_out")
    assert done.returncode == 2, done.stderr
    assert "has no batch-inference/shard deployment: run `.venv/bin/python -m deployments.bootstrap`" in done.stderr
    assert not Path(settings["output_dir"]).exists()


def test_a_refused_sink_fails_the_preflight_with_its_own_code_and_changes_no_database(
    job: Any, emulator: OllamaEmulator, tmp_path: Path
) -> None:
    db = tmp_path / "hr.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE scores (id TEXT, status TEXT)")  # no primary key: no upsert by id
    settings = {**job(5), "sink": {"uri": f"sqlite:///{db}", "table": "scores"}}
    done = cli(job_file(tmp_path, settings), api=False)
    assert done.returncode == 7, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and "sink table scores" in lines[0] and "column 'id' must be its primary key" in lines[0]
    assert "temporary Prefect server" not in done.stderr and not Path(settings["output_dir"]).exists()
    assert emulator.requests == []  # refused before the backend is even asked
    # A missing table passes the pre-flight without being made there: the run makes it.
    down = {**settings, "sink": {**settings["sink"], "table": "fresh"}, "ollama_host": "http://127.0.0.1:9"}
    assert cli(job_file(tmp_path, down), api=False).returncode == 6
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'fresh'").fetchall() == []
    # A database file in a folder that is not there: SQLite would make the file, not the folder.
    nowhere = {**settings, "sink": {"uri": f"sqlite:///{tmp_path}/nodir/hr.db", "table": "scores"}}
    missing = cli(job_file(tmp_path, nowhere), api=False)
    assert missing.returncode == 7 and f"the folder {tmp_path}/nodir does not exist" in missing.stderr, missing.stderr


@pytest.mark.usefixtures("prefect_server")
def test_rerun_keeps_the_whole_job_in_report_manifest_and_telemetry(
    job: Any, emulator: OllamaEmulator, tmp_path: Path
) -> None:
    emulator.latency_s = 0.02
    for i in (10, 11, 12):
        emulator.inject(Fault.bad_request("no such thing"), match=f"candidate {i} writes")
    settings = job(24, name="rerun", telemetry_interval_s=0.1)
    path = job_file(tmp_path, settings)
    first = cli(path)
    assert first.returncode == 0, first.stderr
    out = Path(settings["output_dir"])
    before = json.loads((out / "manifest.json").read_text())
    samples_before = pl.read_parquet(out / "telemetry" / "samples.parquet").height
    # Not a terminal: plain progress lines, with the error rows the results hold.
    assert "24/24 rows (100.0%)" in first.stderr and "3 error rows" in first.stderr

    again = cli(path)  # everything is done: nothing is sent, the history stays
    assert again.returncode == 0, again.stderr
    assert "24/24 rows (100.0%)" in again.stderr and "done · 3 error rows" in again.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [a["rows_sent"] for a in manifest["attempts"]] == [24, 0]
    assert manifest["attempts"][0] == before["attempts"][0]
    assert (manifest["rows_ok"], manifest["rows_error"]) == (21, 3)
    assert manifest["requests_per_s"] == before["requests_per_s"] > 0  # the rate of the attempt that sent rows
    assert [s["index"] for s in manifest["chunk_stats"]] == [0, 1, 2]
    assert sum(s["sent_rows"] for s in manifest["chunk_stats"]) == 24
    assert pl.read_parquet(out / "telemetry" / "samples.parquet").height > samples_before
    report = (out / "report.md").read_text()
    assert "2 attempts" in report and "### Attempts" in report and "no rows were sent" not in report
    assert "ETA for the 170,000-row production job" in report and "![GPU and host over the job](timeline.png)" in report
    assert "21 ok and 3 error rows of 24" in report and "`bad_request`: 3" in report
    assert "```text" in report and "CPU %" in report  # sparklines in a fenced block, not inline code


@pytest.mark.usefixtures("prefect_server")
def test_refusals_name_the_answer_changing_setting_and_plumbing_changes_run(
    job: Any, emulator: OllamaEmulator, tmp_path: Path
) -> None:
    settings = job(8)
    path = job_file(tmp_path, settings)
    assert cli(path).returncode == 0
    out = Path(settings["output_dir"])
    kept = tree(out)
    refused = cli(path, "--set", "in_flight=2", "--set", "options.num_predict=32")
    assert refused.returncode == 5, refused.stderr
    assert "(options.num_predict: 64 -> 32)" in refused.stderr and "in_flight" not in refused.stderr.split("hint")[0]
    assert "--set output_dir=" in refused.stderr and tree(out) == kept
    # The README's example: the changed answers get their own directory; in_flight alone resumes in place.
    other = cli(
        path, "--set", "in_flight=2", "--set", "options.num_predict=32", "--set", f"output_dir={tmp_path / 'short'}"
    )
    assert other.returncode == 0, other.stderr
    emulator.reset_stats()
    assert cli(path, "--set", "in_flight=2").returncode == 0
    assert [r for r in emulator.requests if r.path == "/api/chat"] == []


@pytest.mark.usefixtures("prefect_server")
def test_a_failed_preflight_leaves_a_used_output_dir_as_it_was(
    job: Any, emulator: OllamaEmulator, tmp_path: Path
) -> None:
    settings = job(8)
    assert cli(job_file(tmp_path, settings)).returncode == 0
    out = Path(settings["output_dir"])
    kept = tree(out)
    down = cli(job_file(tmp_path, {**settings, "ollama_host": "http://127.0.0.1:9"}, "down.yaml"))
    assert down.returncode == 6 and tree(out) == kept


@pytest.mark.usefixtures("prefect_server")
def test_duplicate_ids_name_their_rows_as_the_file_counts_them(job: Any, tmp_path: Path) -> None:
    data = tmp_path / "dupes.csv"
    data.write_text("id,text,role\na,x,r\nb,y,r\na,z,r\n")
    done = cli(job_file(tmp_path, {**job(3), "input_path": str(data)}), api=False)
    assert done.returncode == 4
    assert "duplicate ids in 'id': 'a' at data rows 1 and 3 (counted from 1" in done.stderr, done.stderr


def test_a_sigkilled_run_leaves_no_temporary_prefect_server(job: Any, emulator: OllamaEmulator, tmp_path: Path) -> None:
    emulator.latency_s = 0.5  # slow enough to be killed mid-run
    path = job_file(tmp_path, job(40, in_flight=1))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "cli.log"
    proc = start_cli(path, log, env)  # only the CLI is killed below, not its process group
    try:
        deadline = time.monotonic() + 150
        while not any(r.path == "/api/chat" for r in emulator.requests):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        servers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "uvicorn" in " ".join(c.cmdline())]
        assert len(servers) == 1, "no temporary server found under the CLI"
        assert "starting a temporary Prefect server" in log.read_text()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    gone, alive = psutil.wait_procs(servers, timeout=30)
    for leftover in alive:  # do not leave it behind even when the test fails
        leftover.kill()
    assert not alive, "the temporary Prefect server outlived the SIGKILLed CLI"


@pytest.mark.usefixtures("prefect_server")
def test_a_terminal_gets_a_progress_bar_with_the_artifacts_numbers(
    job: Any, emulator: OllamaEmulator, tmp_path: Path
) -> None:
    import pty

    emulator.inject(Fault.bad_request("no"), match="candidate 2 writes")
    path = job_file(tmp_path, job(16, name="bar"))
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "COLUMNS": "160", "TERM": "xterm"}
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.batch_inference", "--config", str(path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=slave,
    )
    os.close(slave)
    seen = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the other end closed: the CLI ended
            break
        if not data:
            break
        seen += data
    os.close(master)
    assert proc.wait(timeout=180) == 0
    text = seen.decode("utf-8", "replace")
    assert "━" in text  # rich's bar, redrawn in place
    assert "16/16 rows" in text and "rows/s" in text and "1 error rows" in text and "done" in text
    assert "[bar] " not in text  # not the plain lines a pipe gets
