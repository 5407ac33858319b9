"""Set up this project's Prefect objects on the server in PREFECT_API_URL; safe to run again.

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m deployments.bootstrap

What it does, in order, printing one line per object:
  1. checks the server answers, and warns when it is reachable beyond localhost without
     credentials (see "Who may drive it" below);
  2. creates the `process` work pool(s) prefect.yaml names (`gpu`), or leaves them as they are;
  3. creates the global concurrency limit(s) the job files hold per chunk (`gpu`, limit 1).
     An existing limit keeps its value (someone may have raised it for a bigger GPU); its
     active slots are printed, so a leaked slot shows up here;
  4. runs `prefect --no-prompt deploy --all` in the repository root, so prefect.yaml stays
     the one place deployments are defined, with BATCH_INFERENCE_DIR (the flow runs' working
     directory, see prefect.yaml) set to this checkout unless it is already set; its own
     output is shown only when it fails;
  5. reads every deployment back from the server and prints its pool, queue, schedule and
     concurrency limit; then one line on starting a worker, and a server hint only for a
     setting below that the server (GET /admin/settings) does not have.

Server settings this project relies on (set them where `prefect server start` runs):

  PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency.lease_storage.filesystem
      GPU slots and deployment slots are leases. The default storage is in memory, so a
      server restart while a run holds the `gpu` slot leaks it: the limit stays full and
      every later chunk waits for it. The filesystem storage keeps leases under
      PREFECT_HOME and expires them after a restart. A slot that leaked anyway is freed by
      hand, once no run is using the GPU:
          prefect gcl inspect gpu
          prefect gcl update gpu --active-slots 0

Who may drive it: a server that listens beyond localhost (`--host 0.0.0.0`) accepts any
request unless it has a basic-auth string. Set PREFECT_SERVER_API_AUTH_STRING='user:password'
on the server and the same value as PREFECT_API_AUTH_STRING on every worker and client
(this script included); the UI then asks for it on a login page. Ollama credentials come
only from the worker's environment (OLLAMA_API_KEY), never from deployment parameters.

Exit status: 0 when everything is in place, 1 when a deployed job file does not load (before anything is
made), the server or a step refused, 2 when
PREFECT_API_URL is not set (without it Prefect would start a throwaway server).
"""

from __future__ import annotations

import base64
import ipaddress
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "prefect.yaml"
WORKDIR_ENV = "BATCH_INFERENCE_DIR"
LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"


class BootstrapError(RuntimeError):
    """A step that cannot go on; the message says what to do."""


def say(message: str) -> None:
    print(f"[bootstrap] {message}", flush=True)


def load_prefect_yaml(path: Path = PREFECT_YAML) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not data.get("deployments"):
        raise BootstrapError(f"{path} defines no deployments")
    return data


def work_pools(config: dict[str, Any]) -> list[str]:
    """Work pool names the deployments use, in order, each once."""
    names: list[str] = []
    for deployment in config["deployments"]:
        name = (deployment.get("work_pool") or {}).get("name")
        if not name:
            raise BootstrapError(f"deployment {deployment.get('name')!r} in prefect.yaml names no work pool")
        if name not in names:
            names.append(name)
    return names


def gpu_limits(config: dict[str, Any]) -> list[str]:
    """The global concurrency limits the deployed jobs acquire per chunk: each job's gpu_limit (or
    one per endpoint), and for a scale-out deployment one per host (`gpu-<queue>` unless set)."""
    from pydantic import ValidationError

    from tasks.settings.load import host_settings, load_settings
    from tasks.settings.model import Host, SettingsError

    names: list[str] = []
    for deployment in config["deployments"]:
        params = deployment.get("parameters") or {}
        if not (job_file := params.get("job_file")):
            continue  # the shard deployment: its parent passes the job
        overrides = params.get("overrides")
        try:
            hosts = [Host.model_validate(h) for h in params.get("hosts") or []]
            jobs = [host_settings(job_file, overrides, h) for h in hosts] or [load_settings(job_file, overrides)]
            for settings in jobs:
                names += [lane.gpu_limit for lane in settings.lanes() if lane.gpu_limit not in names]
        except (SettingsError, ValidationError) as exc:
            raise BootstrapError(f"deployment {deployment.get('name')}: {exc}") from None
    return names


