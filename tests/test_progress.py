"""Live progress: the numbers never go back, and the artifact is updated seldom enough to watch a run."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import pytest

import flows.batch_inference as batch_flow
from harness.ollama_emulator import OllamaEmulator
from tasks.analysis.progress import (
    ARTIFACT_CHUNK_END_EVERY_S,
    ARTIFACT_EVERY_S,
    Progress,
    Snapshot,
    Throttled,
    terminal_sink,
)
from tests.conftest import when


def test_a_chunk_tried_again_keeps_what_the_failed_try_finished() -> None:
    seen: list[Snapshot] = []
    # One chunk of 16 rows, 4 of them on disk from an earlier run (1 an error row).
    progress = Progress("job", 16, done_before=4, errors_before=1, sinks=[seen.append])
    progress.start()
    progress.update(0, 6, 1)  # the first try checkpoints 6 rows, then its server goes away
    progress.chunk_started(0)  # Prefect's retry, or another endpoint, starts the chunk again
    progress.update(0, 2, 0)  # the new try counts its own rows from 0
    progress.chunk_started(0)
    progress.update(0, 3, 1)
    # This attempt made 12 rows of the chunk: the 11 the tries reported, and one a try journaled
    # after its last report.
    progress.chunk_done(0, 12, 2)
    progress.finish()
    assert [s.done for s in seen] == [4, 10, 12, 15, 16, 16]
    assert [s.errors for s in seen] == [1, 2, 2, 3, 3, 3]
    assert seen[-1].final and seen[-1].line().endswith("done · 3 error rows")
    assert seen[-2].chunk_end and not seen[-3].chunk_end


def test_a_finished_job_prints_its_done_line_once() -> None:
    stream = io.StringIO()  # not a terminal: plain lines
    progress = Progress("job", 8, done_before=8, errors_before=1, sinks=[terminal_sink(stream)])
    progress.start()
    progress.finish()
    assert stream.getvalue().splitlines() == ["[job] 8/8 rows (100.0%) · 0.00 rows/s · done · 1 error rows"]


def test_the_artifact_passes_the_first_chunk_ends_and_the_last_snapshot_only() -> None:
    def snap(**kw: Any) -> Snapshot:
        return Snapshot("job", 1, 10, 0, 1.0, **kw)

    shown: list[Snapshot] = []
    throttled = Throttled(shown.append, every_s=3600.0, chunk_end_every_s=0.0)
    throttled(first := snap())
    throttled(snap())  # a checkpoint: within the hour, dropped
    throttled(end := snap(chunk_end=True))
    throttled(snap())
    throttled(last := snap(final=True))
    assert shown == [first, end, last]
    # Without chunk_end_every_s (the terminal's plain lines), a chunk's end waits like any snapshot.
    plain: list[Snapshot] = []
    lines = Throttled(plain.append, every_s=3600.0)
    for s in (first, end, last):
        lines(s)
    assert plain == [first, last]
    assert ARTIFACT_EVERY_S >= 30 and ARTIFACT_CHUNK_END_EVERY_S >= 2


@pytest.mark.usefixtures("prefect_server")
def test_progress_never_goes_back_when_a_chunk_moves_to_another_endpoint(
    job: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slow endpoint dies inside its chunk after reporting rows; the other endpoint finishes that
    chunk, counting its own rows from 0. Every snapshot the terminal got counts up, to all 96 rows."""
    seen: list[Snapshot] = []
    lock = threading.Lock()

    def record(snap: Snapshot) -> None:
        with lock:
            seen.append(snap)

    monkeypatch.setattr(batch_flow, "terminal_sink", lambda: record)
    with (
        OllamaEmulator(models=["gemma3:12b"], parallel=8, latency_s=0.01) as fast,
        # Slow enough that its chunk (12 rounds of 4) outlasts the fast chunk even on a loaded CI machine.
        OllamaEmulator(models=["gemma3:12b"], parallel=8, latency_s=0.5) as slow,
    ):
        settings = job(96, name="backwards", chunk_size=48, checkpoint_rows=4, outage_budget_s=0.5, request_timeout_s=5)
        del settings["ollama_host"]
        settings["endpoints"] = [{"host": emu.host} for emu in (fast, slow)]

        def reported_on_slow() -> bool:
            # The fast endpoint's chunk ended (48 rows) and the slow one's has reported 8 rows or more.
            with lock:
                return any(s.chunk_end for s in seen) and seen[-1].done >= 48 + 8

        killer = when(reported_on_slow, slow.down)
        manifest = batch_flow.batch_inference(overrides=settings)
        killer.join(timeout_s=5)
    assert manifest["complete"] and manifest["rows_ok"] == 96
    assert 8 <= len(slow.chat_prompts()) < 48, "the slow endpoint died inside its chunk"
    done = [s.done for s in seen]
    assert done == sorted(done), f"progress went back: {done}"
    assert seen[-1].final and seen[-1].done == 96
    assert Path(settings["output_dir"], "results.parquet").exists()
