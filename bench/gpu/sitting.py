"""One workload of a GPU sitting, in steps that each fit one device call:

    python -m bench.gpu.sitting sweep short --tokens 16 --levels 1,2,4,8,16,32,64 --dir DIR
    python -m bench.gpu.sitting jobs short --tokens 16 --rows 200 --dir DIR
    python -m bench.gpu.sitting sampling short --tokens 16 --rows 200 --dir DIR
    python -m bench.gpu.sitting structured short --tokens 64 --rows 32 --dir DIR

`sweep`: the engine's curve with the bare client (bench.gpu.load) → DIR/sweep-short.json.
`jobs`: ROWS rows three ways, at the sweep's best level (calibrate.best_in_flight, the rule
`in_flight: auto` keeps and the report advises): the bare client (--rows), the product at that fixed
level, and the product with `in_flight: auto` → DIR/bare-short.json, DIR/flow-short.json, and each
flow run's report, chart and manifest under DIR/short/. The ratios (auto ÷ fixed, flow ÷ bare) are
then read from one sitting. `--extra-level N` adds a flow run at another fixed level; `--auto-runs 2` a
second `auto` run, which starts from the level the first kept, as a nightly job's second night does; `--set KEY=VALUE` is a
job setting for the flow runs (`--set chunk_size=ROWS`: one chunk, drained once as the bare client's job is).
`sampling`: ROWS rows with the bare client at the best level with llama.cpp's backend (GPU-side) sampling →
DIR/sampling-short.json, read against the jobs step's bare-short.json (the same work on other records; one
cohort of 16 was too little to tell a 20 % difference from noise).
`structured`: ROWS rows through the product at the best level with the bounded score/reason schema, once
as a grammar and once validated (`structured_output`) → DIR/structured-short-grammar.json and
DIR/structured-short-validate.json.
Every run stops at --max-s (a stalled engine costs that, not the device call), and its figures say so.
Every run sends records no other run of the sitting sent: a slot keeps its last prompt's KV, and a record
sent again skips its prompt (runs compared on different work).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# The first record of each kind of run; a sweep draws from record 0 on (bench.gpu.load --prompts).
FIRST_ROW = {"bare": 10_000, "flow": 20_000, "sampling": 60_000, "structured": 70_000}


def module(name: str, *args: str) -> None:
    subprocess.run([sys.executable, "-m", name, *args], check=True)


def best_level(sweep: Path) -> int:
    from tasks.inference.calibrate import best_in_flight  # pydantic: not needed by the sweep (httpx only)

    # A level cut at --max-level-s is left out: its quick first answers read fast.
    swept = json.loads(sweep.read_text())["levels"]
    curve = {lv["in_flight"]: lv["rows_per_s"] for lv in swept if lv.get("finished") and not lv.get("cut")}
    if not curve:
        sys.exit(f"{sweep}: no level's cohort came back whole; nothing to run at")
    best = best_in_flight(curve)
    print(json.dumps({"sweep": sweep.name, "curve": curve, "best": best}), flush=True)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["sweep", "jobs", "sampling", "structured"])
    parser.add_argument("workload", help="a name: short, long (the sweep of that name gives the best level)")
    parser.add_argument("--tokens", type=int, required=True, help="max_tokens / num_predict of every request")
    parser.add_argument("--levels", default="1,2,4,8,16,32,64")
    parser.add_argument("--max-level-s", default="60", help="sweep: a level's time at most")
    parser.add_argument(
        "--max-s",
        default="150",
        help="jobs, sampling, structured: each run's time at most (a bare one cut, a flow Ctrl-C'd)",
    )
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--extra-level", type=int, action="append", default=[])
    parser.add_argument(
        "--auto-runs", type=int, default=1, help="jobs: `auto` runs; the second on starts where the first settled"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="job setting for the flow runs")
    parser.add_argument("--model", default="gemma3-12b-shape")
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    sweep = args.dir / f"sweep-{args.workload}.json"
    common = ["--url", args.url, "--model", args.model, "--max-tokens", str(args.tokens)]
    if args.step == "sweep":
        module(
            "bench.gpu.load", *common, "--levels", args.levels, "--max-level-s", args.max_level_s, "--out", str(sweep)
        )
        return
    best = best_level(sweep)

    def bare_job(kind: str, *extra: str) -> None:
        """ROWS records of the kind's own through the bare client at the best level → DIR/KIND-WORKLOAD.json."""
        rows = ["--rows", str(args.rows), "--max-level-s", args.max_s, "--first-row", str(FIRST_ROW[kind])]
        out = args.dir / f"{kind}-{args.workload}.json"
        module("bench.gpu.load", *common, "--levels", str(best), *rows, *extra, "--out", str(out))

    if args.step == "sampling":
        bare_job("sampling", "--backend-sampling")
        return
    flow = ["--url", f"{args.url}/v1", "--model", args.model, "--max-s", args.max_s]
    flow += [arg for kv in args.set for arg in ("--set", kv)]
    workload = f"{args.workload}-{args.tokens}"
    if args.step == "structured":
        for i, mode in enumerate(["grammar", "validate"]):
            spec = f"{workload}:fixed-{best}:{args.rows}:{FIRST_ROW['structured'] + i * args.rows}"
            out = args.dir / f"structured-{args.workload}-{mode}.json"
            module(
                "bench.gpu.flow_runs", spec, *flow, "--schema", "--set", f"structured_output={mode}", "--out", str(out)
            )
        return
    bare_job("bare")
    levels = [f"fixed-{n}" for n in [best, *args.extra_level]] + ["auto"] * args.auto_runs
    specs = [f"{workload}:{level}:{args.rows}:{FIRST_ROW['flow'] + 10_000 * i}" for i, level in enumerate(levels)]
    module(
        "bench.gpu.flow_runs",
        *specs,
        *flow,
        "--keep",
        str(args.dir / args.workload),
        "--out",
        str(args.dir / f"flow-{args.workload}.json"),
    )


if __name__ == "__main__":
    main()
