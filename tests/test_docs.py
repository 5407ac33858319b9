"""The documents: docs/operations.md names what prefect.yaml deploys and what the bootstrap makes; the
README stays short and keeps its two set-up commands; every link between the documents resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from deployments.bootstrap import FLOW_NAMES, gpu_limits, load_prefect_yaml, work_queues

ROOT = Path(__file__).resolve().parents[1]


DOCUMENTS = ["README.md", "docs/how-it-works.md", "docs/operations.md", "docs/job-file.md", "bench/README.md"]


def _operate_section() -> str:
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    start = text.index("## Operate: Prefect server, worker, deployments")
    return text[start : text.index("\n## ", start + 1)]


def test_the_operate_section_names_every_deployment_queue_and_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # job files name their paths relative to the repository root
    config = load_prefect_yaml()
    operate = _operate_section()
    deployments = [f"`{FLOW_NAMES[d['entrypoint']]}/{d['name']}`" for d in config["deployments"]]
    missing = [d for d in deployments if d not in operate]
    assert not missing, f"docs/operations.md's Operate section lacks deployments {missing}"
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


def test_the_readme_is_short_and_keeps_its_two_set_up_commands() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250, "README.md grew past 250 lines: move the detail to docs/"
    setup = text[text.index("## Set up and run") : text.index("\n## ", text.index("## Set up and run") + 1)]
    commands = re.findall(r"^make (\w+)", setup, flags=re.M)
    assert commands == ["demo", "test"]
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert all(re.search(rf"^{c}:", makefile, flags=re.M) for c in commands)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_between_the_documents_resolves() -> None:
    broken = []
    for name in DOCUMENTS:
        path = ROOT / name
        text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if "://" in target:
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", linked.read_text(encoding="utf-8"), flags=re.M)
                if anchor not in {_anchor(h) for h in headings}:
                    broken.append(f"{name}: {target} (no such heading)")
    assert broken == []
