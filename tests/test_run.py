"""The whole run without Prefect (tasks/run.py): run_job on the fake backend, resume, manifest and report.

No server: the steps are plain calls (`Direct`) that hand each chunk the fake backend. The flow runs
the same run_job with Prefect's steps (tests/test_flow.py and the end-to-end tests).
"""

from __future__ import annotations

import json
from datetime import date
from typing import Any

import polars as pl
import pytest

from tasks.analysis.progress import Progress, Snapshot
from tasks.analysis.telemetry import FIRST_ANSWER, Sampler, warm_ups
from tasks.inference.backends import BackendError
from tasks.inference.backends.fake import FakeBackend
from tasks.inference.runner import ChunkAborted
from tasks.plan.dataset import ChunkSpec, validate_input
from tasks.plan.job import ChunkInputs, Job, plan_job
from tasks.run import Checks, Direct, chunk_on_endpoint, run_job
from tasks.schema import ChunkStats
from tasks.settings.model import JobSettings
from tasks.storage.manifest import Manifest
from tasks.storage.results import counts

DOWN = BackendError("unreachable", "unreachable", "cannot reach Ollama at http://127.0.0.1:9")


class FakeSteps(Direct):
    """Plain steps whose endpoint is the fake backend: checked without a request, each chunk on `fake`."""

    def __init__(self, fake: FakeBackend) -> None:
        self.fake = fake

    def check_backends(self, settings: JobSettings) -> Checks:
        return [settings], [], []

    def run_chunk(
        self,
        lane: JobSettings,
        chunk: ChunkSpec,
        inputs: ChunkInputs,
        progress: Progress,
        sampler: Sampler,
        auto: dict[str, Any] | None,
    ) -> ChunkStats:
        return chunk_on_endpoint(lane, chunk, inputs, progress, sampler, auto, self.fake)


def planned(offline_job: Any, n: int, **overrides: Any) -> Job:
    return plan_job(None, offline_job(n, **overrides), date(2026, 12, 5), validate=validate_input)


def test_a_run_without_prefect_writes_results_manifest_and_report(offline_job: Any) -> None:
    job = planned(offline_job, 20, chunk_size=8)
    fake = FakeBackend()
    fake.always("not json at all {", match="candidate 3 writes")  # still an answer: free text
    seen: list[Snapshot] = []
    manifest = run_job(job, FakeSteps(fake), [seen.append])
    out = job.settings.output_dir
    assert manifest.complete and (manifest.rows_ok, manifest.rows_error, manifest.chunks) == (20, 0, 3)
    assert pl.read_parquet(out / "results.parquet")["row_index"].to_list() == list(range(20))
    on_disk = Manifest.model_validate_json((out / "manifest.json").read_text())
    assert on_disk == manifest and [a.rows_sent for a in on_disk.attempts] == [20]
    assert "Run report: test" in (out / "report.md").read_text()
    assert seen[-1].final and seen[-1].done == 20
    assert len(fake.history) == 20


def test_a_consolidation_killed_mid_write_leaves_no_temporary_file_after_the_next_run(offline_job: Any) -> None:
    """SIGKILL while results.parquet was written leaves `.results.parquet.<pid>.tmp`, as large as the results;
    the next consolidation removes it. A live process's is its own: left alone."""
    import os
    import subprocess
    import sys

    job = planned(offline_job, 8, chunk_size=8)
    out = job.settings.output_dir
    out.mkdir(parents=True, exist_ok=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed, alive = out / f".results.parquet.{int(gone.stdout)}.tmp", out / f".results.parquet.{os.getppid()}.tmp"
    killed.write_bytes(b"PAR1 half"), alive.write_bytes(b"PAR1 half")
    assert run_job(job, FakeSteps(FakeBackend()), []).complete
    assert not killed.exists() and alive.exists()


def test_rows_answered_without_a_request_are_not_the_engines_rate(offline_job: Any) -> None:
    """Half the rows have an empty field: error rows made without a request. The chunk's sent rows, and
    the requests/s the ETA is built on, count the other half only."""
    frame = pl.DataFrame(
        {"id": [f"r{i}" for i in range(8)], "role": ["x", None] * 4, "text": [f"candidate {i}" for i in range(8)]}
    )
    job = plan_job(None, offline_job(frame=frame, chunk_size=8), date(2026, 12, 5), validate=validate_input)
    fake = FakeBackend()
    manifest = run_job(job, FakeSteps(fake), [])
    (stats,) = manifest.chunk_stats
    assert (manifest.rows_ok, manifest.rows_error, len(fake.history)) == (4, 4, 4)
    assert (stats["sent_rows"], stats["requests"]) == (4, 4)


def test_a_broken_run_resumes_and_its_manifest_keeps_both_attempts(offline_job: Any) -> None:
    job = planned(offline_job, 24, chunk_size=8, in_flight=1, outage_budget_s=0)
    down = FakeBackend()
    down.always(DOWN, match="candidate 12 writes")
    with pytest.raises(ChunkAborted, match="cannot reach Ollama"):
        run_job(job, FakeSteps(down), [])
    out = job.settings.output_dir
    broken = json.loads((out / "manifest.json").read_text())
    # Counted on disk: chunk 0's file and chunk 1's four journaled rows, which the rerun does not send again.
    assert not broken["complete"] and "ChunkAborted" in broken["error"]
    assert (broken["rows_ok"], broken["rows_error"], broken["rows_pending"]) == (12, 0, 12)
    # Tokens are counted as rows are, on disk: the aborted chunk's four journaled answers count too.
    assert broken["tokens_sent"] == broken["tokens_on_disk"] == counts(out, job.plan.chunks)["tokens"] > 0
    up = FakeBackend()
    manifest = run_job(job, FakeSteps(up), [])
    assert manifest.complete and manifest.rows_ok == 24
    assert sorted(r.prompt.split("candidate ")[1] for r in up.history) == sorted(
        f"{i} writes Python" for i in range(12, 24)
    )
    assert [a.complete for a in manifest.attempts] == [False, True]
    # Counted on disk: the broken attempt's 12 are chunk 0 and chunk 1's four journaled rows.
    assert [a.rows_sent for a in manifest.attempts] == [12, 12]
    assert manifest.tokens_sent == manifest.tokens_on_disk - broken["tokens_on_disk"] > 0
    assert 0 < manifest.sending_s <= manifest.wall_s
    assert "2 attempts" in (out / "report.md").read_text()
    # Each attempt's start to its first answer (a model load on Ollama) is marked, and kept out of GPU util.
    marks = pl.read_parquet(out / "telemetry" / "marks.parquet")
    # Every chunk try that answered marks its first answer, the aborted one too: 0 and 1, then 1 and 2.
    assert marks.filter(pl.col("label") == FIRST_ANSWER).height == 4
    spans = warm_ups(marks)
    assert len(spans) == 2 and spans[0][1] < spans[1][0]
    assert all(abs(start - a.started_at) < 2 for (start, _), a in zip(spans, manifest.attempts, strict=True))
