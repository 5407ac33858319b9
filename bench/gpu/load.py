"""A bare async client against an OpenAI-compatible server: the engine's curve without the product.

Keeps C chat requests in flight (a closed loop: each finished request is replaced at once), one
level after another, and samples the GPU with NVML every 0.1 s. Needs only httpx (and nvidia-ml-py
for the GPU figures), so it runs on a GPU machine before anything else is installed.

    python -m bench.gpu.load --url http://127.0.0.1:8080 --levels 1,2,4,8 --max-tokens 16 --out short.json
    python -m bench.gpu.load --levels 32 --max-tokens 128 --rows 300     # a whole job, as the product runs it

A level's figures come from a cohort fixed by start order: the requests sent after the first C
(the first round, which starts all at once, is left out), max(C, 12) of them. The level keeps C in
flight until every member of the cohort came back (or --max-level-s passed), then cancels what is
left. rows/s is Little's law, C / mean latency of the cohort: equal-length requests finish in bursts
of C, so counting completions in a short window over- or under-counts by a whole burst, and the
first finishers of a window are the quick ones; a cohort chosen when its requests are sent is
neither. A level takes about two rounds and a cohort's worth of requests. Every request is a record
not sent before (--prompts of them from --first-row on): a repeated one would skip its prompt.

With --rows N it sends exactly records K..K+N-1 (--first-row K) instead, and rows/s is N over the time from the first
request to the last answer (fill and drain included): the product's own job, without the product.
Past --max-level-s the rest is cancelled (`cut`) and rows/s counts what came back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.gpu.rows import SYSTEM_PROMPT, candidate_records

try:  # the GPU figures are optional: without a driver the curve is still measured
    import pynvml
except ImportError:  # pragma: no cover - nvidia-ml-py is a dependency of the product
    pynvml = None

SCHEMA = {
    "type": "object",
    # A bounded reason: the grammar then ends every answer well within 64 tokens, even a random model's.
    "properties": {
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
        "reason": {"type": "string", "maxLength": 40},
    },
    "required": ["score", "reason"],
}


class Gpu:
    """NVML utilisation and power every `interval_s` on a thread; `window(t0, t1)` averages them."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.samples: list[tuple[float, float, float, float]] = []  # (t, util %, power W, used MiB)
        self.interval_s = interval_s
        self.stop = threading.Event()
        self.handle: Any = None
        if pynvml is not None:
            try:
                pynvml.nvmlInit()
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            except pynvml.NVMLError:
                self.handle = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def name(self) -> str | None:
        return str(pynvml.nvmlDeviceGetName(self.handle)) if self.handle is not None else None

    def _run(self) -> None:
        while self.handle is not None and not self.stop.wait(self.interval_s):
            util = pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
            power = pynvml.nvmlDeviceGetPowerUsage(self.handle) / 1000
            used = pynvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**20
            self.samples.append((time.monotonic(), util, power, used))

    def window(self, t0: float, t1: float) -> dict[str, float | None]:
        picked = [s for s in self.samples if t0 <= s[0] <= t1]
        if not picked:
            return {"gpu_util_pct": None, "power_w": None, "vram_mib": None}
        return {
            "gpu_util_pct": round(statistics.fmean(s[1] for s in picked), 1),
            "power_w": round(statistics.fmean(s[2] for s in picked), 1),
            "vram_mib": round(max(s[3] for s in picked)),
        }


@dataclass
class Level:
    """One level's cohort: (start, end, completion tokens, the server's own ms or None) of each member
    that came back."""

    in_flight: int
    done: list[tuple[float, float, int, float | None]] = field(default_factory=list)
    failed: int = 0
    cut: int = 0  # cohort members still out when the level's time ran out (its reading leans fast)


