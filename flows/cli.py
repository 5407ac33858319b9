"""The command line of both flows: check the job in a second, then run the flow with live progress.

    python -m flows.batch_inference --config JOB.yaml [--set key=value ...] [--debug]
    python -m flows.scale_out --config JOB.yaml --host QUEUE [--host QUEUE ...]

Everything a user can get wrong (the job file, the input, the output directory, an unreachable
backend, a sink table that cannot take the results) is checked here before Prefect is imported or a Prefect server started, and reported
as one message with a hint and its own exit code; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import traceback
from collections.abc import Callable
from datetime import date
from functools import partial
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from tasks import stopping

# Exit codes: 1 the run itself failed (its manifest says why); 2 the command line (argparse).
EXIT_SETTINGS, EXIT_INPUT, EXIT_OUTPUT_DIR, EXIT_BACKEND, EXIT_SINK = 3, 4, 5, 6, 7
IN_USE = "in use"  # HINTS keys: output_dir refusals of their own (exit 5 still)
UNUSABLE = "unusable"

HINTS: dict[int | str, str] = {
    EXIT_SETTINGS: "check the job file and any --set or overrides against docs/job-file.md (every setting, its type and default)",
    EXIT_INPUT: "fix the input file or query, or id_column / prompt_template in the job file",
    EXIT_OUTPUT_DIR: "give this configuration its own directory, e.g. --set output_dir=out/<new name>, "
    "or delete the old one to start over",
    # A directory a live run holds: never suggest deleting what that run is writing.
    IN_USE: "another run is writing this output_dir: wait for it to end (then the same command resumes or "
    "finds the job done), or give this run its own directory, e.g. --set output_dir=out/<new name>",
    UNUSABLE: "point output_dir at a directory this user can make and write, e.g. --set output_dir=out/<name>",
    EXIT_BACKEND: "start the backend (`ollama serve`, `ollama pull <model>`) or point ollama_host / OLLAMA_HOST "
    "at it; nothing was sent and output_dir is untouched",
    EXIT_SINK: "start the sink database, or alter, drop or rename the sink table; nothing was sent and output_dir "
    "is untouched",
}
# An unreachable backend's hint names what that backend needs: HINTS[EXIT_BACKEND] is Ollama's.
BACKEND_HINTS: dict[str, str] = {
    "ollama": HINTS[EXIT_BACKEND],
    "openai": "start the OpenAI-compatible server at base_url (llama-server, vLLM, SGLang, ...) so that "
    "GET <base_url>/models lists the model, or point base_url (or endpoints) at one that does; nothing was sent "
    "and output_dir is untouched",
    "llamacpp": "set model_path to a GGUF file that exists (unset: the packaged Gemma 3 270M); nothing was sent "
    "and output_dir is untouched",
}


class UsageError(Exception):
    """A bad command line (exit 2, like argparse's own errors)."""


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set options.num_ctx=8192` → {"options": {"num_ctx": 8192}}: values parse as YAML, except those of
    text settings (prompts, paths, names), which are taken as typed."""
    from tasks.settings.load import is_text_setting
    from tasks.settings.model import SettingsError

    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects key=value, got {pair!r}")
        node = overrides
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if is_text_setting(key):
            node[leaf] = None if raw in ("", "null", "Null", "NULL", "~") else raw  # unsets, as in YAML
            continue
        try:
            node[leaf] = yaml.safe_load(raw)
        except (yaml.YAMLError, ValueError) as exc:
            # A value is a setting: `run_date=2026-02-30` parses as a date YAML cannot build (exit 3, not 1).
            raise SettingsError(f"--set {key}={raw} is not a valid value: {exc}") from None
    return overrides


def _exit_code(exc: BaseException) -> int | None:
    """The exit code of a user error, None for anything else (a bug, a failed run)."""
    from tasks.inference.endpoints import BackendUnavailable
    from tasks.plan.dataset import InputError
    from tasks.settings.model import SettingsError
    from tasks.storage.outdir import OutputDirError
    from tasks.storage.sink import SinkRefused

    for kind, code in (
        (SettingsError, EXIT_SETTINGS),
        (InputError, EXIT_INPUT),
        (OutputDirError, EXIT_OUTPUT_DIR),
        (BackendUnavailable, EXIT_BACKEND),
        (SinkRefused, EXIT_SINK),
    ):
        if isinstance(exc, kind):
            return code
    return None


def _hint(exc: BaseException, code: int) -> str:
    """What to do about a user error: its exit code's hint, or a closer one where the error says more."""
    from tasks.storage.outdir import OutputDirInUse, OutputDirUnusable

    if code == EXIT_BACKEND:
        return BACKEND_HINTS.get(getattr(exc, "backend", ""), HINTS[code])
    if isinstance(exc, OutputDirInUse):
        return HINTS[IN_USE]
    if isinstance(exc, OutputDirUnusable):
        return HINTS[UNUSABLE]
    return HINTS[code]


def preflight(job_file: str | None, overrides: dict[str, Any], hosts: list[Any] | None = None) -> None:
    """The checks the run makes first (tasks/run.py check_job), without Prefect and changing nothing.
    Scale-out (`hosts`): what the parent owns, and each host's settings; each host checks its own
    backend when its shard starts (this machine may have none)."""
    from tasks.plan.dataset import validate_input
    from tasks.plan.job import plan_job
    from tasks.run import Direct, check_job
    from tasks.settings.load import host_settings

    job = plan_job(job_file, overrides, date.today(), validate=partial(validate_input, pin=False))
    for host in hosts or []:
        host_settings(job_file, overrides, host)
    sink = check_job(job, Direct(), dry_run=True, backends=hosts is None).sink
    if sink is not None:
        sink.close()


def _one_line(text: str | None, width: int = 100) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def done_summary(manifest: dict[str, Any], answers: int = 2) -> list[str]:
    """A few lines after the done line: the first answers (or error rows, when none is ok), so a finished
    run shows what it produced, and where its report is."""
    import polars as pl

    lines = []
    if manifest.get("results") and Path(manifest["results"]).is_file():
        rows = pl.scan_parquet(manifest["results"]).select("id", "status", "error_kind", "error", "response")
        ok = rows.filter(pl.col("status") == "ok").head(answers).collect()
        first = ok if ok.height else rows.head(answers).collect()
        for row in first.iter_rows(named=True):
            what = row["response"] if row["status"] == "ok" else f"error {row['error_kind']}: {row['error']}"
            lines.append(f"  {row['id']}: {_one_line(what)}")
    report = Path(manifest["settings"]["output_dir"]) / "report.md"
    if report.is_file():
        lines.append(f"report: {report}")
    return lines


def _die_with_parent() -> None:
    """In the temporary server's process, before exec: SIGTERM it when the CLI dies (even SIGKILLed)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the CLI died before the line above: do not outlive it
        os.kill(os.getpid(), signal.SIGTERM)


def use_temporary_server() -> None:
    """Without PREFECT_API_URL, Prefect starts a temporary server for this process. Say so, and make
    it a child that ends with this process: otherwise a SIGKILLed run leaves it running for good."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return
    print(
        "No PREFECT_API_URL: starting a temporary Prefect server for this run; it stops with this command and "
        "its runs vanish with it. To keep runs in the UI, start one (`prefect server start`) and "
        "`export PREFECT_API_URL=http://127.0.0.1:4200/api`.",
        file=sys.stderr,
    )
    if not sys.platform.startswith("linux"):
        return

    class DiesWithParent(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> Any:
            # Prefect builds the command; the child's death signal and its session are ours to add.
            # Its own session: the terminal's Ctrl-C goes to the foreground process group, and a
            # server that got it would die under the run that is winding down (the run logged lease
            # renewal failures for minutes, then "Connection refused"). Prefect stops it at exit,
            # after the run; the death signal still takes it down with a SIGKILLed command.
            import subprocess

            original = subprocess.Popen
            subprocess.Popen = lambda *a, **kw: original(*a, **kw, preexec_fn=_die_with_parent, start_new_session=True)  # type: ignore[misc,assignment,call-overload]
            try:
                return super()._run_uvicorn_command()
            finally:
                subprocess.Popen = original  # type: ignore[misc]

    # Prefect's clients look the temporary server up as SubprocessASGIServer(), a singleton per
    # port kept in a dict the subclass shares: this registers ours under the default port (None).
    DiesWithParent()


def shard_deployment_exists() -> None:
    """Scale-out hands shards to other hosts' workers through a Prefect server they share: a temporary one
    would have neither the shard deployment nor the workers."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise UsageError(
            "scale-out needs the Prefect server the hosts' workers poll, with the batch-inference/shard "
            "deployment: set PREFECT_API_URL (docs/operations.md, Scale out)"
        )
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name("batch-inference/shard")
        except ObjectNotFound:
            raise UsageError(
                f"{get_current_settings().api.url} has no batch-inference/shard deployment: run "
                "`.venv/bin/python -m deployments.bootstrap` against it first (docs/operations.md)"
            ) from None


def check_prefect_server() -> None:
    """A PREFECT_API_URL that nothing answers is the operator's to fix: said at once, not as a failed run."""
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    if not (url := get_current_settings().api.url):
        return
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise UsageError(
            f"no Prefect server answers at PREFECT_API_URL={url} ({problem}): start it, or unset PREFECT_API_URL "
            "for a temporary server"
        )


def _quiet_prefect() -> None:
    # Prefect's own usage telemetry: off for our runs (a server that cannot reach the internet
    # logs an ERROR for each attempt). Set before Prefect reads its settings.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # Prefect gives a temporary server 20 s to start; on a busy small machine it took up to 78 s here,
    # and the run then failed before its first row. Waiting longer costs nothing when it starts fast.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _parser(kind: Literal["batch", "scale_out"]) -> argparse.ArgumentParser:
    module = "flows.batch_inference" if kind == "batch" else "flows.scale_out"
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 done, 1 the run failed, 2 command line, 3 job settings, 4 input, "
        "5 output directory, 6 backend unreachable or model missing, 7 sink database or table refused",
    )
    parser.add_argument("--config", type=Path, help="YAML job file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    if kind == "scale_out":
        parser.add_argument("--host", action="append", default=[], metavar="QUEUE", help="a host's work queue")
        parser.add_argument("--hosts", type=Path, help="YAML list of hosts: [{queue: ..., overrides: {...}}, ...]")
        parser.add_argument("--chunks-per-run", type=_positive, default=4, help="chunks a shard run takes (4)")
    return parser


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1, not {text!r}")
    return int(text)


def _hosts(args: argparse.Namespace) -> list[Any]:
    """Scale-out hosts from --host and --hosts, checked with the job before anything starts."""
    from pydantic import ValidationError

    from tasks.settings.load import read_document
    from tasks.settings.model import Host

    listed = read_document(args.hosts, "--hosts file") if args.hosts else []
    try:
        hosts = [Host(queue=q) for q in args.host] + [Host.model_validate(h) for h in listed or []]
    except ValidationError as exc:
        raise UsageError(f"hosts: {exc}") from None
    if not hosts:
        raise UsageError("name at least one host: --host QUEUE or --hosts FILE")
    return hosts


def _run(
    kind: Literal["batch", "scale_out"], args: argparse.Namespace, overrides: dict[str, Any], flow: Callable[..., Any]
) -> dict[str, Any]:
    job_file = str(args.config) if args.config else None
    if kind == "batch":
        return cast(dict[str, Any], flow(job_file=job_file, overrides=overrides))
    return cast(
        dict[str, Any],
        flow(hosts=_hosts(args), job_file=job_file, overrides=overrides, chunks_per_run=args.chunks_per_run),
    )


def main(kind: Literal["batch", "scale_out"], argv: list[str], load_flow: Callable[[], Callable[..., Any]]) -> int:
    """Check the job, then run the flow that `load_flow` imports: only after the checks passed, since
    importing Prefect takes seconds. The flow's module hands it in, so this module imports no flow."""
    args = _parser(kind).parse_args(argv)
    try:
        if args.config is None and not args.set:
            raise UsageError("--config JOB.yaml is required (or every setting as --set key=value)")
        overrides = parse_overrides(args.set)
        job_file = str(args.config) if args.config else None
        preflight(job_file, overrides, _hosts(args) if kind == "scale_out" else None)
        _quiet_prefect()
        check_prefect_server()
        if kind == "scale_out":
            shard_deployment_exists()
        use_temporary_server()
        # From here a first SIGINT/SIGTERM winds the run down (the flow checks it at each step; a
        # scale-out parent cancels its shard runs), a second one exits at once.
        stopping.install()
        manifest = _run(kind, args, overrides, load_flow())
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rows finished so far are on disk; run the same command again to resume", file=sys.stderr)
        return 130
    except stopping.Interrupted as exc:
        where = exc.on_disk or "before the run wrote anything"
        print(f"interrupted ({exc.signum.name}): {where}; the same command resumes", file=sys.stderr)
        return 128 + exc.signum
    except Exception as exc:
        if (signum := stopping.requested()) is not None:  # the run broke off otherwise while winding down
            print(f"interrupted ({signum.name}): {exc}; the same command resumes", file=sys.stderr)
            return 128 + signum
        code = _exit_code(exc)
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        if code is None:
            print(
                "The run failed; its manifest.json and report.md say how far it got. --debug shows the traceback; "
                "the same command resumes.",
                file=sys.stderr,
            )
            return 1
        print(f"hint: {_hint(exc, code)}", file=sys.stderr)
        return code
    print(f"{manifest['rows_ok']} ok, {manifest['rows_error']} error rows → {manifest['results']}")
    for line in done_summary(manifest):
        print(line)
    return 0
