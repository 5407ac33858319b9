"""prefect.yaml, the bootstrap and `prefect deployment run`, against a real server and worker.

One module-scoped stack serves every test here (the file must stay quick on 2 cores):
  - `prefect server start` on a free port, temporary PREFECT_HOME, basic auth on
    (PREFECT_SERVER_API_AUTH_STRING), filesystem lease storage, the UI pointed at that port;
  - `python -m deployments.bootstrap` (work pool, GPU limit, `prefect deploy --all`);
  - `prefect worker start --pool gpu`, started OUTSIDE the repository so only the
    deployment's pull step can make the relative job paths resolve, with a planted
    OLLAMA_API_KEY in its environment;
  - the Ollama emulator in this process, recording the Authorization header of every request.
Every setting prefect.yaml makes is read back through the API: Prefect ignores unknown keys.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import httpx
import polars as pl
import pytest
import yaml

from harness.ollama_emulator import OllamaEmulator
from harness.processes import free_port, start, stop, wait_for
from tasks.settings.load import load_settings

pytestmark = [pytest.mark.server, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS_DIR = ROOT / "test-artifacts"  # git-ignored: screenshots and logs for a person to look at
FLOW = "batch-inference"
SMOKE_IDS = pl.read_csv(ROOT / "jobs/data/smoke.csv")["candidate_id"].to_list()
LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"


class RecordingEmulator(OllamaEmulator):
    """The Ollama emulator, also keeping (path, Authorization header) of every request."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.auth_headers: list[tuple[str, str | None]] = []

    def _handle(self, h: Any) -> None:
        with self._lock:
            self.auth_headers.append((h.path, h.headers.get("Authorization")))
        super()._handle(h)


@dataclass
class Stack:
    api_url: str
    ui_url: str
    auth: str
    secret: str
    env: dict[str, str]  # a client's environment: API URL and auth string
    tmp: Path
    emulator: RecordingEmulator
    logs: dict[str, Path]
    bootstrap_output: str

    def tail(self, name: str, lines: int = 40) -> str:
        return f"--- last lines of the {name} log ({self.logs[name]}):\n{_tail(self.logs[name], lines)}"


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _basic(auth: str) -> dict[str, str]:
    """The header a client with PREFECT_API_AUTH_STRING sends."""
    return {"Authorization": f"Basic {base64.b64encode(auth.encode()).decode()}"}


