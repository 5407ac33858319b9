"""The run's manifest (manifest.json): what it produced, counted on disk, with what, how long, and why it stopped.

One pydantic model, written in one place (`Manifest.write`). A rerun reads its predecessor's to carry
over the attempts, chunk figures and recoveries, so each report covers the whole job. The flows
return it as a plain dict (`model_dump(mode="json")`), the shape a Prefect result and a JSON file share.
"""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.plan.dataset import JobPlan
from tasks.settings.model import JobSettings
from tasks.storage.files import write_json_atomic
from tasks.storage.results import counts

VERSIONS_OF = ("prefect", "ollama", "openai", "polars", "pyarrow", "pydantic", "llama-cpp-python", "nvidia-ml-py")


def package_version(name: str) -> str | None:
    """The installed version of a distribution, None when it is not installed."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


class Attempt(BaseModel):
    """One run of the job (a rerun resumes where the last one stopped)."""

    started_at: float
    finished_at: float
    wall_s: float
    rows_sent: int
    complete: bool
    error: str | None
    energy_wh: float | None = None  # GPU energy over this attempt's samples (None: no power reading)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    complete: bool
    error: str | None = Field(description="`Type: message` of what stopped the run; null when it completed")
    fingerprint: str
    results: str | None = Field(description="results.parquet when complete; null for a shard or an unfinished run")
    input: str
    input_digest: str
    backend: str
    model: str
    rows_total: int
    # On disk, in finished chunks and in the parts and journals of the others: after a stop or a failure
    # mid-chunk, rows_pending is what the same command still sends.
    rows_ok: int
    rows_error: int
    rows_pending: int
    tokens_on_disk: int = 0  # generated tokens of the rows on disk, every attempt's
    chunks: int
    started_at: float
    finished_at: float
    wall_s: float
    settings: dict[str, Any]
    versions: dict[str, str | None]
    # This attempt's rows (on disk now and not at its start), tokens and the seconds while any chunk ran: a
    # scale-out parent's report adds them up per host. A parent's rows_sent is its shards' sum, its
    # sending_s stays 0 (hosts send side by side).
    rows_sent: int = 0
    tokens_sent: int = 0  # generated tokens of this attempt's rows (on disk now and not at its start)
    sending_s: float = 0.0
    attempts: list[Attempt] = Field(default_factory=list)
    recoveries: list[str] = Field(default_factory=list)
    servers: list[dict[str, Any]] = Field(default_factory=list)
    chunk_stats: list[dict[str, Any]] = Field(default_factory=list)
    interrupted: str | None = Field(default=None, description="the signal that stopped this attempt (SIGINT, SIGTERM)")
    sink: dict[str, Any] | None = None
    # A shard run of a scale-out job: the host it ran on and its chunks. A scale-out parent: its hosts.
    host: str | None = None
    shard_chunks: list[int] | None = None
    hosts: list[str] | None = None
    # The report's figures (tasks/analysis): a scale-out parent reads them per host.
    verdict: str | None = None
    headline: str | None = None
    requests_per_s: float | None = None
    tokens_per_s: float | None = None
    telemetry: dict[str, Any] = Field(default_factory=dict)
    energy_wh: float | None = None
    wh_per_1000_rows: float | None = None

    @classmethod
    def counted(
        cls, settings: JobSettings, plan: JobPlan, fingerprint: str, started: float, failure: BaseException | None
    ) -> Manifest:
        """What a run produced (counted on disk now), with what, how long it took, and why it stopped."""
        finished = time.time()
        row_counts = counts(settings.output_dir, plan.chunks)
        complete = failure is None
        return cls(
            complete=complete,
            error=None if failure is None else f"{type(failure).__name__}: {failure}",
            fingerprint=fingerprint,
            results=str(settings.output_dir / "results.parquet") if complete else None,
            input=settings.input_label,
            input_digest=plan.input_digest,
            backend=settings.backend,
            model=settings.model,
            rows_total=plan.total_rows,
            rows_ok=row_counts["ok"],
            rows_error=row_counts["error"],
            rows_pending=plan.total_rows - row_counts["ok"] - row_counts["error"],
            tokens_on_disk=row_counts["tokens"],
            chunks=len(plan.chunks),
            started_at=started,
            finished_at=finished,
            wall_s=round(finished - started, 3),
            settings=settings.model_dump(mode="json"),
            versions={name: package_version(name) for name in VERSIONS_OF},
        )

    @classmethod
    def previous(cls, report_dir: Path, fingerprint: str) -> Manifest | None:
        """The manifest an earlier attempt of this same job left in report_dir (None if none, or of
        another configuration): its attempts, chunk stats and recoveries carry over."""
        path = report_dir / "manifest.json"
        if not path.exists():
            return None
        try:
            found = cls.model_validate_json(path.read_text(encoding="utf-8"))
        except ValidationError:  # another version's manifest: the report then covers this attempt only
            return None
        return found if found.fingerprint == fingerprint else None

    def write(self, report_dir: Path) -> None:
        write_json_atomic(self.model_dump(mode="json"), report_dir / "manifest.json")


def read_shard_manifests(out: Path) -> list[Manifest]:
    """Manifests the shard runs of a scale-out job left in out/shards/, oldest first."""
    found = [
        Manifest.model_validate_json(p.read_text(encoding="utf-8")) for p in (out / "shards").glob("*/manifest.json")
    ]
    return sorted(found, key=lambda m: m.started_at)
