"""Throughput benchmark: orchestration capacity, slot saturation, the 170K-row job, embedded model, resume, telemetry.

    python -m bench.benchmark            # full (~14 min on 2 cores), or: make bench
    python -m bench.benchmark --quick    # fewer rows (~3 min)
    PREFECT_SERVER_DATABASE_CONNECTION_URL=postgresql+asyncpg://... python -m bench.benchmark   # Postgres server
    python -m bench.benchmark --compare bench/results/A.json bench/results/B.json

Not part of the test suite. Every flow runs as the real CLI (`python -m flows.batch_inference
--config job.yaml`) in its own process, against one `prefect server start` for the whole benchmark
and the Ollama emulator (harness/ollama_emulator.py) in this process, so the client and the "server"
do not share an interpreter. Prints one JSON document and writes it to bench/results/<UTC>.json.
Every ratio is taken against a baseline measured in the same run (an ideal the emulator defines, or
another client on the same emulator): ratios survive a noisy machine, absolute seconds do not.
Each section is the module of bench/ named after it (bench/orchestration.py, ...); what they share is
in bench/common.py, the bare clients they compare against in bench/clients.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # also runnable as `python bench/benchmark.py`
    sys.path.insert(0, _ROOT)

from bench.clients import run_client  # noqa: E402
from bench.common import (  # noqa: E402
    FULL,
    QUICK,
    ROOT,
    Bench,
    MachineLoad,
    Profile,
    log,
    meta,
    prefect_server,
    r,
    snapshot_code,
    strip_private,
)
from bench.compare import compare  # noqa: E402
from bench.embedded import bench_embedded  # noqa: E402
from bench.engine import Engine, bench_engine  # noqa: E402
from bench.job import bench_job  # noqa: E402
from bench.orchestration import bench_orchestration  # noqa: E402
from bench.resume import bench_resume  # noqa: E402
from bench.saturation import bench_saturation  # noqa: E402
from bench.telemetry import bench_telemetry  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
SECTIONS = ("orchestration", "saturation", "job", "embedded", "resume", "engine", "telemetry")


def run_benchmark(profile: Profile, only: set[str], keep: bool, engine: Engine | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {"meta": meta(profile)}
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="gpu-batch-bench-"))
    (work / "prefect-home").mkdir()
    src, result["meta"]["code_digest_flows_tasks"] = snapshot_code(work)
    try:
        with prefect_server(work / "prefect-home") as (api_url, server_pid):
            b = Bench(profile, work, api_url, server_pid, src)
            steps = [
                ("orchestration", lambda: bench_orchestration(b)),
                ("saturation", lambda: bench_saturation(b)),
                ("embedded", lambda: bench_embedded(b)),  # CPU-bound: before the big job's aftermath
                ("job", lambda: bench_job(b)),
                ("resume", lambda: bench_resume(b, result["job"])),
                ("engine", lambda: bench_engine(b, engine or Engine())),
                ("telemetry", lambda: bench_telemetry()),
            ]
            for name, step in steps:
                if name not in only or (name == "resume" and "runs" not in result.get("job", {})):
                    continue
                settled = b.settle()
                t0, server_cpu, load = time.monotonic(), b.server_cpu_s(), MachineLoad(b)
                try:
                    result[name] = step()
                except Exception as exc:  # one broken section must not hide the others' figures
                    log(f"{name} failed: {exc}")
                    result[name] = {"error": f"{type(exc).__name__}: {exc}"}
                result[name]["section_s"] = r(time.monotonic() - t0, 1)
                result[name]["waited_for_idle_machine_s"] = r(settled, 1)
                result[name]["prefect_server_cpu_s"] = r(b.server_cpu_s() - server_cpu, 1)
                result[name]["other_processes_cpu_pct_of_machine"] = load.others_pct()
    finally:
        if keep:
            log(f"scratch directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["meta"]["benchmark_wall_s"] = r(time.monotonic() - started, 1)
    result["targets"] = {
        "orchestration_share_lt_1pct_at_3.5_rps": result.get("orchestration", {}).get(
            "target_share_lt_1pct_at_users_baseline"
        ),
        "saturation_efficiency_ge_0.97": result.get("saturation", {}).get("target_efficiency_ge_0.97"),
        "memory_flat_17k_vs_170k": result.get("job", {}).get("target_memory_flat"),
        "embedded_ratio_ge_0.95": result.get("embedded", {}).get("target_ratio_ge_0.95"),
        "engine_auto_ge_0.95_best_fixed": result.get("engine", {}).get("target_auto_ge_0.95_best"),
        "telemetry_lt_1pct_of_a_core": result.get("telemetry", {}).get("target_lt_1pct_of_a_core_at_1s"),
        # Other tenants' CPU > 10 % of the machine during a section: its absolute figures are suspect.
        "noisy_sections": [
            name for name in SECTIONS if (result.get(name, {}).get("other_processes_cpu_pct_of_machine") or 0.0) > 10.0
        ],
    }
    return strip_private(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rows (~3 min instead of ~12)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (inputs, outputs, logs)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"), help="compare two result files")
    parser.add_argument(
        "--engine-url", help="engine section: a running OpenAI-compatible server (else llama-server here)"
    )
    parser.add_argument("--engine-model", default="gemma3-270m", help="engine section: the model id it serves")
    parser.add_argument("--engine-levels", default="1,2,4", help="engine section: fixed in_flight levels to sweep")
    parser.add_argument(
        "--engine-rows", type=int, metavar="ROWS", help="rows of every engine run (each fixed level, and auto)"
    )
    parser.add_argument(
        "--engine-copy", type=Path, help="engine section: keep each run's report, chart and manifest here"
    )
    parser.add_argument("--engine-no-schema", action="store_true", help="engine section: free-text JSON answers")
    parser.add_argument("--naive", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--bare-llama", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--bare-client", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for mode, paths in (("naive", args.naive), ("bare-llama", args.bare_llama), ("bare-client", args.bare_client)):
        if paths:  # a bare client's own process, started by Bench.run_helper
            run_client(mode, *paths)
            return 0
    if args.compare:
        compare(*args.compare)
        return 0
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    rows = args.engine_rows or (48 if args.quick else 120)
    levels = tuple(int(n) for n in args.engine_levels.split(","))
    engine = Engine(args.engine_url, args.engine_model, levels, rows, args.engine_copy, not args.engine_no_schema)
    result = run_benchmark(QUICK if args.quick else FULL, only, args.keep, engine)
    text = json.dumps(result, indent=2)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    target = RESULTS_DIR / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    target.write_text(text + "\n")
    print(text)
    log(f"wrote {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