def _bootstrap(env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deployments.bootstrap"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _clean_env() -> dict[str, str]:
    """This process's environment without Prefect/Ollama settings that would leak into the stack."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "OLLAMA_")) and k not in ("BATCH_INFERENCE_DIR", "PYTEST_CURRENT_TEST")
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    tmp = tmp_path_factory.mktemp("deployments")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    auth = f"operator:{secrets.token_urlsafe(12)}"
    secret = f"sk-planted-{secrets.token_hex(16)}"
    logs = {name: tmp / f"{name}.log" for name in ("server", "bootstrap", "worker")}
    base = _clean_env()
    server_env = {
        **base,
        "PREFECT_HOME": str(tmp / "server-home"),
        "PREFECT_UI_API_URL": api_url,
        "PREFECT_SERVER_API_AUTH_STRING": auth,
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE,
        # A run refused by the deployment limit (ENQUEUE) retries after 1 s instead of 30 s.
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    client_env = {
        **base,
        "PREFECT_HOME": str(tmp / "client-home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_API_AUTH_STRING": auth,
    }
    worker_env = {
        **client_env,
        "OLLAMA_API_KEY": secret,  # planted: must be sent to Ollama, and appear nowhere else
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    emulator = RecordingEmulator(models=["gemma3:12b"], parallel=4).start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        server = start(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            server_env,
            tmp,
            logs["server"],
        )
        procs.append(server)

        def healthy() -> bool:
            if server.poll() is not None:
                raise RuntimeError(f"prefect server exited with {server.returncode}\n{_tail(logs['server'])}")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
            return False

        wait_for(healthy, 120, "the Prefect server's /api/health")

        boot = _bootstrap(client_env)
        logs["bootstrap"].write_text(boot.stdout + boot.stderr, encoding="utf-8")
        assert boot.returncode == 0, f"bootstrap failed ({boot.returncode}):\n{boot.stdout}\n{boot.stderr}"

        worker = start(
            # The default queue only: the hosts' queues belong to the scale-out test's workers.
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu", "--work-queue", "default"]
            + ["--name", "test-worker"],
            worker_env,
            tmp,  # not the repository: the deployment's pull step must set the working directory
            logs["worker"],
        )
        procs.append(worker)
        with temporary_settings({PREFECT_API_URL: api_url, PREFECT_API_AUTH_STRING: auth}):
            from prefect.client.orchestration import get_client

            def worker_online() -> bool:
                if worker.poll() is not None:
                    raise RuntimeError(f"prefect worker exited with {worker.returncode}\n{_tail(logs['worker'])}")
                with get_client(sync_client=True) as client:
                    return any(w.name == "test-worker" for w in client.read_workers_for_work_pool("gpu"))

            wait_for(worker_online, 60, "the worker to register with the 'gpu' pool", interval_s=0.5)
            yield Stack(
                api_url=api_url,
                ui_url=f"http://127.0.0.1:{port}",
                auth=auth,
                secret=secret,
                env=client_env,
                tmp=tmp,
                emulator=emulator,
                logs=logs,
                bootstrap_output=boot.stdout,
            )
    finally:
        for proc in reversed(procs):  # the worker first, while the server still answers it
            stop(proc)
        emulator.stop()
        keep = ARTIFACTS_DIR / "deployments-logs"
        keep.mkdir(parents=True, exist_ok=True)
        for name, path in logs.items():
            if path.exists():
                shutil.copyfile(path, keep / f"{name}.log")


def _client() -> Any:
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _prefect(
    stack: Stack, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        env=env or stack.env,
        cwd=stack.tmp,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _deploy_run(stack: Stack, deployment: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """`prefect deployment run ... --watch` as an operator types it; returns the run's facts."""
    started = time.monotonic()
    done = _prefect(
        stack, "deployment", "run", f"{FLOW}/{deployment}", "--param", f"overrides={json.dumps(overrides)}", "--watch"
    )
    wall = time.monotonic() - started
    output = done.stdout + done.stderr
    match = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert match, f"no flow run id in the CLI output:\n{output[-3000:]}"
    assert done.returncode == 0, (
        f"`prefect deployment run` exited {done.returncode}:\n{output[-3000:]}\n{stack.tail('worker')}"
    )
    assert "Completed" in output
    return {"id": UUID(match.group(1)), "wall_s": wall, "output": output}


def _artifacts(flow_run_id: UUID) -> dict[str, Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _client() as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found}


def _flow_run_logs(flow_run_id: UUID) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    lines: list[str] = []
    with _client() as client:
        while True:
            page = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=len(lines)
            )
            lines += [f"{log.name} {log.level} {log.message}" for log in page]
            if len(page) < 200:
                return lines


def _check_results(out: Path) -> pl.DataFrame:
    results = pl.read_parquet(out / "results.parquet")
    assert sorted(results["id"].to_list()) == sorted(SMOKE_IDS), "every input row exactly once"
    assert results["id"].n_unique() == results.height == len(SMOKE_IDS)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert manifest["rows_total"] == manifest["rows_ok"] + manifest["rows_error"] == len(SMOKE_IDS)
    return results


