"""Write a small synthetic candidates file for the demo job (deterministic, no downloads).

python -m jobs.make_demo_data data/demo-candidates.csv --rows 24
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import polars as pl

ROLES = ["data engineer", "GPU platform engineer", "ML researcher", "site reliability engineer"]
SKILLS = ["Python", "Rust", "CUDA", "Kubernetes", "SQL", "Prefect", "PyTorch", "Go", "Terraform", "Spark"]


def make_candidates(rows: int, seed: int = 170) -> pl.DataFrame:
    rng = random.Random(seed)
    records = []
    for i in range(rows):
        skills = ", ".join(rng.sample(SKILLS, 3))
        years = rng.randint(0, 15)
        summary = f"{years} years of experience; strongest in {skills}."
        if i == 5:
            summary = ""  # shows how a row with an empty field becomes an error row
        records.append({"candidate_id": f"c{i:06d}", "role": rng.choice(ROLES), "summary": summary})
    return pl.DataFrame(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", type=Path)
    parser.add_argument("--rows", type=int, default=24)
    args = parser.parse_args()
    args.path.parent.mkdir(parents=True, exist_ok=True)
    frame = make_candidates(args.rows)
    if args.path.suffix == ".parquet":
        frame.write_parquet(args.path)
    else:
        frame.write_csv(args.path)
    print(f"wrote {frame.height} rows to {args.path}")


if __name__ == "__main__":
    main()
