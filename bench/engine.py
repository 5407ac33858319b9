"""6. A real engine: the product against llama.cpp's llama-server (started here on the CPU, or one given).

One flow run at each fixed in_flight level and one at in_flight auto, JSON-schema answers unless told
otherwise. Baselines, same run: the best fixed level (`auto_over_best_fixed`) and in_flight 1
(`auto_over_in_flight_1`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from bench.common import Bench, log, r


@dataclass(frozen=True)
class Engine:
    """Where the engine section sends: a llama-server it starts (CPU), or one given (a GPU host)."""

    url: str | None = None  # OpenAI base URL of a running server; None starts llama-server here
    model: str = "gemma3-270m"
    levels: tuple[int, ...] = (1, 2, 4)  # fixed in_flight levels swept
    # Every run the same rows: a shorter run spends more of its time filling and draining, which would
    # favour whichever run had more rows (auto's includes its search).
    rows: int = 120
    copy_to: Path | None = None  # keep report.md, timeline.png and manifest.json of each run here
    schema: bool = True  # JSON-schema constrained answers (llama.cpp samples the grammar on the CPU)


ENGINE_SCORE_SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 10}, "reason": {"type": "string"}},
    "required": ["score", "reason"],
}


def seed_like_rows(path: Path, rows: int) -> Path:
    """Short candidate records like the users' nightly job; the answer is a small JSON object."""
    skills = ["Python", "Rust", "CUDA", "Kubernetes", "SQL", "Prefect", "PyTorch", "Go", "Terraform", "Spark"]
    roles = ["data engineer", "ML engineer", "platform engineer", "analyst"]
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(
        {
            "id": [f"c-{i:06d}" for i in range(rows)],
            "role": [roles[i % 4] for i in range(rows)],
            "text": [
                f"{2 + i % 15} years of {skills[i % 10]} and {skills[(i * 7 + 3) % 10]}; "
                f"led {i % 6} people; last role at company {i % 97}; based in city {i % 31}"
                for i in range(rows)
            ],
        }
    ).write_parquet(path)
    return path


def bench_engine(b: Bench, e: Engine) -> dict[str, Any]:
    """The product against a real llama.cpp server: in_flight 1, each fixed level, and auto, one run each."""
    from harness.llama_server import LlamaServer

    server = None
    if e.url is None:
        from tasks.inference.backends.llamacpp import default_model_path

        server = LlamaServer(
            default_model_path(), b.work / "logs" / "llama-server.log", parallel=max(e.levels), ctx_per_slot=1024
        )
    url = e.url or server.url  # type: ignore[union-attr]
    schema = b.work / "inputs" / "score.schema.json"
    schema.parent.mkdir(parents=True, exist_ok=True)
    schema.write_text(json.dumps(ENGINE_SCORE_SCHEMA))
    runs: list[dict[str, Any]] = []
    try:
        for label, rows, in_flight in [
            *((f"fixed-{n}", e.rows, n) for n in e.levels),
            ("auto", e.rows, "auto"),
        ]:
            data = seed_like_rows(b.work / "inputs" / f"seed-{rows}.parquet", rows)
            job = b.job_file(
                f"engine-{label}",
                input_path=str(data),
                prompt_template="Role: {role}\nCandidate: {text}\nRate the fit from 0 to 10 and give a one-sentence reason.",
                system_prompt="Answer only with JSON.",
                backend="openai",
                base_url=url,
                model=e.model,
                output_schema=str(schema) if e.schema else None,
                options={"num_ctx": 1024, "num_predict": 64, "temperature": 0.0, "seed": 0},
                in_flight=in_flight,
                max_in_flight=max(e.levels),
                chunk_size=min(rows, 1000),
                telemetry_interval_s=0.5,
            )
            log(f"6. engine: {label}, {rows} rows on {url}")
            run = b.run_flow(job)
            out = b.work / "out" / job.stem
            manifest = json.loads((out / "manifest.json").read_text())
            results = pl.read_parquet(out / "results.parquet").sort("finished_at")
            if sorted(results["id"].to_list()) != [f"c-{i:06d}" for i in range(rows)]:
                raise RuntimeError(f"engine {label}: rows missing or twice")
            ends = results["finished_at"].dt.epoch("us").cast(pl.Float64).to_list()
            # After auto's first search (the rows that came back before it settled), the rate it kept.
            searched = [(st.get("auto") or {}).get("search_rows") for st in manifest["chunk_stats"]]
            calibrated = next((n for n in searched if n), 0)
            steady = ends[calibrated:] if len(ends) - calibrated > 10 else ends
            runs.append(
                {
                    "run": label,
                    "rows": rows,
                    "in_flight": in_flight,
                    "ok": manifest["rows_ok"],
                    "errors": manifest["rows_error"],
                    "rows_per_s": manifest.get("requests_per_s"),
                    "gen_tokens_per_s": manifest.get("tokens_per_s"),
                    "rows_per_s_after_calibration": r((len(steady) - 1) / ((steady[-1] - steady[0]) / 1e6), 3),
                    "latency_p50_ms": r(float(results["latency_ms"].median() or 0), 1),
                    "verdict": manifest.get("verdict"),
                    "headline": manifest.get("headline"),
                    "wall_s": r(run.wall_s, 1),
                }
            )
            if e.copy_to is not None:
                dest = e.copy_to / label
                dest.mkdir(parents=True, exist_ok=True)
                for name in ("report.md", "timeline.png", "manifest.json"):
                    if (out / name).exists():
                        shutil.copy(out / name, dest / name)
    finally:
        if server is not None:
            server.stop()
    fixed = [x for x in runs if x["run"] != "auto"]
    best = max(fixed, key=lambda x: x["rows_per_s"] or 0)
    auto = runs[-1]
    one = next((x for x in fixed if x["in_flight"] == 1), None)
    return {
        "what": f"the flow (CLI) against llama-server at {url if e.url else 'localhost (CPU, started here)'}, model "
        f"{e.model}, JSON-schema answers (num_predict 64); fixed in_flight {list(e.levels)}, then in_flight "
        f"auto, {e.rows} rows each; rows/s and tokens/s over the sending time (manifest)",
        "server_parallel_slots": max(e.levels) if server else None,
        "runs": runs,
        "best_fixed": best["run"],
        "auto_over_best_fixed": r((auto["rows_per_s"] or 0) / (best["rows_per_s"] or 1), 3),
        "auto_after_calibration_over_best_fixed": r(
            auto["rows_per_s_after_calibration"] / (best["rows_per_s"] or 1), 3
        ),
        "auto_over_in_flight_1": r((auto["rows_per_s"] or 0) / (one["rows_per_s"] or 1), 3) if one else None,
        "target_auto_ge_0.95_best": (auto["rows_per_s"] or 0) >= 0.95 * (best["rows_per_s"] or 0),
    }