def _check_artifacts(flow_run_id: UUID) -> dict[str, Any]:
    arts = _artifacts(flow_run_id)
    assert {"smoke-progress", "smoke-chunks", "smoke-report"} <= set(arts), sorted(arts)
    assert float(arts["smoke-progress"].data) == 100.0
    table = arts["smoke-chunks"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [r["chunk"] for r in rows] == [0, 1] and sum(r["rows"] for r in rows) == len(SMOKE_IDS)
    assert "# Run report: smoke" in arts["smoke-report"].data
    return arts


@pytest.fixture(scope="module")
def emulator_run(stack: Stack) -> dict[str, Any]:
    """The smoke deployment pointed at the Ollama emulator through `--param overrides=...`."""
    before = len(stack.emulator.auth_headers)
    out = stack.tmp / "out-emulator"
    overrides = {"backend": "ollama", "model": "gemma3:12b", "ollama_host": stack.emulator.host, "output_dir": str(out)}
    run = _deploy_run(stack, "smoke", overrides)
    run["out"] = out
    run["requests"] = stack.emulator.auth_headers[before:]
    return run


@pytest.fixture(scope="module")
def embedded_run(stack: Stack) -> dict[str, Any]:
    """The smoke deployment as prefect.yaml defines it (embedded Gemma 3 270M); only output_dir moved to tmp."""
    out = stack.tmp / "out-embedded"
    run = _deploy_run(stack, "smoke", {"output_dir": str(out)})
    run["out"] = out
    return run


# ------------------------------------------------------------------------------------------ tests


def test_prefect_yaml_settings_are_on_the_server(stack: Stack) -> None:
    """Each key prefect.yaml sets is read back through the API (unknown keys would be dropped silently)."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy, StateType
    from prefect.client.schemas.schedules import CronSchedule

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = [d["name"] for d in spec["deployments"]]
    assert names == ["smoke", "nightly", "production-170k", "shard", "nightly-2-hosts"]
    # The server runs with the settings docs/operations.md's Operate section prescribes (secrets come back masked).
    server = httpx.get(f"{stack.api_url}/admin/settings", headers=_basic(stack.auth), timeout=10).json()
    assert server["server"]["concurrency"]["lease_storage"] == LEASE_STORAGE
    assert stack.auth not in json.dumps(server)
    with _client() as client:
        pool = client.read_work_pool("gpu")
        assert pool.type == "process"
        assert {"default", "host-a", "host-b"} <= {q.name for q in client.read_work_queues(work_pool_name="gpu")}
        for name in ("gpu", "gpu-host-a", "gpu-host-b"):
            gcl = client.read_global_concurrency_limit_by_name(name)
            assert gcl.limit == 1 and gcl.active
        for d in spec["deployments"]:
            scale_out = d["entrypoint"] == "flows/scale_out.py:scale_out"
            flow_name = "batch-inference-scale-out" if scale_out else FLOW
            dep = client.read_deployment_by_name(f"{flow_name}/{d['name']}")
            assert dep.entrypoint == d["entrypoint"]
            assert (dep.work_pool_name, dep.work_queue_name) == ("gpu", "default")
            assert dep.parameters == d["parameters"]
            assert dep.job_variables == d["work_pool"]["job_variables"]  # the scale-out parent's client retries
            assert dep.enforce_parameter_schema is True
            assert set(dep.tags) == set(d["tags"])
            assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
            if d["name"] == "shard":  # hosts run shards side by side: no deployment limit, no job of its own
                assert dep.global_concurrency_limit is None and dep.schedules == []
                continue
            assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1
            assert dep.concurrency_options is not None
            assert dep.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
            settings = load_settings(ROOT / d["parameters"]["job_file"])  # the job file loads and validates
            if scale_out:
                assert [h["queue"] for h in d["parameters"]["hosts"]] == ["host-a", "host-b"]
                assert settings.name == "nightly" and dep.schedules == []
                continue
            assert settings.name == d["name"]
            if d["name"] != "nightly":
                assert dep.schedules == []
                continue
            nightly = (settings.backend, settings.model, settings.in_flight, settings.chunk_size)
            assert nightly == ("ollama", "gemma3:12b", 4, 5000)
            [schedule] = dep.schedules
            assert isinstance(schedule.schedule, CronSchedule) and schedule.active
            assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 1 * * *", "Europe/Berlin")

            # The server really schedules it: upcoming runs at 01:00 Berlin time, whatever the UTC offset.
            def upcoming(deployment_id: UUID = dep.id) -> list[Any]:
                return client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                    flow_run_filter=FlowRunFilter(
                        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
                    ),
                )

            # Deploying schedules the next runs at once; after a schedule change the scheduler
            # service (every 60 s) does.
            scheduled = wait_for(upcoming, 90, "scheduled runs of the nightly deployment", interval_s=2)
            for run in scheduled:
                local = run.expected_start_time.astimezone(ZoneInfo("Europe/Berlin"))
                assert (local.hour, local.minute) == (1, 0), run.expected_start_time.astimezone(UTC)


def test_bootstrap_is_idempotent_and_leaves_a_limit_alone(stack: Stack) -> None:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    first = stack.bootstrap_output
    assert "work pool 'gpu' (process): created" in first
    assert "global concurrency limit 'gpu': created, limit 1" in first
    # A summary: no `prefect deploy` chatter, one worker hint, no lease hint for a server that has it.
    assert len(first.splitlines()) <= 25 and first.count("prefect worker start") == 1, first
    assert "LEASE_STORAGE" not in first and all(f"'{FLOW}/{d}'" in first for d in ("smoke", "shard")), first
    with _client() as client:
        client.update_global_concurrency_limit("gpu", GlobalConcurrencyLimitUpdate(limit=2))  # an operator raised it
        ids = {d: client.read_deployment_by_name(f"{FLOW}/{d}").id for d in ("smoke", "nightly", "production-170k")}
    try:
        again = _bootstrap(stack.env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "work pool 'gpu' (process): exists, left as it is" in again.stdout
        assert "global concurrency limit 'gpu': exists, limit 2 left as it is" in again.stdout
        with _client() as client:
            assert client.read_global_concurrency_limit_by_name("gpu").limit == 2
            # Redeploying updates the same deployments in place.
            assert ids == {d: client.read_deployment_by_name(f"{FLOW}/{d}").id for d in ids}
    finally:
        with _client() as client:
            client.update_global_concurrency_limit("gpu", GlobalConcurrencyLimitUpdate(limit=1))


def test_clients_without_the_auth_string_are_refused(stack: Stack) -> None:
    assert httpx.get(f"{stack.api_url}/admin/version", timeout=10).status_code == 401
    version = f"{stack.api_url}/admin/version"
    assert httpx.get(version, headers=_basic("operator:guess"), timeout=10).status_code == 401
    assert httpx.get(version, headers=_basic(stack.auth), timeout=10).status_code == 200
    # The CLI without PREFECT_API_AUTH_STRING: refused, and the bootstrap says what to set.
    anonymous = {k: v for k, v in stack.env.items() if k != "PREFECT_API_AUTH_STRING"}
    listed = _prefect(stack, "work-pool", "ls", env=anonymous, timeout=60)
    assert listed.returncode != 0 and "401" in listed.stdout + listed.stderr, listed.stdout + listed.stderr
    boot = _bootstrap(anonymous, timeout=60)
    assert boot.returncode == 1 and "PREFECT_API_AUTH_STRING" in boot.stdout


def test_smoke_run_from_the_cli_on_the_emulator(stack: Stack, emulator_run: dict[str, Any]) -> None:
    results = _check_results(emulator_run["out"])
    assert results["status"].to_list() == ["ok"] * len(SMOKE_IDS)
    _check_artifacts(emulator_run["id"])
    chats = [p for p in stack.emulator.chat_prompts() if "Candidate:" in p]
    assert len(chats) == len(SMOKE_IDS)
    # The job ran in the repository root although the worker did not: the pull step did that.
    manifest = json.loads((emulator_run["out"] / "manifest.json").read_text())
    assert manifest["input"] == "jobs/data/smoke.csv"
    # The progress artifact moves at chunk ends and every 30 s, so `--watch` shows the run, not its updates.
    updates = emulator_run["output"].count("prefect.artifact.updated")
    assert updates <= 4, f"{updates} artifact updates in the watch output"


def test_planted_ollama_key_is_used_but_never_written(stack: Stack, emulator_run: dict[str, Any]) -> None:
    secret = stack.secret
    chats = [auth for path, auth in emulator_run["requests"] if path == "/api/chat"]
    assert len(chats) >= len(SMOKE_IDS)
    assert set(chats) == {f"Bearer {secret}"}, "the worker's OLLAMA_API_KEY was not sent to Ollama"

    places: dict[str, str] = {}
    for key, art in _artifacts(emulator_run["id"]).items():
        places[f"artifact {key}"] = json.dumps(art.model_dump(mode="json"))
    logs = _flow_run_logs(emulator_run["id"])
    assert len(logs) > 5, "expected the flow run's logs on the server"
    places["flow-run logs"] = "\n".join(logs)
    with _client() as client:
        run = client.read_flow_run(emulator_run["id"])
        places["flow-run"] = run.model_dump_json()
        places["deployment"] = client.read_deployment(run.deployment_id).model_dump_json()
    out: Path = emulator_run["out"]
    for name in ("manifest.json", "job.json", "report.md"):
        places[name] = (out / name).read_text(encoding="utf-8")
    parquet = sorted(out.rglob("*.parquet"))
    assert {"results.parquet", "chunk-00000.parquet", "samples.parquet"} <= {p.name for p in parquet}
    for path in parquet:
        frame = pl.read_parquet(path)
        # Every cell as JSON text (nested columns included), plus the file's raw bytes.
        places[str(path.relative_to(out))] = frame.write_ndjson() + path.read_bytes().decode("latin-1")
    places["CLI output"] = emulator_run["output"]
    places["worker log"] = stack.logs["worker"].read_text(encoding="utf-8", errors="replace")
    leaked = [name for name, text in places.items() if secret in text or secret[len("sk-planted-") :] in text]
    assert not leaked, f"the planted key shows up in: {leaked}"


def test_smoke_on_the_embedded_model_as_deployed(stack: Stack, embedded_run: dict[str, Any]) -> None:
    results = _check_results(embedded_run["out"])
    # The model answered every row; the schema is the oracle of what is ok (the 270M model may miss it).
    for row in results.iter_rows(named=True):
        assert row["completion_tokens"] > 0 and row["response"], row
        if row["status"] == "ok":
            assert json.loads(row["response"])["score"] == row["score"] and 0 <= row["score"] <= 10, row
        else:
            assert row["error_kind"] == "invalid_output", row
    manifest = json.loads((embedded_run["out"] / "manifest.json").read_text())
    assert (manifest["backend"], manifest["model"]) == ("llamacpp", "gemma3-270m-q4_k_m")
    _check_artifacts(embedded_run["id"])


def test_deployment_limit_enqueues_a_second_run(stack: Stack) -> None:
    """Two runs of one deployment: the second waits (AwaitingConcurrencySlot) until the first ends."""
    from prefect.client.schemas.objects import StateType

    stack.emulator.latency_s = 0.75  # 6 rows, 1 in flight: the first run holds the slot for >= 4.5 s
    try:
        with _client() as client:
            dep = client.read_deployment_by_name(f"{FLOW}/smoke")
            ids = [
                client.create_flow_run_from_deployment(
                    dep.id,
                    parameters={
                        "overrides": {
                            "backend": "ollama",
                            "model": "gemma3:12b",
                            "ollama_host": stack.emulator.host,
                            "output_dir": str(stack.tmp / f"out-enqueue-{i}"),
                        }
                    },
                ).id
                for i in range(2)
            ]

            def finished() -> list[Any] | None:
                runs = [client.read_flow_run(i) for i in ids]
                return runs if all(r.state and r.state.is_final() for r in runs) else None

            runs = wait_for(finished, 240, "both flow runs to finish", interval_s=1.0)
            histories = {r.id: client.read_flow_run_states(r.id) for r in runs}
    finally:
        stack.emulator.latency_s = 0.0
    assert [r.state.type for r in runs] == [StateType.COMPLETED] * 2, [(r.name, r.state) for r in runs]
    first, second = sorted(runs, key=lambda r: r.start_time)
    assert first.end_time <= second.start_time, (
        f"runs overlapped: {first.start_time}-{first.end_time} vs {second.start_time}"
    )
    assert "AwaitingConcurrencySlot" in [s.name for s in histories[second.id]], [s.name for s in histories[second.id]]
    assert "AwaitingConcurrencySlot" not in [s.name for s in histories[first.id]]
    with _client() as client:
        assert client.read_global_concurrency_limit_by_name("gpu").active_slots == 0
    # The deployment slots were leases kept on disk (filesystem lease storage), not in memory.
    assert (stack.tmp / "server-home" / "concurrency_leases").is_dir()


# ------------------------------------------------------------------------------------------ browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _dump_dom(url: str) -> str:
    """The plain `chromium --dump-dom` check, as a person would run it: no credentials."""
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=90,
        )
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", done.stdout))


def _browse_logged_in(url: str, auth: str, screenshot: Path, expect: str, timeout_s: float = 60) -> tuple[str, str]:
    """Open `url` in headless Chromium as a logged-in user; return (page text, DOM), save a screenshot.

    The Prefect UI keeps the basic-auth string base64-encoded in localStorage['prefect-password']
    (what its login page stores) and sends it as `Authorization: Basic ...`. A command line
    cannot set localStorage, so this drives Chromium over the DevTools protocol: store the
    credential before the page's scripts run, navigate, wait for the text, screenshot.
    """
    from websockets.sync.client import connect

    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen(
            [
                CHROMIUM,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                "--window-size=1400,2000",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 30, "Chromium's DevTools port")
            port = int(port_file.read_text().split()[0])
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
            page = next(t for t in targets if t["type"] == "page")
            ids = itertools.count(1)
            with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=20) as ws:

                def call(method: str, **params: Any) -> dict[str, Any]:
                    call_id = next(ids)
                    ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
                    while True:
                        message = json.loads(ws.recv(timeout=30))
                        if message.get("id") == call_id:
                            if "error" in message:
                                raise RuntimeError(f"{method}: {message['error']}")
                            return message.get("result", {})

                def evaluate(expression: str) -> str:
                    return (
                        call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value") or ""
                    )

                token = base64.b64encode(auth.encode()).decode()
                call("Page.enable")
                call(
                    "Page.addScriptToEvaluateOnNewDocument",
                    source=f"localStorage.setItem('prefect-password', {json.dumps(token)});",
                )
                call("Emulation.setDeviceMetricsOverride", width=1400, height=2000, deviceScaleFactor=1, mobile=False)
                call("Page.navigate", url=url)
                body_text = "document.body ? document.body.innerText : ''"
                with contextlib.suppress(TimeoutError):
                    wait_for(lambda: expect in evaluate(body_text), timeout_s, repr(expect), 0.5)
                time.sleep(1.5)  # let the inline chart image and fonts settle before the screenshot
                text = evaluate("document.body.innerText")
                dom = evaluate("document.documentElement.outerHTML")
                screenshot.write_bytes(base64.b64decode(call("Page.captureScreenshot", format="png")["data"]))
                return text, dom
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; .ci/run does it)")
def test_report_artifact_renders_in_the_ui(stack: Stack, embedded_run: dict[str, Any]) -> None:
    report = _artifacts(embedded_run["id"])["smoke-report"]
    url = f"{stack.ui_url}/artifacts/artifact/{report.id}"
    # Without credentials the UI refuses: "Authentication failed", then its login page; no report.
    anonymous = _dump_dom(url)
    assert "Authentication failed" in anonymous or "Login" in anonymous, anonymous[:2000]
    assert "Run report" not in anonymous
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    shot = ARTIFACTS_DIR / "ui-smoke-report.png"
    text, dom = _browse_logged_in(url, stack.auth, shot, "Run report: smoke")
    (ARTIFACTS_DIR / "ui-smoke-report.html").write_text(dom, encoding="utf-8")
    assert "Can't connect to Server API" not in text
    assert "Run report: smoke" in text, text[:3000]
    assert "Status: complete" in text and "Bottleneck:" in text
    assert report.description and report.description in text  # the verdict headline
    assert "smoke-report" in text and shot.stat().st_size > 50_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scale_out_over_two_host_workers(stack: Stack) -> None:
    """`prefect deployment run batch-inference-scale-out/nightly-2-hosts`: two process workers on their own
    queues (two hosts), each beside its own Ollama; host-b's Ollama dies in its second chunk."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    out = stack.tmp / "out-scale-out"
    frame = pl.DataFrame(
        {
            "candidate_id": [f"c{i:03d}" for i in range(48)],
            "role": ["data engineer"] * 48,
            "summary": [f"candidate {i}: Python, Polars, Prefect" for i in range(48)],
        }
    )
    frame.write_parquet(stack.tmp / "scale-out.parquet")
    overrides = {
        "name": "scaleout",
        "input_path": str(stack.tmp / "scale-out.parquet"),
        "output_dir": str(out),
        "chunk_size": 8,
        "outage_budget_s": 0.5,
        "request_timeout_s": 2,
        "chunk_retries": 0,
        "checkpoint_every_s": 0.2,
    }
    host_env = {**stack.env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen[bytes]] = []
    with (
        OllamaEmulator(models=["gemma3:12b"], parallel=4, latency_s=0.01) as emu_a,
        OllamaEmulator(models=["gemma3:12b"], parallel=4, latency_s=0.05) as emu_b,
    ):
        hosts = [
            {"queue": "host-a", "overrides": {"ollama_host": emu_a.host}},
            {"queue": "host-b", "overrides": {"ollama_host": emu_b.host}},
        ]

        def kill_b() -> None:  # in host-b's second chunk: one finished chunk, one half done
            while len(emu_b.chat_prompts()) < 11:
                time.sleep(0.005)
            emu_b.down()

        killer = threading.Thread(target=kill_b, daemon=True)
        try:
            for queue in ("host-a", "host-b"):
                stack.logs[queue] = stack.tmp / f"worker-{queue}.log"
                cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu", "--work-queue", queue]
                procs.append(start([*cmd, "--name", f"worker-{queue}"], host_env, stack.tmp, stack.logs[queue]))
            killer.start()
            done = _prefect(
                stack,
                "deployment",
                "run",
                "batch-inference-scale-out/nightly-2-hosts",
                "--param",
                f"overrides={json.dumps(overrides)}",
                "--param",
                f"hosts={json.dumps(hosts)}",
                "--param",
                "chunks_per_run=2",
                "--watch",
            )
        finally:
            for proc in procs:
                stop(proc)
        output = done.stdout + done.stderr
        assert done.returncode == 0 and "Completed" in output, (
            f"{output[-3000:]}\n{stack.tail('host-a')}\n{stack.tail('host-b')}\n{stack.tail('worker')}"
        )
        parent_id = UUID(re.search(r"UUID: ([0-9a-f-]{36})", output).group(1))  # type: ignore[union-attr]
        results = pl.read_parquet(out / "results.parquet")
        assert sorted(results["id"].to_list()) == frame["candidate_id"].to_list()
        assert results["status"].unique().to_list() == ["ok"]
        on_a, on_b = Counter(emu_a.chat_prompts()), Counter(emu_b.chat_prompts())
        assert sum(on_b.values()) >= 11 and max(on_a.values()) == 1  # host-b worked until its Ollama died
        assert not set(on_a) & set(on_b) and sum(on_a.values()) + sum(on_b.values()) == 48  # no row twice

    with _client() as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))
        )
    by_queue = Counter((c.work_queue_name, c.state.name) for c in children)
    assert by_queue[("host-a", "Completed")] >= 2 and by_queue[("host-b", "Failed")] == 1, by_queue
    for child in children:
        assert child.parameters["host"] == child.work_queue_name
    arts = _artifacts(parent_id)
    report = arts["scaleout-report"].data
    assert "| host-a |" in report and "| host-b |" in report and "on host-b ended Failed" in report
    # The parent's manifest adds up its shards' rows; no host read GPU power here, so no energy is claimed.
    parent = json.loads((out / "manifest.json").read_text())
    assert parent["rows_sent"] == 48 and parent["energy_wh"] is None
    assert "GPU energy, all hosts: no GPU power reading." in report
    # Each host reports on its own run, under its own key.
    for child in children:
        assert f"scaleout-{child.work_queue_name}-report" in _artifacts(child.id)
