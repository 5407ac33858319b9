"""1. Orchestration: what the pipeline itself costs, per flow run and per row.

The real flow via the CLI after a warm-up run, against an emulator that answers at once (4 slots, in_flight 4,
chunk_size 5000), on a small and a large input: fixed cost = process wall - sending window (mean of the runs),
per row = the large run's sending window / rows (chunk hand-overs included); the linear fit of the two walls is
the cross-check. Their share of a 170K-row GPU job at the users' 3.5 req/s and a batched 30 req/s is the
headline. Baseline, same run and emulator: a bare ollama.AsyncClient from 4 asyncio workers
(`flow_over_bare_client`).
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.clients import BARE_ROWS, client_spec
from bench.common import CHUNK_SIZE, GPU_RATES, MODEL, PRODUCTION_ROWS, Bench, log, r, strip_private, texts_of
from bench.emulator import BenchEmulator, chat_records, handover_gaps, phases, window


def bench_orchestration(b: Bench) -> dict[str, Any]:
    """Rows/s end to end with an emulator that answers at once: what the pipeline itself costs."""
    small, large = b.profile.orchestration_rows
    runs: dict[int, dict[str, Any]] = {}
    with BenchEmulator([MODEL], parallel=4) as emu:
        # A first flow pays for cold imports and the server's first writes: warm up, discard.
        log("1. orchestration: warm-up run, 200 rows")
        b.run_flow(b.job_file("orch-warmup", input_path=str(b.input_file(200)), ollama_host=emu.host, in_flight=4))
        for rows in (small, large):
            emu.reset_stats()
            job = b.job_file(f"orch-{rows}", input_path=str(b.input_file(rows)), ollama_host=emu.host, in_flight=4)
            log(f"1. orchestration: {rows:,} rows, instant answers, in_flight 4")
            run = b.run_flow(job)
            recs = chat_records(emu)
            if len(recs) != rows:
                raise RuntimeError(f"orchestration: {len(recs)} requests for {rows} rows")
            first, last = window(recs)
            gaps = handover_gaps(recs, CHUNK_SIZE)
            runs[rows] = {
                "rows": rows,
                **phases(run, recs),
                "handover_gap_s_total": gaps["gap_s_total"],
                "_wall": run.wall_s,
                "_cpu": run.cpu_s,
                "_window": last - first,
                "_gaps": gaps["gap_s_total"],
                "_fixed": run.wall_s - (last - first),
            }
        bare_n = min(large, BARE_ROWS)
        log(f"1. orchestration: bare ollama.AsyncClient baseline, {bare_n:,} rows, in_flight 4")
        bare, _ = b.run_helper(
            "bare-client",
            {**client_spec(emu.host, texts_of(b.input_file(large), bare_n)), "in_flight": 4},
        )
    # Fixed: start-up (imports, settings, input check, backend check, GPU limit) + finish
    # (consolidate, manifest, report, artifacts). Per row: the sending window of the large run,
    # which includes its chunk hand-overs. The linear fit of the two walls is the cross-check.
    fixed_s = statistics.mean(run["_fixed"] for run in runs.values())
    per_row_s = runs[large]["_window"] / large
    cpu_per_row_s = (runs[large]["_cpu"] - runs[small]["_cpu"]) / (large - small)
    fit_per_row_s = (runs[large]["_wall"] - runs[small]["_wall"]) / (large - small)
    fit_fixed_s = runs[small]["_wall"] - small * fit_per_row_s
    bare_rps = bare["rows"] / bare["seconds"]
    no_gaps_rps = large / (runs[large]["_window"] - runs[large]["_gaps"])
    share = {}
    for label, rps in GPU_RATES.items():
        job_s = PRODUCTION_ROWS / rps
        added_s = fixed_s + PRODUCTION_ROWS * per_row_s
        share[label] = {
            "gpu_ms_per_row": r(1000 / rps, 1),
            "overhead_share_pct": r(100 * added_s / job_s, 3),
            "client_cpu_pct_of_one_core": r(100 * cpu_per_row_s * rps, 2),
        }
    return {
        "what": "real flow via the CLI after a warm-up run, emulator answering instantly (4 slots, in_flight 4, "
        "chunk_size 5000); fixed = process wall - sending window (mean of the runs), per row = the large run's "
        "sending window / rows (chunk hand-overs included); linear fit of the two walls as a cross-check; "
        "bare client = ollama.AsyncClient.chat from 4 asyncio workers, nothing else, same emulator",
        "runs": strip_private(list(runs.values())),
        "fixed_overhead_per_flow_run_s": r(fixed_s, 2),
        "steady_state_rows_per_s": r(1 / per_row_s, 1),
        "overhead_ms_per_row": r(per_row_s * 1000, 3),
        "client_cpu_ms_per_row": r(cpu_per_row_s * 1000, 3),
        "rows_per_s_without_chunk_handovers": r(no_gaps_rps, 1),
        "linear_fit": {"fixed_s": r(fit_fixed_s, 2), "rows_per_s": r(1 / fit_per_row_s, 1)},
        "bare_client_rows_per_s": r(bare_rps, 1),
        "flow_over_bare_client": r((1 / per_row_s) / bare_rps, 4),
        "flow_without_handovers_over_bare_client": r(no_gaps_rps / bare_rps, 4),
        "share_of_170k_gpu_job": share,
        "share_note": "(fixed + 170,000 x overhead_ms_per_row) / (170,000 x gpu_ms_per_row): an upper bound that "
        "assumes no overlap; with in_flight >= 2 the client works while the GPU decodes",
        "target_share_lt_1pct_at_users_baseline": share["users_baseline_3.5_rps"]["overhead_share_pct"] < 1.0,
    }
