"""Scale out over several GPU hosts: a parent flow hands shards of one job to each host's Prefect worker.

Each GPU host runs a worker on its own work queue of the `gpu` pool, beside its own Ollama. The
parent validates and plans the job, then starts `batch-inference/shard` runs on those queues, a
few chunks per run (`chunks_per_run`): a host that finishes gets the next chunks, so a faster host
does more. A host whose shard run fails, or does not start within `start_timeout_s`, has its
chunks moved to the other hosts; the rows it finished stay. The parent then writes one
results.parquet and a report with a line per host. The output directory must be on storage every
host mounts at the same path (NFS or similar): the chunk files are the hand-over.

Run locally:   python -m flows.scale_out --config jobs/nightly.yaml --host host-a --host host-b
As deployed:   prefect deployment run 'batch-inference-scale-out/nightly-2-hosts'
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # the command line checks the job before Prefect is even imported
    from typing import Any

    from flows.cli import main

    def _flow() -> Any:  # this file again, under its package name: the flow Prefect deploys
        from flows.scale_out import scale_out

        return scale_out

    sys.exit(main("scale_out", sys.argv[1:], _flow))

import time
from typing import Annotated, Any, cast

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.states import Cancelled, Cancelling, State
from pydantic import Field

from tasks import stopping
from tasks.analysis.report import render_scale_out_report, rounded
from tasks.analysis.telemetry import hosts_energy_wh, wh_per_1000_rows
from tasks.inference.dispatch import Dispatcher, LaneFailed
from tasks.inference.runner import finished_chunk_stats
from tasks.io.openai_batch import write_output as write_openai_output
from tasks.io.sources import wants_openai_output
from tasks.plan.dataset import ChunkSpec
from tasks.plan.job import plan_job
from tasks.prefect_steps import plan_chunks, publish_artifacts, scheduled_day
from tasks.settings.load import host_settings, merge_overrides
from tasks.settings.model import Host
from tasks.storage.files import write_atomic
from tasks.storage.journal import check_chunk_files
from tasks.storage.manifest import Manifest, read_shard_manifests
from tasks.storage.outdir import check_output_dir, claim_output_dir
from tasks.storage.results import consolidate

POLL_S = 2.0


def wait_for_shard(flow_run_id: Any, start_timeout_s: float, name: str) -> State:
    """Poll the shard run to its end; cancel it if no worker picked it up in time, or when this run is
    asked to stop (then raise stopping.Interrupted): a stopped parent leaves no host sending."""
    created = time.monotonic()
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(flow_run_id).state
            if state is not None and state.is_final():
                return state
            waiting = state is None or state.is_scheduled() or state.is_pending()
            if waiting and time.monotonic() - created > start_timeout_s:
                message = f"no worker started it within {start_timeout_s:.0f}s"
                client.set_flow_run_state(flow_run_id, Cancelled(message=message), force=True)
                return Cancelled(message=message)
            if stopping.sleep(POLL_S):
                # A started shard gets Cancelling: its worker sends it SIGTERM, and it keeps the rows it finished.
                message = "its scale-out parent was stopped"
                stop: State = Cancelled(message=message) if waiting else Cancelling(message=message)
                client.set_flow_run_state(flow_run_id, stop, force=True)
                stopping.check(f"while {name} ran")


def add_up_shards(manifest: Manifest, shards: list[Manifest], since: float) -> None:
    """The parent's rows sent and GPU energy: its shard runs' attempts since `since` (a host that retried
    its batch left both attempts in one manifest). Their sending time does not add up (hosts send side by side)."""
    attempts = [a for s in shards for a in s.attempts if a.started_at >= since]
    manifest.rows_sent = sum(a.rows_sent for a in attempts)
    manifest.energy_wh = rounded(hosts_energy_wh([a.energy_wh for a in attempts]), 3)
    manifest.wh_per_1000_rows = rounded(wh_per_1000_rows(manifest.energy_wh, manifest.rows_sent), 3)


@flow(name="batch-inference-scale-out", log_prints=True)
def scale_out(
    hosts: list[Host],
    job_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    deployment: str = "batch-inference/shard",
    chunks_per_run: Annotated[int, Field(ge=1)] = 4,
    start_timeout_s: Annotated[float, Field(gt=0)] = 600.0,
) -> dict[str, Any]:
    """Run one job over several hosts' workers; returns the manifest of the whole job."""
    # SIGINT or SIGTERM (Ctrl-C, a worker cancelling this run) cancels the shard runs under way, writes
    # the manifest and report, and ends this run Cancelled, as batch_inference does.
    with stopping.signals_stop_the_run():
        try:
            return run_scale_out(hosts, job_file, overrides, deployment, chunks_per_run, start_timeout_s)
        except stopping.Interrupted as exc:
            return cast(dict[str, Any], Cancelled(message=str(exc), data=exc))


