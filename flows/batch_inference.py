"""The batch inference flow: check → plan chunks → one GPU-slot task per chunk → consolidate → report.

Run locally:   python -m flows.batch_inference --config jobs/demo.yaml [--set in_flight=4 ...]
As deployed:   prefect deployment run 'batch-inference/nightly'
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # the command line checks the job before Prefect is even imported
    from typing import Any

    from flows.cli import main

    def _flow() -> Any:  # this file again, under its package name: the flow Prefect deploys
        from flows.batch_inference import batch_inference

        return batch_inference

    sys.exit(main("batch", sys.argv[1:], _flow))

import re
import socket
from typing import Any, cast

from prefect import flow
from prefect.states import Cancelled

from tasks import stopping
from tasks.analysis.progress import (
    ARTIFACT_CHUNK_END_EVERY_S,
    ARTIFACT_EVERY_S,
    Sink,
    Throttled,
    terminal_sink,
)
from tasks.plan.job import plan_job
from tasks.prefect_steps import ArtifactSink, PrefectSteps, plan_chunks, scheduled_day
from tasks.run import Shard, run_job


@flow(name="batch-inference", log_prints=True)
def batch_inference(
    job_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    chunks: list[int] | None = None,
    host: str | None = None,
) -> dict[str, Any]:
    """Score every row of the job's input; returns the manifest.

    `chunks` and `host` are set by the scale-out flow: this run is then one host's shard, runs
    only those chunks inside the parent's output directory, and reports under `<name>-<host>`.
    """
    # SIGINT or SIGTERM (Ctrl-C, `kill`, a Prefect worker cancelling the run) stops the run within
    # seconds, and the manifest and report say "interrupted".
    with stopping.signals_stop_the_run():
        try:
            stopping.check("before the run began")
            job = plan_job(job_file, overrides, scheduled_day(), validate=plan_chunks)
            # Artifact keys take lowercase letters, digits and dashes only.
            label = re.sub(r"[^a-z0-9-]+", "-", (host or socket.gethostname()).lower())
            shard = None if chunks is None else Shard(chunks, label)
            sinks: list[Sink] = [
                Throttled(ArtifactSink(), ARTIFACT_EVERY_S, ARTIFACT_CHUNK_END_EVERY_S),
                terminal_sink(),
            ]
            return run_job(job, PrefectSteps(), sinks, shard=shard).model_dump(mode="json")
        except stopping.Interrupted as exc:
            # The flow run ends Cancelled with the reason, not Failed: someone stopped it, nothing
            # broke, and a worker's cancellation must end Cancelled anyway (Prefect lets a Cancelling
            # run go nowhere else). Returned as a state, not raised: Prefect then logs one line, not
            # a traceback, and the caller still gets `exc` (a state's result() raises the exception
            # it carries), with how far the run got.
            return cast(dict[str, Any], Cancelled(message=str(exc), data=exc))
