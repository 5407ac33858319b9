"""3. The production-sized job (170K rows; quick: 17K) on fast answers: wall vs ideal, memory, hand-overs.

An emulator with 4 slots x 5 ms (800 rows/s capacity), in_flight 8, a small and a large job. Baselines, same
run: the ideal time (rows x 5 ms / 4 slots), a bare ollama.AsyncClient from 8 asyncio workers on the same
emulator (`*_over_bare_client`), and the small job's peak RSS (`target_memory_flat`: the large job's peak
stays under 1.25x it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.clients import BARE_ROWS, client_spec
from bench.common import CHUNK_SIZE, GPU_RATES, MODEL, Bench, log, r, texts_of
from bench.emulator import BenchEmulator, chat_records, handover_gaps, phases, row_of, window

# "Fast answers": 4 slots x 5 ms = 800 rows/s, ~200x a real 12B model, so 170K rows take
# minutes. in_flight = 2 x slots: at 5 ms a request, the client's own turnaround would otherwise idle slots.
JOB_PARALLEL, JOB_LATENCY_S, JOB_IN_FLIGHT = 4, 0.005, 8


def bench_job(b: Bench) -> dict[str, Any]:
    """The production-sized job on fast answers: wall vs ideal, peak RSS, hand-over gaps."""
    out: dict[str, Any] = {
        "what": f"emulator {JOB_PARALLEL} slots x {JOB_LATENCY_S * 1000:.0f} ms per request "
        f"(capacity {JOB_PARALLEL / JOB_LATENCY_S:.0f} rows/s), in_flight {JOB_IN_FLIGHT}, chunk_size {CHUNK_SIZE}; "
        "RSS of the flow process sampled every 0.1 s, peak from wait4(); gaps from the emulator's records; "
        f"bare client = ollama.AsyncClient.chat from {JOB_IN_FLIGHT} asyncio workers on the same emulator",
        "runs": [],
    }
    with BenchEmulator([MODEL], parallel=JOB_PARALLEL, latency_s=JOB_LATENCY_S) as emu:
        for rows in b.profile.job_rows:
            emu.reset_stats()
            job = b.job_file(
                f"job-{rows}", input_path=str(b.input_file(rows)), ollama_host=emu.host, in_flight=JOB_IN_FLIGHT
            )
            ideal_s = rows * JOB_LATENCY_S / JOB_PARALLEL
            log(f"3. job: {rows:,} rows, ideal {ideal_s:.0f}s")
            run = b.run_flow(job)
            recs = chat_records(emu)
            if len(recs) != rows or len({row_of(rec) for rec in recs}) != rows:
                raise RuntimeError(f"job: {len(recs)} requests for {rows} rows")
            first, last = window(recs)
            quarter = [first + q * (last - first) for q in (0.25, 0.5, 0.75, 1.0)]
            results = Path(job.parent.parent / "out" / job.stem / "results.parquet")
            out["runs"].append(
                {
                    "rows": rows,
                    "ideal_s": r(ideal_s, 2),
                    **phases(run, recs),
                    "ideal_over_wall": r(ideal_s / run.wall_s, 4),
                    "ideal_over_sending_window": r(ideal_s / (last - first), 4),
                    "rows_per_s_sending": r(rows / (last - first), 1),
                    "flow_cpu_pct_of_one_core_while_sending": r(100 * run.cpu_s / run.wall_s, 1),
                    "peak_rss_mib": r(run.maxrss_mib, 1),
                    "peak_rss_while_sending_mib": r(run.rss_peak_between(first, last), 1),
                    "peak_rss_after_sending_mib": r(run.rss_peak_between(last, run.t_end), 1),
                    "rss_mib_at_25_50_75_100pct_of_sending": [r(run.rss_at(t), 1) for t in quarter],
                    "handover": (gaps := handover_gaps(recs, CHUNK_SIZE)),
                    "rows_per_s_within_chunks": r(rows / (last - first - gaps["gap_s_total"]), 1),
                    "results_parquet_mib": r(results.stat().st_size / 2**20, 2),
                    "_job": str(job),
                    "_first_request_s": first - run.t_start,
                }
            )
        emu.reset_stats()
        bare_n = min(BARE_ROWS, b.profile.job_rows[-1])
        log(f"3. job: bare ollama.AsyncClient baseline, {bare_n:,} rows, in_flight {JOB_IN_FLIGHT}")
        bare_texts = texts_of(b.input_file(b.profile.job_rows[-1]), bare_n)
        bare, _ = b.run_helper("bare-client", {**client_spec(emu.host, bare_texts), "in_flight": JOB_IN_FLIGHT})
    bare_rps = bare["rows"] / bare["seconds"]
    out["bare_client_rows_per_s"] = r(bare_rps, 1)
    out["bare_client_over_capacity"] = r(bare_rps / (JOB_PARALLEL / JOB_LATENCY_S), 4)
    for run in out["runs"]:
        run["within_chunks_over_bare_client"] = r(run["rows_per_s_within_chunks"] / bare_rps, 4)
        run["sending_over_bare_client"] = r(run["rows_per_s_sending"] / bare_rps, 4)
    small, large = out["runs"]
    gap_s = (large["handover"]["gap_ms_median"] or 0.0) / 1000
    # A hand-over idles the GPU once per chunk: its share of a chunk's time at real GPU rates.
    out["handover_share_of_chunk_time_pct"] = {
        label: r(100 * gap_s / (CHUNK_SIZE / rps), 3) for label, rps in GPU_RATES.items()
    }
    out["peak_rss_ratio_large_over_small"] = r(large["peak_rss_mib"] / small["peak_rss_mib"], 3)
    out["rows_ratio_large_over_small"] = r(large["rows"] / small["rows"], 1)
    out["target_memory_flat"] = out["peak_rss_ratio_large_over_small"] < 1.25
    return out