def run_scale_out(
    hosts: list[Host],
    job_file: str | None,
    overrides: dict[str, Any] | None,
    deployment: str,
    chunks_per_run: int,
    start_timeout_s: float,
) -> dict[str, Any]:
    """The scale-out flow's body (a plain function, run inside the flow run)."""
    logger = get_run_logger()
    started = time.time()
    if not hosts:
        raise ValueError("hosts: name at least one work queue")
    job = plan_job(job_file, overrides, scheduled_day(), validate=plan_chunks)
    for host in hosts:  # a host's mistyped override fails here, not in its first shard run
        host_settings(job_file, overrides, host)
    settings, plan, fingerprint, record = job.settings, job.plan, job.fingerprint, job.record
    out = settings.output_dir
    check_output_dir(out, fingerprint, record)  # refused before any shard starts or a file is written
    # The children get the directory this run resolved, so a shard that starts after midnight
    # does not fill {date} with its own day.
    base = merge_overrides(overrides or {}, {"output_dir": str(out)})
    with claim_output_dir(out, fingerprint, record):
        # What earlier runs left, as a single-host run reads it: a damaged chunk file is set aside and redone.
        for finding in check_chunk_files(out, plan.chunks):
            logger.warning(finding)
        todo = [c for c in plan.chunks if finished_chunk_stats(settings, c) is None]
        logger.info(
            "%d rows in %d chunks, %d to do, over hosts %s",
            plan.total_rows,
            len(plan.chunks),
            len(todo),
            ", ".join(h.queue for h in hosts),
        )

        def run_shard(lane: int, batch: list[ChunkSpec]) -> None:
            host = hosts[lane]
            child: FlowRun = run_deployment(  # type: ignore[assignment]  # sync here: a FlowRun, not a coroutine
                deployment,
                parameters={
                    "job_file": job_file,
                    "overrides": merge_overrides(base, host.settings_overrides()),
                    "chunks": [c.index for c in batch],
                    "host": host.queue,
                },
                work_queue_name=host.queue,
                flow_run_name=f"{settings.name}-{host.queue}-{batch[0].name}",
                timeout=0,  # returns at once; wait_for_shard also notices a host that never starts it
                as_subflow=True,
            )
            state = wait_for_shard(child.id, start_timeout_s, f"shard run {child.name} on {host.queue}")
            if not state.is_completed():
                raise LaneFailed(f"shard run {child.name} on {host.queue} ended {state.name}: {state.message}")

        dispatcher = Dispatcher(
            [h.queue for h in hosts],
            run_shard,
            lambda lane, batch, _: logger.info("%s finished %s", hosts[lane].queue, ", ".join(c.name for c in batch)),
            batch=chunks_per_run,
            retries=settings.chunk_retries,
            retry_delay_s=settings.chunk_retry_delay_s,
        )
        failure: BaseException | None = None
        try:
            dispatcher(todo)
            logger.info("wrote %s", results := consolidate(out, plan.chunks, plan.total_rows))
            if wants_openai_output(settings):
                target = out / "openai-output.jsonl"
                logger.info("wrote %s", write_openai_output(results, target, settings.model, fingerprint))
        except BaseException as exc:
            failure = exc
            raise
        finally:
            manifest = Manifest.counted(settings, plan, fingerprint, started, failure)
            manifest.hosts = [h.queue for h in hosts]
            # This run's shards only: an earlier, interrupted run of the job left its own there.
            shards = [m for m in read_shard_manifests(out) if m.started_at >= started]
            add_up_shards(manifest, shards, started)
            manifest.write(out)
            report = render_scale_out_report(settings, manifest, shards, dispatcher.events)
            write_atomic(out / "report.md", lambda tmp: tmp.write_text(report, encoding="utf-8"))
            publish_artifacts(settings.name, report, f"{settings.name} over hosts")
            if isinstance(failure, stopping.Interrupted):
                failure.on_disk = f"{manifest.rows_ok + manifest.rows_error:,} rows on disk in {out}"
    return manifest.model_dump(mode="json")
