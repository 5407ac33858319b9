"""5. Resume: what skipping finished chunks costs when a half-done job is run again.

Takes the job section's large run, deletes the last half of its chunk files and results.parquet, and runs the
same command again against an emulator that answers at once. Baseline, same run: that job's fresh start-to-
first-request time; `skip_cost_s` is the difference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from bench.common import CHUNK_SIZE, MODEL, Bench, log, r
from bench.emulator import BenchEmulator, chat_records, row_of, window
from bench.job import JOB_PARALLEL


def bench_resume(b: Bench, job_section: dict[str, Any]) -> dict[str, Any]:
    """Half of the big job's chunk files and results.parquet deleted, rerun: what does skipping cost?"""
    big = job_section["runs"][-1]
    job = Path(big["_job"])
    out_dir = b.work / "out" / job.stem
    chunk_files = sorted((out_dir / "chunks").glob("chunk-?????.parquet"))
    keep = len(chunk_files) // 2
    for path in chunk_files[keep:]:
        path.unlink()
    (out_dir / "results.parquet").unlink()
    redo_rows = big["rows"] - keep * CHUNK_SIZE
    # Answers come instantly here: what is measured is the skip, then the client's own pace.
    with BenchEmulator([MODEL], parallel=JOB_PARALLEL) as emu:
        settings = yaml.safe_load(job.read_text())
        settings["ollama_host"] = emu.host  # plumbing: a rerun may change it and still resume
        job.write_text(yaml.safe_dump(settings, sort_keys=False))
        log(f"5. resume: {keep} of {len(chunk_files)} chunks kept, {redo_rows:,} rows to redo")
        run = b.run_flow(job)
        recs = chat_records(emu)
    if len(recs) != redo_rows or min(row_of(rec) for rec in recs) != keep * CHUNK_SIZE:
        raise RuntimeError(f"resume sent {len(recs)} requests, expected {redo_rows} from row {keep * CHUNK_SIZE}")
    first, last = window(recs)
    before_first = first - run.t_start
    return {
        "what": f"the {big['rows']:,}-row job of section 3, then its last {len(chunk_files) - keep} chunk files "
        "and results.parquet deleted and the same command run again (emulator answering instantly)",
        "chunks_kept": keep,
        "rows_redone": redo_rows,
        "wall_s": r(run.wall_s, 2),
        "start_to_first_new_request_s": r(before_first, 3),
        "fresh_run_start_to_first_request_s": r(big["_first_request_s"], 3),
        "skip_cost_s": r(before_first - big["_first_request_s"], 3),
        "skip_cost_ms_per_finished_chunk": r(1000 * (before_first - big["_first_request_s"]) / keep, 1),
        "sending_window_s": r(last - first, 2),
        "last_response_to_exit_s": r(run.t_end - last, 2),
        "peak_rss_mib": r(run.maxrss_mib, 1),
    }
