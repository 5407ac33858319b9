"""2. Slot saturation: does the flow keep N server slots busy at in_flight = N?

An emulator with N slots (N = 1, 4, 8), each request 6 ms + 20 ms per answer token: 286 ms, the users'
measured 3.5 req/s at one slot. Baselines, same run: the ideal the emulator defines (N slots busy all the time;
`efficiency_vs_capacity` = ideal / the flow's sending window) and a naive one-request-at-a-time ollama.Client
loop on the same emulator and rows (`speedup_vs_naive`).
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.clients import client_spec
from bench.common import MODEL, OPTIONS, TEMPLATE, Bench, log, r, texts_of
from bench.emulator import BenchEmulator, chat_records, phases, window
from harness.ollama_emulator import completion_for

# A slot serves a request in SAT_LATENCY_S (prompt processing) + eval_count x SAT_PER_TOKEN_S.
# Every answer here is 14 tokens: 6 + 14 x 20 = 286 ms, the users' measured 3.5 req/s at one slot
# (20 ms/token = 50 tokens/s per sequence, a 12B Q4 model on a 16 GB card).
SAT_LATENCY_S, SAT_PER_TOKEN_S = 0.006, 0.020


def messages_for(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": TEMPLATE.format(text=text)}]


def service_seconds(texts: list[str], latency_s: float, per_token_s: float) -> list[float]:
    """The time a slot of the emulator spends on each row (no load: keep_alive=-1, one num_ctx)."""
    return [latency_s + completion_for(messages_for(t), None, OPTIONS).eval_count * per_token_s for t in texts]


def bench_saturation(b: Bench) -> dict[str, Any]:
    """Throughput ÷ the emulator's capacity (N slots busy all the time), in_flight = N; and ÷ a naive loop."""
    points = []
    for slots in b.profile.saturation_slots:
        rows = b.profile.saturation_rows_per_slot * slots
        path = b.input_file(rows, tag=f"sat{slots}")
        texts = texts_of(path)
        service = service_seconds(texts, SAT_LATENCY_S, SAT_PER_TOKEN_S)
        ideal_s = max(sum(service) / slots, max(service))
        with BenchEmulator([MODEL], parallel=slots, latency_s=SAT_LATENCY_S, per_token_s=SAT_PER_TOKEN_S) as emu:
            job = b.job_file(f"sat-{slots}", input_path=str(path), ollama_host=emu.host, in_flight=slots)
            log(f"2. saturation: {slots} slot(s), in_flight {slots}, {rows} rows, ideal {ideal_s:.2f}s")
            run = b.run_flow(job)
            recs = chat_records(emu)
            peak_in_flight = emu.peak_in_flight
            first, last = window(recs)
            emu.reset_stats()
            naive_n = min(rows, b.profile.naive_rows)
            log(f"2. saturation: naive loop, {naive_n} rows, one request at a time")
            naive, naive_run = b.run_helper("naive", client_spec(emu.host, texts[:naive_n]))
        if len(recs) != rows:
            raise RuntimeError(f"saturation: {len(recs)} requests for {rows} rows")
        flow_rps = rows / (last - first)
        naive_rps = naive["rows"] / naive["seconds"]
        naive_ideal_s = sum(service[:naive_n])
        # Time a slot waits per request beyond its service time: the client's turnaround (answer
        # parsed, row recorded, next request sent) plus HTTP and the emulator's own handling.
        turnaround_s = ((last - first) * slots - sum(service)) / rows
        naive_turnaround_s = (naive["seconds"] - naive_ideal_s) / naive_n
        points.append(
            {
                "slots": slots,
                "in_flight": slots,
                "rows": rows,
                "service_ms_per_request": r(1000 * statistics.mean(service), 1),
                "capacity_rows_per_s": r(rows / ideal_s, 2),
                "ideal_s": r(ideal_s),
                **phases(run, recs),
                "achieved_rows_per_s": r(flow_rps, 2),
                "efficiency_vs_capacity": r(ideal_s / (last - first), 4),
                "slot_idle_ms_per_request": r(1000 * turnaround_s, 2),
                "peak_requests_in_server": peak_in_flight,
                "naive_rows": naive["rows"],
                "naive_rows_per_s": r(naive_rps, 2),
                "naive_efficiency_vs_one_slot": r(naive_ideal_s / naive["seconds"], 4),
                "naive_slot_idle_ms_per_request": r(1000 * naive_turnaround_s, 2),
                "speedup_vs_naive": r(flow_rps / naive_rps, 3),
                "speedup_vs_naive_end_to_end": r((rows / run.wall_s) / (naive["rows"] / naive_run.wall_s), 3),
            }
        )
    return {
        "what": f"emulator with N slots, each request {SAT_LATENCY_S * 1000:.0f} ms + eval_count x "
        f"{SAT_PER_TOKEN_S * 1000:.0f} ms (eval_count from completion_for); efficiency = ideal time (N slots "
        "always busy) / the flow's sending window (first request → last answer); slot_idle_ms_per_request = "
        "(window x N - total service) / rows; naive = ollama.Client.chat "
        "in a loop, one request at a time, same emulator and rows (the first naive_rows)",
        "points": points,
        "target_efficiency_ge_0.97": all(p["efficiency_vs_capacity"] >= 0.97 for p in points),
    }