async def run_level(
    client: httpx.AsyncClient, body: dict[str, Any], prompts: Iterator[str], level: Level, max_s: float
) -> tuple[float, float]:
    """Keep level.in_flight requests out until the cohort came back; returns the measured (t0, t1)."""
    first, size = level.in_flight, max(level.in_flight, 12)
    cohort = range(first, first + size)  # request numbers, in the order they are sent
    left = set(cohort)
    enough = asyncio.Event()
    counter = iter(range(10**9))
    t0 = time.monotonic()

    async def one() -> None:
        while not enough.is_set():
            number, prompt = next(counter), next(prompts)
            messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
            started = time.monotonic()
            try:
                resp = await client.post("/v1/chat/completions", json={**body, "messages": messages})
                resp.raise_for_status()
                tokens, server_ms = answered(resp)
            except (httpx.HTTPError, KeyError, ValueError):
                level.failed += 1
                tokens, server_ms = -1, None
            if number in left:
                left.discard(number)
                if tokens >= 0:
                    level.done.append((started, time.monotonic(), tokens, server_ms))
                if not left:
                    enough.set()

    workers = [asyncio.create_task(one()) for _ in range(level.in_flight)]
    with contextlib.suppress(TimeoutError):  # a slow level ends at max_s with what came back
        await asyncio.wait_for(enough.wait(), max_s)
    t1 = time.monotonic()
    level.cut = len(left)
    for worker in workers:
        worker.cancel()  # the server cancels a request whose connection closes
    await asyncio.gather(*workers, return_exceptions=True)
    return t0, t1


async def run_rows(
    client: httpx.AsyncClient, body: dict[str, Any], prompts: list[str], level: Level, max_s: float
) -> tuple[float, float]:
    """Send every prompt once with level.in_flight out at a time; returns (first send, last answer).
    Past max_s what is still out is cancelled and counted in `cut`: a stalled server costs max_s, not the call."""
    todo = iter(prompts)

    async def one() -> None:
        for prompt in todo:
            messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
            started = time.monotonic()
            try:
                resp = await client.post("/v1/chat/completions", json={**body, "messages": messages})
                resp.raise_for_status()
                level.done.append((started, time.monotonic(), *answered(resp)))
            except (httpx.HTTPError, KeyError, ValueError):
                level.failed += 1

    t0 = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(level.in_flight))), max_s)
    except TimeoutError:
        level.cut = len(prompts) - len(level.done) - level.failed
    return t0, time.monotonic()


def answered(resp: httpx.Response) -> tuple[int, float | None]:
    """Completion tokens, and llama.cpp's own prompt + generation ms (None from a server that sends no timings)."""
    answer = resp.json()
    timings = answer.get("timings") or {}
    server_ms = timings["prompt_ms"] + timings["predicted_ms"] if "predicted_ms" in timings else None
    return int(answer["usage"]["completion_tokens"]), server_ms


def server_share(level: Level) -> dict[str, float | None]:
    """The share of the requests' time the server's own timings cover, and the mean seconds outside them:
    a host prompt cache saving slot states, queueing and HTTP show up outside."""
    timed = [(end - start, ms / 1000) for start, end, _, ms in level.done if ms is not None]
    waited = sum(w for w, _ in timed)
    if not waited:
        return {"server_share": None, "outside_s": None}
    inside = sum(s for _, s in timed)
    return {"server_share": round(inside / waited, 3), "outside_s": round((waited - inside) / len(timed), 3)}


def job_figures(level: Level, t0: float, t1: float, gpu: Gpu) -> dict[str, Any]:
    latencies = [end - start for start, end, *_ in level.done]
    tokens = sum(n for _, _, n, _ in level.done)
    return {
        "in_flight": level.in_flight,
        "rows": len(latencies),
        "failed": level.failed,
        "cut": level.cut,
        "seconds": round(t1 - t0, 2),
        "rows_per_s": round(len(latencies) / (t1 - t0), 3),
        "gen_tokens_per_s": round(tokens / (t1 - t0), 1),
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        **server_share(level),
        **gpu.window(t0, t1),
    }


