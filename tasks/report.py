"""Prefect artifacts and the terminal line: live progress, per-chunk table, run report with a verdict.

The only module that creates Prefect artifacts. Keys derive from the job name, so each job
(and each deployment running it nightly) keeps a version history on the Artifacts page.
"""

from __future__ import annotations

import base64
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any, cast
from uuid import UUID

import polars as pl
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from tasks.bottleneck import RunEvidence, TelemetrySummary, Verdict, eta_hours, judge, render_markdown
from tasks.charts import sparkline, timeline_png
from tasks.config import JobSettings
from tasks.dataset import ChunkSpec, JobPlan
from tasks.schema import ChunkStats
from tasks.store import error_kinds, write_atomic, write_parquet_atomic
from tasks.telemetry import Sampler, summarize

log = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # NaN or inf
        return "n/a"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _fmt(value: float | None, spec: str = ".0f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def chunk_row(stats: ChunkStats, telemetry: dict[str, Any]) -> dict[str, Any]:
    """One line of the per-chunk table: what the chunk did and what the GPU did meanwhile."""
    secs = stats.seconds if stats.sent_rows else None
    return {
        "chunk": stats.index,
        "endpoint": stats.endpoint,
        "rows": stats.rows,
        "resumed": stats.resumed_rows,
        "ok": stats.ok,
        "errors": stats.errors,
        "req_per_s": round(stats.sent_rows / secs, 2) if secs else None,
        "prompt_tok_per_s": round(stats.prompt_tokens / secs, 1) if secs else None,
        "gen_tok_per_s": round(stats.completion_tokens / secs, 1) if secs else None,
        "latency_p50_ms": None if stats.latency_p50_ms is None else round(stats.latency_p50_ms),
        "latency_p95_ms": None if stats.latency_p95_ms is None else round(stats.latency_p95_ms),
        "in_flight": stats.in_flight,
        "num_ctx": stats.num_ctx,
        "vram_peak_mib": telemetry.get("vram_peak_mib"),
        "vram_mean_mib": None if telemetry.get("vram_mean_mib") is None else round(telemetry["vram_mean_mib"]),
        "vram_headroom_mib": telemetry.get("vram_headroom_mib"),
        "gpu_util_mean": None if telemetry.get("gpu_util_mean") is None else round(telemetry["gpu_util_mean"], 1),
        "power_mean_w": None if telemetry.get("power_mean_w") is None else round(telemetry["power_mean_w"]),
        "cpu_mean_pct": None if telemetry.get("cpu_mean_pct") is None else round(telemetry["cpu_mean_pct"], 1),
        "seconds": round(stats.seconds, 1) if stats.sent_rows else 0.0,
    }


class RunReporter:
    """Owns one run's artifacts and terminal progress line; fed by the flow and the chunk tasks."""

    def __init__(
        self,
        settings: JobSettings,
        plan: JobPlan,
        done_before: int,
        sampler: Sampler,
        *,
        key: str | None = None,
        report_dir: Path | None = None,
    ) -> None:
        self.settings = settings
        self.key = key or settings.name  # artifact key prefix: the job, or the job on one host
        self.report_dir = report_dir or settings.output_dir
        self.plan = plan
        self.sampler = sampler
        self.done_before = done_before
        self.done_in_finished_chunks = 0  # rows finished by this run in chunks that have ended
        self.errors = 0
        self.started = time.time()
        self.rows: list[dict[str, Any]] = []
        self.stats: list[ChunkStats] = []
        self.notes: list[str] = []  # chunks moved between endpoints, for the recoveries section
        self._live: dict[int, tuple[int, int]] = {}  # chunk -> (rows, errors) finished so far, while running
        self._lock = threading.Lock()
        self._last_update = 0.0
        self._tty = sys.stderr.isatty()
        # Prefect's sync_compatible functions are typed as "value or coroutine"; called from sync code
        # they return the value.
        self.progress_id: UUID = create_progress_artifact(  # type: ignore[assignment]
            progress=self._pct(done_before), key=f"{self.key}-progress", description=self._line(0, 0)
        )

    def _pct(self, done: int) -> float:
        return round(100.0 * done / self.plan.total_rows, 2)

    def _line(self, sent: int, errors: int) -> str:
        done = self.done_before + sent
        elapsed = time.time() - self.started
        rate = sent / elapsed if elapsed > 0 and sent else 0.0
        eta = (self.plan.total_rows - done) / rate if rate else float("nan")
        return (
            f"[{self.key}] {done:,}/{self.plan.total_rows:,} rows ({self._pct(done):.1f}%) · "
            f"{rate:.2f} rows/s · ETA {_duration(eta)} · {errors} errors"
        )

    def chunk_started(self, chunk: ChunkSpec) -> None:
        self.sampler.mark(f"{chunk.name} start")

    def progress(self, chunk: int, done_in_chunk: int, errors_in_chunk: int, force: bool = False) -> None:
        """Called after each checkpoint: update the artifact and the terminal line, at most once a second."""
        with self._lock:
            if done_in_chunk or errors_in_chunk:
                self._live[chunk] = (done_in_chunk, errors_in_chunk)
            now = time.monotonic()
            # A terminal redraws one line each second; logs and the UI get a line every 10 s.
            if not force and now - self._last_update < (1.0 if self._tty else 10.0):
                return
            self._last_update = now
            sent = self.done_in_finished_chunks + sum(done for done, _ in self._live.values())
            errors = self.errors + sum(errs for _, errs in self._live.values())
            line = self._line(sent, errors)
            try:
                update_progress_artifact(self.progress_id, self._pct(self.done_before + sent), description=line)
            except Exception:  # a UI hiccup must never stop the job
                log.warning("could not update the progress artifact", exc_info=True)
            print(f"\r{line}   " if self._tty else line, end="" if self._tty else "\n", file=sys.stderr, flush=True)

    def chunk_done(self, stats: ChunkStats) -> None:
        self.sampler.mark(f"chunk-{stats.index:05d} end")
        self.stats.append(stats)
        self.rows.append(chunk_row(stats, summarize(self.sampler.frame(), stats.started_at, stats.finished_at)))
        with self._lock:
            self._live.pop(stats.index, None)
            self.done_in_finished_chunks += stats.sent_rows
            self.errors += stats.errors
        # A chunk an earlier run finished sends no artifact update of its own: skipping many stays fast.
        self.progress(stats.index, 0, 0, force=bool(stats.sent_rows))

    def evidence(self) -> tuple[RunEvidence, dict[str, Any]]:
        """The run's figures for the verdict: rates over the time chunks were actually sending."""
        # Endpoints work side by side: their rates add up (each over its own sending time).
        per_endpoint = self._per_endpoint().values()
        requests_per_s = sum(e["rows"] / e["seconds"] for e in per_endpoint)
        tokens_per_s = sum(e["tokens"] / e["seconds"] for e in per_endpoint)
        sent = sum(s.sent_rows for s in self.stats)
        samples = self.sampler.frame()
        telemetry = summarize(samples, self.started, time.time()) if samples.height else {}
        kinds = error_kinds(self.settings.output_dir, self.plan.chunks)
        evidence = RunEvidence(
            backend=self.settings.backend,
            in_flight=self.stats[-1].in_flight if self.stats else self.settings.workers,
            calibration=next((s.calibration for s in self.stats if s.calibration), None),
            num_ctx=self.settings.options.num_ctx,
            requests_per_s=requests_per_s,
            tokens_per_s=tokens_per_s,
            chunk_tokens_per_s=[s.completion_tokens / s.seconds for s in self.stats if s.sent_rows],
            rows_total=self.plan.total_rows,
            rows_done=self.done_before + sent,
            telemetry=TelemetrySummary(**telemetry) if telemetry else None,
            errors=kinds,
        )
        return evidence, telemetry

    def markdown(
        self,
        manifest: dict[str, Any],
        verdict: Verdict,
        evidence: RunEvidence,
        telemetry: dict[str, Any],
        image: str | None,
    ) -> str:
        s = self.settings
        rate = evidence.requests_per_s
        eta = eta_hours(s.production_rows, rate) if rate else float("inf")
        status = "complete" if manifest["complete"] else f"**incomplete** ({manifest['error']})"
        events = [*self.notes, *(e for st in self.stats for e in st.events)]
        samples = self.sampler.frame()
        gpu = samples.filter(pl.col("vram_used_mib").is_not_null()).sort("t")
        lines = [
            f"# Run report: {s.name}",
            "",
            f"Status: {status}. {manifest['rows_ok']:,} ok and {manifest['rows_error']:,} error rows of "
            f"{manifest['rows_total']:,} ({len(self.plan.chunks)} chunks of {s.chunk_size:,}), "
            f"backend `{s.backend}`, model `{s.model}`, {evidence.in_flight} request(s) in flight"
            f"{' (chosen by auto)' if s.in_flight == 'auto' else ''}, wall {_duration(manifest['wall_s'])}.",
            "",
            "| throughput (while sending) | value |",
            "|---|---|",
            f"| requests/s | {rate:.2f} |",
            f"| generated tokens/s | {evidence.tokens_per_s:.1f} |",
            f"| **ETA for the {s.production_rows:,}-row production job** | **{eta:.1f} h** at this rate |",
            f"| VRAM peak / total | {_fmt(telemetry.get('vram_peak_mib'))} / {_fmt(telemetry.get('vram_total_mib'))} MiB "
            f"(headroom {_fmt(telemetry.get('vram_headroom_mib'))} MiB) |",
            f"| GPU util mean (a kernel ran) | {_fmt(telemetry.get('gpu_util_mean'), '.0f', ' %')} |",
            f"| memory-bandwidth util mean | {_fmt(telemetry.get('mem_util_mean'), '.0f', ' %')} |",
            f"| power mean / max | {_fmt(telemetry.get('power_mean_w'))} / {_fmt(telemetry.get('power_max_w'))} W |",
            f"| host CPU mean | {_fmt(telemetry.get('cpu_mean_pct'), '.0f', ' %')} |",
            f"| peak RSS of the job | {_fmt(telemetry.get('rss_peak_mib'))} MiB |",
            "",
            *self._endpoints_table(),
            *render_markdown(verdict),
            *(
                [
                    "### In-flight calibration (auto)",
                    "",
                    "| in flight | throughput |",
                    "|---|---|",
                    *(f"| {n} | {v:.1f} |" for n, v in evidence.calibration.items()),
                    "",
                ]
                if evidence.calibration
                else []
            ),
            "### Errors by kind",
            "",
            ", ".join(f"`{k}`: {v}" for k, v in sorted(evidence.errors.items())) or "none",
            "",
        ]
        if events:
            lines += ["### Recoveries and back-offs", "", *(f"- {e}" for e in events[:50]), ""]
        lines += ["### Timeline", ""]
        if gpu.height:
            lines += [
                f"VRAM  `{sparkline(gpu['vram_used_mib'].to_list(), top=cast(float, gpu['vram_total_mib'].max()))}`",
                f"util  `{sparkline(gpu['gpu_util_pct'].fill_null(0).to_list(), top=100)}`",
                f"power `{sparkline(gpu['power_w'].fill_null(0).to_list())}`",
            ]
        elif samples.height:
            lines.append(f"CPU `{sparkline(samples['cpu_pct'].fill_null(0).to_list(), top=100)}` (no GPU data)")
        if image:
            lines += ["", f"![timeline]({image})"]
        lines += [
            "",
            f"Files: `{s.output_dir}/results.parquet`, `chunks/`; `{self.report_dir}/manifest.json`, "
            "`telemetry/samples.parquet`, `report.md`, `timeline.png`.",
        ]
        return "\n".join(lines) + "\n"

    def _per_endpoint(self) -> dict[str, dict[str, float]]:
        """Chunks, rows sent, sending seconds and generated tokens of this run, per endpoint."""
        per: dict[str, dict[str, float]] = {}
        for st in self.stats:
            if st.sent_rows:
                e = per.setdefault(st.endpoint or "?", {"chunks": 0, "rows": 0, "seconds": 0.0, "tokens": 0})
                e["chunks"] += 1
                e["rows"] += st.sent_rows
                e["seconds"] += st.seconds
                e["tokens"] += st.completion_tokens
        return per

    def _endpoints_table(self) -> list[str]:
        """Per endpoint, when chunks ran on more than one."""
        per = self._per_endpoint()
        if len(per) < 2:
            return []
        return [
            "| endpoint | chunks | rows sent | requests/s | generated tokens/s |",
            "|---|---|---|---|---|",
            *(
                f"| {name} | {e['chunks']:.0f} | {e['rows']:,.0f} | {e['rows'] / e['seconds']:.2f} | "
                f"{e['tokens'] / e['seconds']:.1f} |"
                for name, e in sorted(per.items())
            ),
            "",
        ]

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Write telemetry, chart and report files, then the table and report artifacts.

        Returns the run's figures for the manifest: a scale-out parent reads them per host.
        """
        out = self.report_dir
        samples = self.sampler.frame()
        write_parquet_atomic(samples, out / "telemetry" / "samples.parquet")
        chart = timeline_png(samples, self.sampler.marks())
        if chart:
            write_atomic(out / "timeline.png", lambda tmp: tmp.write_bytes(chart))
        evidence, telemetry = self.evidence()
        verdict = judge(evidence)
        report = self.markdown(manifest, verdict, evidence, telemetry, "timeline.png" if chart else None)
        write_atomic(out / "report.md", lambda tmp: tmp.write_text(report, encoding="utf-8"))
        # The UI shows images given as data URIs inside markdown, so the chart travels with the artifact.
        inline = f"data:image/png;base64,{base64.b64encode(chart).decode()}" if chart else None
        report = self.markdown(manifest, verdict, evidence, telemetry, inline)
        key = self.key
        if self.rows:
            create_table_artifact(table=self.rows, key=f"{key}-chunks", description=f"Per-chunk summary of {key}")
        create_markdown_artifact(markdown=report, key=f"{key}-report", description=verdict.headline[:200])
        return {
            "verdict": verdict.kind,
            "headline": verdict.headline,
            "rows_sent": sum(st.sent_rows for st in self.stats),
            "sending_s": round(sum(st.seconds for st in self.stats if st.sent_rows), 3),
            "requests_per_s": round(evidence.requests_per_s, 3),
            "tokens_per_s": round(evidence.tokens_per_s, 1),
            "telemetry": telemetry,
        }


def publish_scale_out_report(
    settings: JobSettings, manifest: dict[str, Any], shards: list[dict[str, Any]], events: list[str]
) -> str:
    """The parent's report of a job spread over hosts: one line per host, from its shard runs' manifests.

    Each host's own report (with its GPU timeline) is the `<name>-<host>-report` artifact.
    """
    per_host: dict[str, list[dict[str, Any]]] = {}
    for shard in shards:
        per_host.setdefault(shard["host"], []).append(shard)
    # Hosts work side by side: their rates add up; each host's rate is over its own sending time.
    total_rate = 0.0
    lines = [
        "| host | shard runs | rows sent (finished chunks) | requests/s | generated tokens/s | VRAM peak MiB | GPU util mean | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for host, runs in sorted(per_host.items()):
        rows = sum(r.get("rows_sent", 0) for r in runs)
        secs = sum(r.get("sending_s", 0.0) for r in runs)
        tokens = sum(r.get("tokens_per_s", 0.0) * r.get("sending_s", 0.0) for r in runs)
        rate = rows / secs if secs else 0.0
        total_rate += rate
        peaks = [r["telemetry"].get("vram_peak_mib") for r in runs if r.get("telemetry")]
        utils = [r["telemetry"].get("gpu_util_mean") for r in runs if r.get("telemetry")]
        peak = max((p for p in peaks if p is not None), default=None)
        util = [u for u in utils if u is not None]
        lines.append(
            f"| {host} | {len(runs)} | {rows:,} | {rate:.2f} | {tokens / secs if secs else 0.0:.1f} | "
            f"{_fmt(peak)} | {_fmt(sum(util) / len(util) if util else None, '.0f', ' %')} | "
            f"{runs[-1].get('verdict', 'n/a')} (`{settings.name}-{host}-report`) |"
        )
    status = "complete" if manifest["complete"] else f"**incomplete** ({manifest['error']})"
    eta = eta_hours(settings.production_rows, total_rate) if total_rate else float("inf")
    text = (
        "\n".join(
            [
                f"# Scale-out report: {settings.name}",
                "",
                f"Status: {status}. {manifest['rows_ok']:,} ok and {manifest['rows_error']:,} error rows of "
                f"{manifest['rows_total']:,} ({manifest['chunks']} chunks) over {len(manifest['hosts'])} host(s), "
                f"wall {_duration(manifest['wall_s'])}.",
                "",
                *lines,
                "",
                f"All hosts together: {total_rate:.2f} requests/s while sending → "
                f"**{eta:.1f} h for the {settings.production_rows:,}-row production job**.",
                "",
                "### Moves between hosts",
                "",
                *([f"- {e}" for e in events] or ["none"]),
                "",
                f"Files: `{settings.output_dir}/results.parquet`, `manifest.json`; each shard run's report, "
                "telemetry and manifest under `shards/<host>-<first chunk>/`.",
            ]
        )
        + "\n"
    )
    write_atomic(settings.output_dir / "report.md", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    create_markdown_artifact(markdown=text, key=f"{settings.name}-report", description=f"{settings.name} over hosts")
    return text
