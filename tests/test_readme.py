"""The README's Operate section names what prefect.yaml deploys and what the bootstrap makes."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments.bootstrap import FLOW_NAMES, gpu_limits, load_prefect_yaml, work_queues

ROOT = Path(__file__).resolve().parents[1]


def _operate_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## Operate: Prefect server, worker, deployments")
    return text[start : text.index("\n## ", start + 1)]


def test_the_operate_section_names_every_deployment_queue_and_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # job files name their paths relative to the repository root
    config = load_prefect_yaml()
    operate = _operate_section()
    deployments = [f"`{FLOW_NAMES[d['entrypoint']]}/{d['name']}`" for d in config["deployments"]]
    missing = [d for d in deployments if d not in operate]
    assert not missing, f"README's Operate section lacks deployments {missing}"
    queues = {queue for _, queue in work_queues(config)}
    assert "default" in queues and len(queues) > 1  # the hosts' queues of the scale-out deployment too
    assert [q for q in queues if f"`gpu/{q}`" not in operate] == []
    limits = gpu_limits(config)
    assert "gpu" in limits and len(limits) > 1
    assert [name for name in limits if f"`{name}`" not in operate] == []
    # The deployments with a deployment concurrency limit are named in its row.
    limited = [d["name"] for d in config["deployments"] if d.get("concurrency_limit")]
    row = next(line for line in operate.splitlines() if line.startswith("| deployment concurrency limit"))
    assert all(name in row for name in limited) and "not shard" in row
