"""The rows every GPU run sends: a shared system prompt and distinct candidate records of ~220 tokens."""

from __future__ import annotations

import random

SYSTEM_PROMPT = (
    "You score job candidates for a data engineering role. Read the candidate record and answer with one "
    'JSON object: {"score": <integer 0-10>, "reason": "<one sentence>"}.'
)

_SKILLS = [
    "Python", "SQL", "Spark", "Kafka", "Airflow", "Prefect", "dbt", "Kubernetes", "Terraform", "Go",
    "Rust", "Scala", "PostgreSQL", "Snowflake", "BigQuery", "Flink", "Polars", "pandas", "Arrow", "Docker",
]  # fmt: skip
_ROLES = ["data engineer", "ML engineer", "platform engineer", "analytics engineer", "backend developer"]
_CITIES = ["Berlin", "Lisbon", "Warsaw", "Austin", "Toronto", "Nairobi", "Pune", "Osaka", "Lyon", "Leeds"]


def candidate_record(i: int) -> dict[str, str]:
    """Row i's fields, the same on every machine (seeded by i)."""
    rng = random.Random(i)
    skills = ", ".join(rng.sample(_SKILLS, 8))
    years = rng.randint(1, 20)
    history = " ".join(
        f"From {2004 + j * 3} to {2007 + j * 3} worked as {rng.choice(_ROLES)} in {rng.choice(_CITIES)}, "
        f"leading {rng.randint(2, 12)} people on pipelines moving {rng.randint(1, 900)} GB a day "
        f"with {rng.choice(_SKILLS)} and {rng.choice(_SKILLS)}."
        for j in range(5)
    )
    return {
        "id": f"cand-{i:06d}",
        "role": rng.choice(_ROLES),
        "text": f"Candidate {i}, {years} years of experience, based in {rng.choice(_CITIES)}. Skills: {skills}. "
        f"{history} Notes: reference number {rng.randint(10**6, 10**7)}.",
    }


def candidate_records(n: int, first: int = 0) -> list[str]:
    """Rows first..first+n-1 as user messages, as the product's template renders them (see flow_runs.TEMPLATE)."""
    return [TEMPLATE.format(**candidate_record(i)) for i in range(first, first + n)]


TEMPLATE = "Role: {role}\nCandidate: {text}"