def work_queues(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(pool, queue) pairs: each deployment's queue, and the hosts' queues a scale-out deployment names."""
    pairs: list[tuple[str, str]] = []
    for deployment in config["deployments"]:
        pool = deployment["work_pool"]
        queues = [pool.get("work_queue_name") or "default"]
        queues += [h["queue"] for h in (deployment.get("parameters") or {}).get("hosts") or []]
        pairs += [(pool["name"], q) for q in queues if (pool["name"], q) not in pairs]
    return pairs


def ensure_work_queue(client: Any, pool: str, name: str) -> str:
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        client.read_work_queue_by_name(name, work_pool_name=pool)
        return f"work queue '{pool}/{name}': exists"
    except ObjectNotFound:
        pass
    try:
        client.create_work_queue(name, work_pool_name=pool)
    except ObjectAlreadyExists:
        return f"work queue '{pool}/{name}': exists (created concurrently)"
    return f"work queue '{pool}/{name}': created"


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_server(api_url: str, auth_string: str | None) -> None:
    """The server is up; credentials are in place where they matter."""
    health = f"{api_url.rstrip('/')}/health"
    try:
        httpx.get(health, timeout=10).raise_for_status()
    except httpx.HTTPError as exc:
        raise BootstrapError(
            f"no Prefect server answers at {health} ({exc}); start one: see docs/operations.md"
        ) from exc
    # /admin/version needs credentials when the server has an auth string; /health never does.
    anonymous = httpx.get(f"{api_url.rstrip('/')}/admin/version", timeout=10)
    if anonymous.status_code == 401:
        if not auth_string:
            raise BootstrapError(
                "the server requires credentials: set PREFECT_API_AUTH_STRING to the server's "
                "PREFECT_SERVER_API_AUTH_STRING ('user:password')"
            )
        say("server requires credentials (PREFECT_SERVER_API_AUTH_STRING is set there): good")
    elif _is_loopback(api_url):
        say("server answers without credentials; fine while it listens on localhost only")
    else:
        say(
            "WARNING: the server at a non-local address accepts requests WITHOUT credentials: anyone who "
            "reaches it can start runs on the GPU host. Set PREFECT_SERVER_API_AUTH_STRING='user:password' on "
            "the server and PREFECT_API_AUTH_STRING to the same value on workers and clients."
        )
    if not _is_loopback(api_url) and not auth_string:
        say("WARNING: PREFECT_API_AUTH_STRING is not set for a server beyond localhost")


def ensure_work_pool(client: Any, name: str) -> str:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        try:
            client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type="process",
                    description="Runs batch-inference flows as processes on the GPU host.",
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                )
            )
        except ObjectAlreadyExists:  # created by someone else between read and create
            return f"work pool '{name}': exists (created concurrently)"
        return f"work pool '{name}' (process): created"
    if pool.type != "process":
        raise BootstrapError(
            f"work pool '{name}' exists with type '{pool.type}', not 'process'; delete it "
            f"(`prefect work-pool delete {name}`) or rename the pool in prefect.yaml"
        )
    paused = " (PAUSED: `prefect work-pool resume " + name + "`)" if pool.is_paused else ""
    return f"work pool '{name}' (process): exists, left as it is{paused}"


def ensure_global_limit(name: str, limit: int = 1) -> str:
    from tasks.inference.gpu_slot import ensure_gpu_limit

    gcl = ensure_gpu_limit(name, limit)
    if gcl is None:
        return f"global concurrency limit '{name}': created, limit {limit}"
    note = ""
    if gcl.active_slots:
        note = (
            f"; {gcl.active_slots} slot(s) held now: if no run is using the GPU, free them with "
            f"`prefect gcl update {name} --active-slots 0`"
        )
    state = "active" if gcl.active else "INACTIVE (not enforced: `prefect gcl enable " + name + "`)"
    return f"global concurrency limit '{name}': exists, limit {gcl.limit} left as it is, {state}{note}"


def deploy_all(env: dict[str, str]) -> None:
    """`prefect --no-prompt deploy --all` in the repository root. Its output is shown only when it fails:
    on success it is ~100 lines, with Prefect's "start a worker" advice once per deployment, and
    describe_deployments() says what the server now has."""
    command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]
    say(f"running: {' '.join(command[2:])}   (cwd {ROOT}, {WORKDIR_ENV}={env[WORKDIR_ENV]})")
    done = subprocess.run(command, cwd=ROOT, env=env, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        print("\n".join((done.stdout + done.stderr).splitlines()[-40:]), file=sys.stderr)
        raise BootstrapError(f"`prefect deploy --all` failed with exit status {done.returncode} (its last lines above)")


FLOW_NAMES = {
    "flows/batch_inference.py:batch_inference": "batch-inference",
    "flows/scale_out.py:scale_out": "batch-inference-scale-out",
}


def describe_deployments(client: Any, config: dict[str, Any]) -> list[str]:
    """One line per deployment as the server has it: what prefect.yaml asked for, read back."""
    lines = []
    for spec in config["deployments"]:
        flow_name = FLOW_NAMES[spec["entrypoint"]]
        dep = client.read_deployment_by_name(f"{flow_name}/{spec['name']}")
        schedules = ", ".join(
            f"{getattr(s.schedule, 'cron', s.schedule)} {getattr(s.schedule, 'timezone', '')}".strip()
            + ("" if s.active else " (inactive)")
            for s in dep.schedules
        )
        limit = dep.global_concurrency_limit.limit if dep.global_concurrency_limit else None
        strategy = dep.concurrency_options.collision_strategy.value if dep.concurrency_options else None
        workdir = [
            step["prefect.deployments.steps.set_working_directory"].get("directory")
            for step in dep.pull_steps or []
            if "prefect.deployments.steps.set_working_directory" in step
        ]
        lines.append(
            f"deployment '{flow_name}/{dep.name}': queue {dep.work_pool_name}/{dep.work_queue_name}, "
            f"job {dep.parameters.get('job_file') or 'from its parent'}, schedule {schedules or 'none'}, "
            f"concurrency {'none' if limit is None else f'{limit} ({strategy})'}, "
            f"working dir {workdir[0] if workdir else 'NOT SET'}"
        )
    return lines


def server_setting(api_url: str, auth_string: str | None, *path: str) -> Any:
    """One of the server's own settings (GET /admin/settings), None when it cannot be read: the server's
    environment, not this one, decides how it keeps leases."""
    headers = {}
    if auth_string:
        headers["Authorization"] = "Basic " + base64.b64encode(auth_string.encode()).decode()
    try:
        found: Any = httpx.get(f"{api_url.rstrip('/')}/admin/settings", headers=headers, timeout=10).json()
        for key in path:
            found = found[key]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None
    return found


def worker_hint(config: dict[str, Any]) -> str:
    """The one "start a worker" advice: the default queue's worker, and one per host queue if any."""
    pools = work_pools(config)
    hosts = [q for _, q in work_queues(config) if q != "default"]
    per_host = f"; on each GPU host of a scale-out, one on its queue: --work-queue {' / '.join(hosts)}" if hosts else ""
    return (
        f"next: start a worker from this checkout: `prefect worker start --pool {pools[0]} --work-queue default`"
        f"{per_host}; then `prefect deployment run 'batch-inference/smoke' --watch`"
    )


def main() -> int:
    api_url = os.environ.get("PREFECT_API_URL")
    if not api_url:
        from prefect.settings import PREFECT_API_URL

        api_url = PREFECT_API_URL.value()  # may come from the active Prefect profile
    if not api_url:
        say("PREFECT_API_URL is not set: point it at your server, e.g. http://127.0.0.1:4200/api")
        return 2
    from prefect.settings import PREFECT_API_AUTH_STRING

    auth = PREFECT_API_AUTH_STRING.value()
    auth_string = auth.get_secret_value() if hasattr(auth, "get_secret_value") else auth
    os.chdir(ROOT)  # job files use paths relative to the repository root
    try:
        config = load_prefect_yaml()
        limits = gpu_limits(config)  # every deployed job file loads before anything is made on the server
        say(f"server {api_url}")
        check_server(api_url, auth_string)
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            for pool in work_pools(config):
                say(ensure_work_pool(client, pool))
            for pool, queue in work_queues(config):
                say(ensure_work_queue(client, pool, queue))
        for name in limits:
            say(ensure_global_limit(name))
        env = dict(os.environ, PREFECT_API_URL=api_url)
        env.setdefault(WORKDIR_ENV, str(ROOT))
        deploy_all(env)
        with get_client(sync_client=True) as client:
            for line in describe_deployments(client, config):
                say(line)
    except BootstrapError as exc:
        say(f"ERROR: {exc}")
        return 1
    say(worker_hint(config))
    leases = server_setting(api_url, auth_string, "server", "concurrency", "lease_storage")
    if leases != LEASE_STORAGE:
        say(
            f"server hint: its lease storage is {leases or 'unknown (GET /admin/settings failed)'}; start it with "
            f"PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE={LEASE_STORAGE} so GPU slots do not leak when it restarts"
        )
    # The server hides its database URL from clients (a secret); its driver shows only where it was set.
    database = server_setting(api_url, auth_string, "server", "database") or {}
    if not any(str(database.get(key) or "").startswith("postgresql") for key in ("driver", "connection_url")):
        say(
            "server hint: unless it runs on Postgres already, give it Postgres for nightly/production jobs "
            "(PREFECT_SERVER_DATABASE_CONNECTION_URL=postgresql+asyncpg://...): a chunk hand-over takes ~0.26 s "
            "there instead of ~2 s on SQLite (docs/operations.md)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