def figures(level: Level, t0: float, t1: float, gpu: Gpu) -> dict[str, Any]:
    latencies = [end - start for start, end, *_ in level.done]
    tokens = [n for _, _, n, _ in level.done]
    if not latencies:
        return {"in_flight": level.in_flight, "finished": 0, "failed": level.failed}
    mean_latency = statistics.fmean(latencies)
    rows_per_s = level.in_flight / mean_latency  # Little's law on a full pool
    return {
        "in_flight": level.in_flight,
        "finished": len(latencies),
        "failed": level.failed,
        "cut": level.cut,
        "seconds": round(t1 - t0, 1),
        "rows_per_s": round(rows_per_s, 3),
        "gen_tokens_per_s": round(rows_per_s * statistics.fmean(tokens), 1),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "completion_tokens_mean": round(statistics.fmean(tokens), 1),
        **server_share(level),
        **gpu.window(t0, t1),
    }


async def sweep(args: argparse.Namespace) -> dict[str, Any]:
    # Every request is a record the server has not seen: a slot keeps its last prompt's KV, and a repeated
    # record skips its prompt (a sweep that cycled 512 records read 6.1 rows/s at 16 in flight where the job's
    # distinct rows ran at 4.6). A job's warm-up draws from the records after the job's own.
    prompts = iter(candidate_records(args.prompts, args.first_row + (args.rows or 0)))
    body: dict[str, Any] = {"model": args.model, "max_tokens": args.max_tokens, "temperature": 0.0, "seed": 7}
    if args.schema:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": SCHEMA}}
    if args.backend_sampling:
        body["backend_sampling"] = True
    gpu = Gpu()
    gpu.thread.start()
    levels = [int(n) for n in args.levels.split(",")]
    results = []
    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels) + 4)
    async with httpx.AsyncClient(base_url=args.url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        await run_level(client, body, prompts, Level(min(levels[0], 4)), 8.0)  # warm-up, not kept
        for n in levels:
            # Let the last level's cancelled requests leave the slots first: llama-server notices a closed
            # connection within a second (its HTTP polling interval), and until then they share the batch.
            await asyncio.sleep(2.0)
            level = Level(n)
            if args.rows:
                todo = candidate_records(args.rows, args.first_row)
                t0, t1 = await run_rows(client, body, todo, level, args.max_level_s)
                results.append(job_figures(level, t0, t1, gpu))
            else:
                t0, t1 = await run_level(client, body, prompts, level, args.max_level_s)
                results.append(figures(level, t0, t1, gpu))
            print(json.dumps(results[-1]), flush=True)
            if args.out:  # after every level: a call cut short keeps the levels measured
                args.out.write_text(json.dumps(summary(args, body, gpu, results), indent=1))
    gpu.stop.set()
    return summary(args, body, gpu, results)


def summary(args: argparse.Namespace, body: dict[str, Any], gpu: Gpu, results: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "what": f"bare httpx client, records {args.first_row}..{args.first_row + args.rows - 1} at each level, "
        "rows/s = rows / wall"
        if args.rows
        else "bare httpx client, closed loop at each in-flight level; rows/s = in_flight / mean latency",
        "card": gpu.name(),
        "request": {k: v for k, v in body.items() if k != "messages"},
        "levels": results,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--model", default="gemma3-12b-shape")
    parser.add_argument("--levels", default="1,2,4,8,16,32,64")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=8192, help="distinct candidate records a sweep draws from")
    parser.add_argument("--first-row", type=int, default=0, help="the first record (a job's, or a sweep's)")
    parser.add_argument("--schema", action="store_true", help="ask for a JSON-schema grammar (response_format)")
    parser.add_argument("--backend-sampling", action="store_true", help="llama.cpp: sample on the GPU")
    parser.add_argument("--max-level-s", type=float, default=60.0, help="a level's (or --rows job's) time at most")
    parser.add_argument("--rows", type=int, help="send exactly these rows at each level (a whole job)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(sweep(args))
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
