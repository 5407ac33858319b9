"""The batch inference flow: check → plan chunks → one GPU-slot task per chunk → consolidate → report.

Run locally:   python -m flows.batch_inference --config jobs/demo.yaml [--set in_flight=4 ...]
As deployed:   prefect deployment run 'batch-inference/nightly'
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from tasks.backends import BackendError, make_backend
from tasks.config import JobSettings, load_settings
from tasks.dataset import ChunkSpec, JobPlan, validate_input
from tasks.gpu_slot import ensure_gpu_limit, gpu_slot
from tasks.inference import ChunkAborted, ChunkStats, finished_chunk_stats, run_chunk
from tasks.report import RunReporter
from tasks.schema import load_output_model, output_columns
from tasks.store import build_manifest, claim_output_dir, consolidate, counts, finished_rows, write_json_atomic
from tasks.telemetry import Sampler


@task(name="plan-chunks", cache_policy=NO_CACHE)
def plan_chunks(settings: JobSettings) -> JobPlan:
    """Validate the input (columns, ids) and cut it into chunks, before any request is sent."""
    return validate_input(settings)


async def _check_backend(settings: JobSettings) -> None:
    backend = make_backend(settings)
    try:
        await backend.open()
        await backend.check()
    finally:
        await backend.close()


@task(name="check-backend", cache_policy=NO_CACHE)
def check_backend(settings: JobSettings) -> None:
    """Fail fast when the backend is down or lacks the model, naming the host and model."""
    try:
        asyncio.run(_check_backend(settings))
    except BackendError as err:
        raise RuntimeError(f"backend check failed: {err}") from err


def _retry_unless_fatal(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a chunk after an outage; a missing model or a bug will not heal by waiting."""
    try:
        state.result()
    except ChunkAborted as exc:
        return exc.retryable
    except Exception:
        return False
    return False


@task(
    name="run-chunk",
    task_run_name="{chunk.name}",
    cache_policy=NO_CACHE,
    retry_condition_fn=_retry_unless_fatal,
)
def run_chunk_task(settings: JobSettings, chunk: ChunkSpec, reporter: RunReporter) -> ChunkStats:
    """One chunk inside the GPU slot; a retry resumes after the rows already checkpointed."""
    with gpu_slot(settings.gpu_limit, settings.slot_timeout_s):
        reporter.chunk_started(chunk)
        return run_chunk(settings, chunk, on_progress=reporter.progress)


@flow(name="batch-inference", log_prints=True)
def batch_inference(job_file: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score every row of the job's input; returns the manifest."""
    logger = get_run_logger()
    started = time.time()
    # A scheduled run keeps its date through retries and reruns, so it resumes its own directory.
    scheduled = flow_run.scheduled_start_time
    settings = load_settings(job_file, overrides).for_run_date(scheduled.astimezone().date())
    output_model = load_output_model(settings.output_schema) if settings.output_schema else None
    output_columns(output_model)  # a schema field colliding with a result column fails here, not mid-run
    plan = plan_chunks(settings)
    schema_json = None if output_model is None else str(output_model.model_json_schema())
    fingerprint = settings.answer_fingerprint(plan.input_digest, schema_json)
    out = settings.output_dir
    job_record = {
        "settings": settings.model_dump(mode="json"),
        "total_rows": plan.total_rows,
        "chunks": len(plan.chunks),
    }
    with claim_output_dir(out, fingerprint, job_record):
        check_backend(settings)
        ensure_gpu_limit(settings.gpu_limit)
        done_before = sum(len(finished_rows(out, c)) for c in plan.chunks)
        logger.info(
            "%d rows in %d chunks, %d already done; backend %s, model %s, %s in flight",
            plan.total_rows,
            len(plan.chunks),
            done_before,
            settings.backend,
            settings.model,
            settings.in_flight,
        )
        sampler = Sampler(
            interval_s=settings.telemetry_interval_s,
            ollama_host=settings.ollama_base_url if settings.backend == "ollama" else None,
        )
        sampler.start()
        reporter = RunReporter(settings, plan, done_before, sampler)
        failure: BaseException | None = None
        try:
            # Chunks run one after another, in order: each takes the GPU slot the moment the
            # previous one frees it, instead of dozens of task threads polling for it.
            for chunk in plan.chunks:
                if (finished := finished_chunk_stats(settings, chunk)) is not None:
                    reporter.chunk_done(finished)  # done by an earlier run: no task, no GPU slot
                    continue
                stats = run_chunk_task.with_options(
                    retries=settings.chunk_retries, retry_delay_seconds=settings.chunk_retry_delay_s
                )(settings, chunk, reporter)
                reporter.chunk_done(stats)
                if settings.in_flight == "auto" and stats.calibration:
                    # Measured once, on the first rows; the remaining chunks keep the chosen level.
                    settings = settings.model_copy(update={"in_flight": stats.in_flight})
            results = consolidate(out, plan.chunks, plan.total_rows)
            logger.info("wrote %s", results)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            sampler.stop()
            manifest = build_manifest(
                settings,
                plan,
                fingerprint,
                counts(out, plan.chunks),
                started,
                time.time(),
                complete=failure is None,
                error=None if failure is None else f"{type(failure).__name__}: {failure}",
            )
            write_json_atomic(manifest, out / "manifest.json")
            reporter.finish(manifest)
    return manifest


def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set options.num_ctx=8192` → {"options": {"num_ctx": 8192}}; values parse as YAML."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        node = overrides
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML job file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    args = parser.parse_args(argv)
    manifest = batch_inference(job_file=str(args.config) if args.config else None, overrides=_parse_overrides(args.set))
    print(f"{manifest['rows_ok']} ok, {manifest['rows_error']} error rows → {manifest['results']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
