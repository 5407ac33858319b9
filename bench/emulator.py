"""The Ollama emulator as the benchmark drives it, and what its request records say.

Every input row carries its index in the prompt ("row=N"), so the emulator's records tell which chunk each
request belonged to: the sending window (first request → last answer), the phases of a flow process around
it, and the hand-over gaps between chunks.
"""

from __future__ import annotations

import re
import statistics
from typing import Any

from bench.common import ProcessRun, r
from harness.ollama_emulator import OllamaEmulator, RequestRecord

ROW_RE = re.compile(r"row=(\d+)")


class BenchEmulator(OllamaEmulator):
    """The test emulator, keeping request records but not request bodies (170K of them add up)."""

    def _infer(self, h: Any, rec: RequestRecord, body: dict[str, Any], model: str, chat: bool) -> None:
        try:
            super()._infer(h, rec, body, model, chat)
        finally:
            rec.body = None


def chat_records(emu: OllamaEmulator) -> list[RequestRecord]:
    """Answered /api/chat requests in arrival order."""
    recs = [r for r in emu.requests if r.path == "/api/chat" and r.status == 200 and r.t_end is not None]
    return sorted(recs, key=lambda rec: rec.t_start)


def row_of(rec: RequestRecord) -> int:
    match = ROW_RE.search(rec.prompt or "")
    if match is None:
        raise RuntimeError(f"request without a row marker: {rec.prompt!r:.80}")
    return int(match.group(1))


def window(recs: list[RequestRecord]) -> tuple[float, float]:
    return min(rec.t_start for rec in recs), max(rec.t_end or rec.t_start for rec in recs)


def phases(run: ProcessRun, recs: list[RequestRecord]) -> dict[str, float | None]:
    first, last = window(recs)
    return {
        "wall_s": r(run.wall_s),
        "start_to_first_request_s": r(first - run.t_start),
        "sending_window_s": r(last - first),
        "last_response_to_exit_s": r(run.t_end - last),
        "flow_process_cpu_s": r(run.cpu_s),
    }


def handover_gaps(recs: list[RequestRecord], chunk_size: int) -> dict[str, Any]:
    """Per chunk boundary: last answer of chunk k → first request of chunk k+1."""
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for rec in recs:
        k = row_of(rec) // chunk_size
        first[k] = min(first.get(k, rec.t_start), rec.t_start)
        last[k] = max(last.get(k, rec.t_end or rec.t_start), rec.t_end or rec.t_start)
    chunks = sorted(first)
    gaps = [first[b] - last[a] for a, b in zip(chunks, chunks[1:], strict=False)]
    windows = [last[k] - first[k] for k in chunks]
    return {
        "chunks": len(chunks),
        "gap_ms_median": r(1000 * statistics.median(gaps), 1) if gaps else None,
        "gap_ms_max": r(1000 * max(gaps), 1) if gaps else None,
        "gap_s_total": r(sum(gaps), 3) if gaps else 0.0,
        "chunk_seconds_first_median_last": [r(windows[0], 2), r(statistics.median(windows), 2), r(windows[-1], 2)],
    }
