"""docs/job-file.md is what `python -m tasks.settings.reference` writes from tasks/settings/model.py today."""

from __future__ import annotations

from pathlib import Path

from tasks.settings.model import Endpoint, GenerationOptions, Host, JobSettings, SqlInput, SqlSink
from tasks.settings.reference import COMMAND, TARGET, render


def test_the_committed_job_file_reference_is_current() -> None:
    assert Path(__file__).resolve().parents[1] / "docs" / "job-file.md" == TARGET  # the repository's docs/
    expected = render()
    current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
    assert current == expected, (
        f"docs/job-file.md is stale: tasks/settings/model.py changed since it was generated. Regenerate it with "
        f"`{COMMAND}` (or `make docs`) and commit the result."
    )


def test_the_reference_names_every_setting_with_its_description() -> None:
    text = render()
    for model in (JobSettings, SqlInput, SqlSink, Endpoint, GenerationOptions, Host):
        assert f"## {model.__name__}" in text
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"
            row = next((line for line in text.splitlines() if line.startswith(f"| `{name}` |")), None)
            assert row is not None, f"{model.__name__}.{name} is missing from the reference"
