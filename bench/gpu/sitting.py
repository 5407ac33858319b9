"""One workload of a GPU sitting, in two steps that each fit one device call:

    python -m bench.gpu.sitting sweep short --tokens 16 --levels 1,2,4,8,16,32,64 --dir DIR
    python -m bench.gpu.sitting jobs short --tokens 16 --rows 200 --dir DIR

`sweep`: the engine's curve with the bare client (bench.gpu.load) → DIR/sweep-short.json.
`jobs`: ROWS rows three ways, at the sweep's best level (calibrate.best_in_flight, the rule
`in_flight: auto` keeps and the report advises): the bare client (--rows), the product at that fixed
level, and the product with `in_flight: auto` → DIR/bare-short.json, DIR/flow-short.json, and each
flow run's report, chart and manifest under DIR/short/. The ratios (auto ÷ fixed, flow ÷ bare) are
then read from one sitting. `--extra-level N` adds a flow run at another fixed level; `--set KEY=VALUE` is a
job setting for the flow runs (`--set chunk_size=ROWS`: one chunk, drained once as the bare client's job is). Every run stops
at --max-s (a stalled engine costs that, not the device call), and its figures say so.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def module(name: str, *args: str) -> None:
    subprocess.run([sys.executable, "-m", name, *args], check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["sweep", "jobs"])
    parser.add_argument("workload", help="a name: short, long")
    parser.add_argument("--tokens", type=int, required=True, help="max_tokens / num_predict of every request")
    parser.add_argument("--levels", default="1,2,4,8,16,32,64")
    parser.add_argument("--max-level-s", default="60", help="sweep: a level's time at most")
    parser.add_argument(
        "--max-s", default="150", help="jobs: each run's time at most (the bare one cut, a flow Ctrl-C'd)"
    )
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--extra-level", type=int, action="append", default=[])
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
    from tasks.inference.calibrate import best_in_flight  # pydantic: not needed by the sweep (httpx only)

    # A level cut at --max-level-s is left out: its quick first answers read fast.
    swept = json.loads(sweep.read_text())["levels"]
    curve = {lv["in_flight"]: lv["rows_per_s"] for lv in swept if lv.get("finished") and not lv.get("cut")}
    if not curve:
        sys.exit(f"{sweep}: no level's cohort came back whole; nothing to run the jobs at")
    best = best_in_flight(curve)
    print(json.dumps({"workload": args.workload, "curve": curve, "best": best}), flush=True)
    bare = args.dir / f"bare-{args.workload}.json"
    rows = ["--rows", str(args.rows), "--max-level-s", args.max_s]
    # Each run its own records, none the sweep sent: a slot keeps its last prompt's KV, and a record sent
    # again skips its prompt (the runs would be compared on different work).
    module("bench.gpu.load", *common, "--levels", str(best), *rows, "--first-row", "10000", "--out", str(bare))
    workload = f"{args.workload}-{args.tokens}"
    levels = [f"fixed-{n}" for n in [best, *args.extra_level]] + ["auto"]
    specs = [f"{workload}:{level}:{args.rows}:{20000 + 10000 * i}" for i, level in enumerate(levels)]
    module(
        "bench.gpu.flow_runs",
        *specs,
        "--url",
        f"{args.url}/v1",
        "--model",
        args.model,
        "--keep",
        str(args.dir / args.workload),
        "--max-s",
        args.max_s,
        *(arg for kv in args.set for arg in ("--set", kv)),
        "--out",
        str(args.dir / f"flow-{args.workload}.json"),
    )


if __name__ == "__main__":
    main()
