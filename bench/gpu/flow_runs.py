"""The product itself against a running engine: one CLI run per spec, figures read from its manifest.

    python -m bench.gpu.flow_runs --url http://127.0.0.1:8080/v1 --keep DIR \
        short-16:fixed-64:600 short-16:auto:600 long-128:fixed-32:300 long-128:auto:300

A spec is WORKLOAD:LEVEL:ROWS[:FIRST]: WORKLOAD is a name and num_predict (`short-16`), LEVEL `fixed-N` or
`auto`; the run gets ROWS candidate records from record FIRST (0) on (bench.gpu.rows), greedy, free-text
answers, two chunks. Runs compared on one server get different records: a slot keeps its last prompt's KV,
and a record sent again skips its prompt. Each run writes to its own output directory under the work
folder (so no run resumes another); `auto` runs of one workload share a job name, so the second finds the
level the first settled on. rows/s is the manifest's rows_sent / sending_s (the chunks' sending time);
rows_per_s_span counts the hand-overs between chunks too (first chunk's start to last chunk's end).
Runs use the Prefect server at PREFECT_API_URL when set, else a temporary one each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from bench.gpu.rows import SYSTEM_PROMPT, TEMPLATE, candidate_record


def write_input(path: Path, rows: int, first: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame([candidate_record(i) for i in range(first, first + rows)]).write_parquet(path)
    return path


def job_file(work: Path, name: str, spec: dict[str, Any], url: str, model: str) -> Path:
    level = spec["level"]
    settings = {
        "name": name,
        "input_path": str(write_input(work / f"input-{spec['label']}.parquet", spec["rows"], spec["first"])),
        "id_column": "id",
        "prompt_template": TEMPLATE,
        "system_prompt": SYSTEM_PROMPT,
        "backend": "openai",
        "base_url": url,
        "model": model,
        "output_dir": str(work / "out" / spec["label"]),
        "chunk_size": max(1, spec["rows"] // 2),
        "in_flight": "auto" if level == "auto" else int(level.removeprefix("fixed-")),
        "options": {"num_ctx": 1024, "num_predict": spec["num_predict"], "temperature": 0.0, "seed": 7},
        "telemetry_interval_s": 0.5,
        **spec.get("extra", {}),
    }
    path = work / f"{spec['label']}.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def parse(text: str) -> dict[str, Any]:
    workload, level, rows, *first = text.split(":")
    name, predict = workload.rsplit("-", 1)
    return {
        "workload": workload,
        "name": name,
        "num_predict": int(predict),
        "level": level,
        "rows": int(rows),
        "first": int(first[0]) if first else 0,
    }


def figures(manifest: dict[str, Any]) -> dict[str, Any]:
    stats = manifest.get("chunk_stats", [])
    sent = manifest.get("rows_sent") or 0
    sending = manifest.get("sending_s") or 0.0
    tokens = manifest.get("tokens_sent") or 0  # counted on disk, as rows_sent is
    p50 = [s["latency_p50_ms"] for s in stats if s.get("latency_p50_ms") is not None]
    tel = manifest.get("telemetry") or {}
    # First chunk's start to last chunk's end: the sending windows and the hand-overs between chunks,
    # what a bare client's rows / (first send .. last answer) is compared with.
    timed = sorted((s["started_at"], s["finished_at"]) for s in stats if s.get("started_at") and s.get("finished_at"))
    span = timed[-1][1] - timed[0][0] if timed else 0.0
    return {
        "rows_ok": manifest.get("rows_ok"),
        "rows_error": manifest.get("rows_error"),
        "requests": sum(s.get("requests", 0) for s in stats),  # above rows_sent: retries and resamples
        "rows_per_s": round(sent / sending, 3) if sending else None,
        "rows_per_s_span": round(sent / span, 3) if span else None,
        "handover_s": [round(b[0] - a[1], 3) for a, b in zip(timed, timed[1:], strict=False)],
        "gen_tokens_per_s": round(tokens / sending, 1) if sending else None,
        "latency_p50_s": round(sorted(p50)[len(p50) // 2] / 1000, 3) if p50 else None,
        "in_flight_by_chunk": [s.get("in_flight") for s in stats],
        "structured_output": [s.get("structured_output") for s in stats],
        "calibration": [s.get("calibration") for s in stats],
        "gpu_util_pct": tel.get("gpu_util_mean"),
        "power_w": tel.get("power_mean_w"),
        "vram_peak_mib": tel.get("vram_peak_mib"),
        "energy": {k: manifest.get(k) for k in ("energy_wh", "wh_per_1000_rows") if k in manifest},
        "verdict": manifest.get("verdict"),
        "headline": manifest.get("headline"),
        "wall_s": manifest.get("wall_s"),
        "interrupted": manifest.get("interrupted"),
        "sending_s": sending,
    }


def run(work: Path, spec: dict[str, Any], url: str, model: str, keep: Path | None, max_s: float) -> dict[str, Any]:
    name = f"gpu-{spec['workload']}" + ("-auto" if spec["level"] == "auto" else "")
    job = job_file(work, name, spec, url, model)
    started = time.monotonic()
    log = work / f"{spec['label']}.log"
    stopped = False
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.batch_inference", "--config", str(job)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        try:
            proc.wait(timeout=max_s)
        except (subprocess.TimeoutExpired, KeyboardInterrupt) as exc:
            # Ctrl-C, as an operator would: the run stops within seconds and its manifest counts what
            # finished, so a stalled engine costs max_s, not the whole device call.
            stopped = isinstance(exc, KeyboardInterrupt)
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):  # a second signal: no more waiting
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    out = work / "out" / spec["label"]
    manifest_path = out / "manifest.json"
    result: dict[str, Any] = {
        "run": spec["label"],
        "exit": proc.returncode,
        "cli_s": round(time.monotonic() - started, 1),
        "stopped": stopped,  # by us being stopped (SIGTERM, Ctrl-C): no further runs
    }
    if manifest_path.exists():
        result |= figures(json.loads(manifest_path.read_text()))
    if (out / "results.parquet").exists():
        errors = pl.read_parquet(out / "results.parquet").filter(pl.col("status") == "error")
        result["error_kinds"] = dict(errors.group_by("error_kind").len().iter_rows())
    if proc.returncode != 0:
        result["log_tail"] = log.read_text(errors="replace")[-1500:]
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        for src, dst in (
            ("report.md", "report.md"),
            ("timeline.png", "timeline.png"),
            ("manifest.json", "manifest.json"),
        ):
            if (out / src).exists():
                shutil.copy(out / src, keep / f"{spec['label']}-{dst}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="+", help="WORKLOAD:LEVEL:ROWS[:FIRST], e.g. short-16:fixed-64:600:20000")
    parser.add_argument("--url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--model", default="gemma3-12b-shape")
    parser.add_argument("--work", type=Path, default=Path("/tmp/flow-runs"))
    parser.add_argument("--keep", type=Path, help="copy each run's report, chart and manifest here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="job setting for every run")
    parser.add_argument(
        "--schema", action="store_true", help="every run asks for bench.gpu.load.SCHEMA (output_schema; see --set)"
    )
    parser.add_argument("--max-s", type=float, default=240.0, help="a run's time at most, then Ctrl-C (SIGINT)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    extra = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}
    # A `timeout` around this (SIGTERM) Ctrl-C's the flow under way, as its own time limit does: the
    # flow runs in a session of its own, so it would otherwise go on loading the server after we left.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # Each call in a folder of its own: a rerun on the same machine must not resume an earlier call's runs.
    work = args.work / time.strftime("%H%M%S")
    if args.schema:  # structured_output (grammar, validate, auto) comes with --set
        from bench.gpu.load import SCHEMA

        work.mkdir(parents=True)
        (work / "schema.json").write_text(json.dumps(SCHEMA))
        extra["output_schema"] = str(work / "schema.json")
    results = []
    for i, text in enumerate(args.specs):
        spec = parse(text) | {"extra": extra}
        spec["label"] = f"{i:02d}-{spec['workload']}-{spec['level']}"
        results.append(run(work, spec, args.url, args.model, args.keep, args.max_s))
        print(json.dumps(results[-1]), flush=True)
        if args.out:  # after every run: a call cut short keeps what finished
            args.out.write_text(json.dumps(results, indent=1))
        if results[-1]["stopped"]:
            sys.exit(130)


if __name__ == "__main__":
    main()
