"""The run report: evidence from a job's chunk stats and telemetry, rendered as markdown.

Plain functions with no I/O: the flow reads and writes the files (tasks/storage/) and
`publish_artifacts` is the only place that creates the Prefect table and report artifacts.
Keys derive from the job name, so each job (and each deployment running it nightly) keeps a
version history on the Artifacts page. A report covers the whole job in its directory: every
attempt (a failed run, its resume, a rerun that found everything done), not just the last one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

import polars as pl

from tasks.analysis.charts import sparkline
from tasks.analysis.kv import GLOBAL_EVERY, KvGeometry, eta_hours
from tasks.analysis.progress import duration
from tasks.analysis.telemetry import summarize
from tasks.analysis.verdict import LevelReading, RunEvidence, TelemetrySummary, Verdict, eta_scope, render_markdown
from tasks.inference.backends.protocol import ServerInfo
from tasks.schema import ChunkStats
from tasks.settings.model import JobSettings
from tasks.storage.manifest import Attempt, Manifest


def _fmt(value: float | None, spec: str = ".0f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def rounded(value: float | None, digits: int | None = None) -> float | None:
    """`value` rounded for a manifest or a table; None stays None."""
    return None if value is None else round(value, digits)


def chunk_row(stats: ChunkStats, samples: pl.DataFrame) -> dict[str, Any]:
    """One line of the per-chunk table: what the chunk did and what the GPU did meanwhile."""
    telemetry = summarize(samples, stats.started_at, stats.finished_at) if samples.height else {}
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
        "latency_p50_ms": rounded(stats.latency_p50_ms),
        "latency_p95_ms": rounded(stats.latency_p95_ms),
        "in_flight": stats.in_flight,
        "num_ctx": stats.num_ctx,
        "vram_peak_mib": telemetry.get("vram_peak_mib"),
        "vram_mean_mib": rounded(telemetry.get("vram_mean_mib")),
        "vram_headroom_mib": telemetry.get("vram_headroom_mib"),
        "gpu_util_mean": rounded(telemetry.get("gpu_util_mean"), 1),
        "power_mean_w": rounded(telemetry.get("power_mean_w")),
        "cpu_mean_pct": rounded(telemetry.get("cpu_mean_pct"), 1),
        "seconds": round(stats.seconds, 1) if stats.sent_rows else 0.0,
    }


def per_endpoint(stats: Iterable[ChunkStats]) -> dict[str, dict[str, float]]:
    """Chunks, rows sent, sending seconds and generated tokens, per endpoint."""
    per: dict[str, dict[str, float]] = {}
    for st in stats:
        if st.sent_rows:
            e = per.setdefault(st.endpoint or "?", {"chunks": 0, "rows": 0, "seconds": 0.0, "tokens": 0})
            e["chunks"] += 1
            e["rows"] += st.sent_rows
            e["seconds"] += st.seconds
            e["tokens"] += st.completion_tokens
    return per


def sending_s(stats: Iterable[ChunkStats]) -> float:
    """Seconds in which at least one chunk was sending: endpoints side by side count once, endpoints
    (or attempts) one after the other add up."""
    busy, reached = 0.0, float("-inf")
    for start, finish in sorted((s.started_at, s.finished_at) for s in stats if s.sent_rows):
        busy += max(0.0, finish - max(start, reached))
        reached = max(reached, finish)
    return busy


def kv_geometry(geometry: dict[str, Any] | None) -> KvGeometry | None:
    """The verdict's KV-cache shape from what the engine said (ServerInfo.geometry)."""
    if not geometry:
        return None
    arch = str(geometry.get("arch"))
    window = geometry.get("sliding_window")
    return KvGeometry(
        layers=geometry["layers"],
        kv_heads=geometry["kv_heads"],
        head_dim=geometry["head_dim"],
        sliding_window=window if window and arch in GLOBAL_EVERY else None,
        global_every=GLOBAL_EVERY.get(arch, 1),
        source=f"{arch}: {geometry['layers']} layers, {geometry['kv_heads']} KV heads x {geometry['head_dim']}",
    )


def level_readings(stats: list[ChunkStats], samples: pl.DataFrame) -> dict[int, LevelReading] | None:
    """GPU util and power over the time each in-flight level was in force, over every chunk of the job,
    with the chunks' p50 latency at that level (their median when several chunks ran it)."""
    windows: dict[int, list[list[float]]] = {}
    latency: dict[int, list[float]] = {}
    for st in stats:
        for level, entry in (st.levels or {}).items():
            windows.setdefault(level, []).extend(entry["windows"])
            if entry.get("latency_p50_ms") is not None:
                latency.setdefault(level, []).append(entry["latency_p50_ms"])
    if len(windows) < 2:
        return None
    gpu = samples.filter(pl.col("power_w").is_not_null() | pl.col("gpu_util_pct").is_not_null())
    readings = {}
    for level, spans in sorted(windows.items()):
        inside = gpu.filter(pl.any_horizontal(pl.col("t").is_between(a, b, closed="left") for a, b in spans))
        lat = sorted(latency.get(level, []))
        readings[level] = LevelReading(
            gpu_util_pct=inside["gpu_util_pct"].mean() if inside.height else None,
            power_w=inside["power_w"].mean() if inside.height else None,
            latency_p50_s=lat[len(lat) // 2] / 1000 if lat else None,
        )
    return readings


def backend_sampling_used(stats: list[ChunkStats]) -> bool | None:
    """Whether this job's requests to a llama.cpp server went with backend sampling; None: no such server."""
    on_server = [s for s in stats if s.engine == "llama.cpp" and s.sent_rows]
    return any(s.backend_sampling_requests for s in on_server) if on_server else None


def sampling_line(settings: JobSettings, stats: list[ChunkStats]) -> str:
    """How the requests went: structured output mode and backend sampling, in one sentence ('' when neither)."""
    ran = [s for s in stats if s.sent_rows]
    modes = sorted({s.structured_output for s in ran if s.structured_output})
    structured = {
        "grammar": "the output schema went to the engine as a grammar",
        "validate": "the output schema was stated in the prompt, every answer validated (no grammar)",
    }
    parts = [" / ".join(structured[m] for m in modes)] if modes else []
    requests = sum(s.requests for s in ran)
    sampled = sum(s.backend_sampling_requests for s in ran)
    if sampled:
        parts.append(f"llama.cpp backend sampling (GPU-side) on {sampled:,} of {requests:,} requests")
    elif backend_sampling_used(stats) is False:
        why = "backend_sampling: off" if settings.backend_sampling == "off" else "requests carried a grammar"
        parts.append(f"no llama.cpp backend sampling ({why})")
    if not parts:
        return ""
    # The settings behind it, each once: "backend_sampling: off" may already be the reason above.
    chosen = [f"structured_output: {settings.structured_output}"] if modes else []
    if settings.backend_sampling != "off":
        chosen.append(f"backend_sampling: {settings.backend_sampling}")
    return f"Requests: {'; '.join(parts)}" + (f" ({', '.join(chosen)})." if chosen else ".")


def build_evidence(
    settings: JobSettings,
    stats: list[ChunkStats],
    rows_total: int,
    rows_done: int,
    telemetry: dict[str, Any],
    errors: dict[str, int],
    servers: list[ServerInfo] | None = None,
    levels: dict[int, LevelReading] | None = None,
    timed: tuple[float, float] | None = None,
) -> RunEvidence:
    """The job's figures for the verdict: rates over the time chunks were actually sending; the
    server's parallel slots and model shape as the server (or else the job file) says them."""
    ran = sorted((s for s in stats if s.sent_rows), key=lambda s: s.finished_at)
    busy = sending_s(ran)
    requests_per_s = sum(s.sent_rows for s in ran) / busy if busy else 0.0
    server = servers[0] if servers else None
    slots: int | None = None
    said: Literal["server", "operator"] | None = None
    if server is not None and server.parallel_slots:
        slots, said = server.parallel_slots, "server"
    if slots is None and settings.server_slots is not None:
        slots, said = settings.server_slots, "operator"
    return RunEvidence(
        backend=settings.backend,
        engine=server.engine if server else None,
        parallel_slots=slots,
        slots_source=said,
        kv_geometry=kv_geometry(server.geometry if server else None),
        in_flight=ran[-1].in_flight if ran else settings.in_flight_ceiling,
        # 'auto' carries its curve from chunk to chunk: the last chunk's holds the latest reading of each level.
        calibration=next((s.calibration for s in sorted(stats, key=lambda s: -s.finished_at) if s.calibration), None),
        levels=levels,
        backend_sampling=backend_sampling_used(stats),
        production_rows=settings.production_rows,
        num_ctx=settings.options.num_ctx,
        requests_per_s=requests_per_s,
        tokens_per_s=sum(s.completion_tokens for s in ran) / busy if busy else 0.0,
        chunk_tokens_per_s=[s.completion_tokens / s.seconds for s in ran],
        rows_total=rows_total,
        rows_done=rows_done,
        telemetry=TelemetrySummary(**telemetry) if telemetry else None,
        errors=errors,
        server_share=timed[0] if timed else None,
        outside_s=timed[1] if timed else None,
        occupancy=occupancy(ran, requests_per_s),
    )


def occupancy(ran: list[ChunkStats], requests_per_s: float) -> float | None:
    """Requests out on average over in_flight (Little's law with the chunks' median latency): 1 when the
    client always had every request out, lower when it left gaps between them. At most 1: under 'auto'
    the level is the last one kept, and a probe above it lengthened the latencies."""
    latencies = sorted(s.latency_p50_ms for s in ran if s.latency_p50_ms)
    level = ran[-1].in_flight if ran else 0
    if not latencies or not level or not requests_per_s:
        return None
    return round(min(1.0, requests_per_s * latencies[len(latencies) // 2] / 1000 / level), 3)


_EVENT = re.compile(r"^(?P<time>\d\d:\d\d:\d\d) (?:(?P<chunk>chunk-\d+): )?(?P<text>.*)$", re.S)


def recovery_kind(event: str) -> str:
    """`14:02:11 chunk-00003: out of memory, in-flight lowered to 2, backing off: <error>` →
    `out of memory, in-flight lowered to N, backing off`: the event without its time, chunk,
    numbers and error text, so that repeats of one recovery count together."""
    match = _EVENT.match(event)
    text = match["text"] if match else event
    return re.sub(r"\d+(\.\d+)?", "N", text.split(": ")[0]).strip()


def summarize_recoveries(events: list[str]) -> list[dict[str, Any]]:
    """Recoveries and back-offs per kind: how many, the first and the last (in order of events)."""
    kinds: dict[str, dict[str, Any]] = {}
    for event in events:
        entry = kinds.setdefault(recovery_kind(event), {"count": 0, "first": event, "last": event})
        entry["count"] += 1
        entry["last"] = event
    return [{"kind": kind, **entry} for kind, entry in kinds.items()]


AUTO_CHANGES_SHOWN = 40


def _auto_changes(events: list[str]) -> list[str]:
    """'auto's level changes, in order (the latest AUTO_CHANGES_SHOWN): what it tried and what it kept."""
    changes = [e for e in events if "auto in-flight: " in e]
    if not changes:
        return []
    skipped = len(changes) - AUTO_CHANGES_SHOWN
    head = [f"- ... {skipped} earlier changes"] if skipped > 0 else []
    return ["Level changes:", "", *head, *(f"- {e}" for e in changes[-AUTO_CHANGES_SHOWN:]), ""]


def gpus_label(gpus: list[int] | None) -> str:
    """Which GPUs the report's figures cover."""
    if gpus is None:
        return "all GPUs NVML sees"
    return f"GPU{'s' if len(gpus) > 1 else ''} {', '.join(map(str, gpus))} (gpus)"


def energy_cell(energy: dict[str, float | None] | None) -> str:
    """`12.35 Wh, 4.57 Wh per 1,000 rows`, or why there is no figure."""
    wh = (energy or {}).get("energy_wh")
    if wh is None:
        return "no GPU power reading"
    per = (energy or {}).get("wh_per_1000_rows")
    return f"{wh:,.2f} Wh, " + (f"{per:,.2f} Wh per 1,000 rows" if per is not None else "no rows finished")


def _attempts_lines(attempts: list[Attempt]) -> list[str]:
    if len(attempts) < 2:
        return []
    lines = ["### Attempts", "", "| # | started (UTC) | wall | rows sent | ended |", "|---|---|---|---|---|"]
    for number, a in enumerate(attempts, 1):
        when = datetime.fromtimestamp(a.started_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        ended = "complete" if a.complete else (a.error or "incomplete")
        lines.append(f"| {number} | {when} | {duration(a.wall_s)} | {a.rows_sent:,} | {ended[:120]} |")
    return [*lines, ""]


def _endpoints_table(stats: list[ChunkStats]) -> list[str]:
    """Per endpoint, when chunks ran on more than one."""
    per = per_endpoint(stats)
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


def _timeline_lines(samples: pl.DataFrame, image: str | None) -> list[str]:
    """Sparklines, then the chart. The sparklines sit in a fenced block, not inline code: the UI's
    inline-code style is dark text on a dark background in its dark theme."""
    gpu = samples.filter(pl.col("vram_used_mib").is_not_null()).sort("t") if samples.height else samples
    lines = ["### Timeline", ""]
    chart = [f"![GPU and host over the job]({image})", ""] if image else []
    if gpu.height:
        spark = [
            f"VRAM   {sparkline(gpu['vram_used_mib'].to_list(), top=cast(float, gpu['vram_total_mib'].max()))}",
            f"util   {sparkline(gpu['gpu_util_pct'].fill_null(0).to_list(), top=100)}",
            f"power  {sparkline(gpu['power_w'].fill_null(0).to_list())}",
        ]
    elif samples.height:
        spark = [f"CPU %  {sparkline(samples['cpu_pct'].fill_null(0).to_list(), top=100)}  (no GPU data)"]
    else:
        return [*lines, "no telemetry samples", ""]
    return [*lines, "```text", *spark, "```", "", *chart]


def render_report(
    settings: JobSettings,
    manifest: Manifest,
    verdict: Verdict,
    evidence: RunEvidence,
    telemetry: dict[str, Any],
    samples: pl.DataFrame,
    *,
    stats: list[ChunkStats],
    events: list[str],
    report_dir: Path,
    image: str | None,
    energy: dict[str, float | None] | None = None,
) -> str:
    """The run report as markdown (the same text goes to report.md and the `-report` artifact)."""
    s = settings
    rate = evidence.requests_per_s
    attempts = manifest.attempts
    status = "complete" if manifest.complete else f"**incomplete** ({manifest.error})"
    if manifest.interrupted:
        status = f"**interrupted** by {manifest.interrupted} ({manifest.error}); the same command resumes"
    job_wall = sum(a.wall_s for a in attempts) or manifest.wall_s
    rate_cells = (
        [
            f"| requests/s | {rate:.2f} |",
            f"| generated tokens/s | {evidence.tokens_per_s:.1f} |",
            f"| **ETA for the {s.production_rows:,}-row production job** | "
            f"**{eta_hours(s.production_rows, rate):.1f} h** at this rate |",
        ]
        if rate
        else ["| requests/s | no rows were sent in any attempt |"]
    )
    recoveries = summarize_recoveries(events)
    requests_line = sampling_line(s, stats)
    lines = [
        f"# Run report: {s.name}",
        "",
        f"Status: {status}. {manifest.rows_ok:,} ok and {manifest.rows_error:,} error rows of "
        f"{manifest.rows_total:,} ({manifest.chunks} chunks of {s.chunk_size:,}), "
        f"backend `{s.backend}`, model `{s.model}`, {evidence.in_flight} request(s) in flight"
        f"{' (chosen by auto)' if s.in_flight == 'auto' else ''}"
        + (
            f", server {evidence.engine}"
            + (f" ({evidence.parallel_slots} parallel slot(s))" if evidence.parallel_slots else "")
            if evidence.engine
            else ""
        )
        + ", "
        + (
            f"{len(attempts)} attempts, wall {duration(job_wall)} in all (this one {duration(manifest.wall_s)})."
            if len(attempts) > 1
            else f"wall {duration(manifest.wall_s)}."
        ),
        "",
        *([requests_line, ""] if requests_line else []),
        "| throughput (while sending, all attempts) | value |",
        "|---|---|",
        *rate_cells,
        *(
            [
                f"| the server's own prompt + generation time | {evidence.server_share:.0%} of the requests' time "
                f"({evidence.outside_s:.2f} s a request outside it) |"
            ]
            if evidence.server_share is not None and evidence.outside_s is not None
            else []
        ),
        f"| GPU energy (this run, {gpus_label(s.gpus)}) | {energy_cell(energy)} |",
        f"| VRAM peak / total | {_fmt(telemetry.get('vram_peak_mib'))} / {_fmt(telemetry.get('vram_total_mib'))} MiB "
        f"(headroom {_fmt(telemetry.get('vram_headroom_mib'))} MiB) |",
        f"| GPU util mean (a kernel ran; {gpus_label(s.gpus)}) | {_fmt(telemetry.get('gpu_util_mean'), '.0f', ' %')} |",
        *(
            [
                "| before the GPU's first work (waiting for the GPU slot, a model load; left out of util) "
                f"| {_fmt(warm_up, '.0f', ' s')} |"
            ]
            if (warm_up := telemetry.get("warm_up_s"))
            else []
        ),
        f"| memory-bandwidth util mean | {_fmt(telemetry.get('mem_util_mean'), '.0f', ' %')} |",
        f"| power mean / max | {_fmt(telemetry.get('power_mean_w'))} / {_fmt(telemetry.get('power_max_w'))} W |",
        f"| host CPU mean | {_fmt(telemetry.get('cpu_mean_pct'), '.0f', ' %')} |",
        f"| the job's CPU mean (its process and children, of all cores) | "
        f"{_fmt(telemetry.get('job_cpu_mean_pct'), '.0f', ' %')} |",
        f"| peak RSS of the job | {_fmt(telemetry.get('rss_peak_mib'))} MiB |",
        "",
        *([f"**{scope}**", ""] if rate and (scope := eta_scope(evidence)) else []),
        *_attempts_lines(attempts),
        *_endpoints_table(stats),
        *render_markdown(verdict),
        *(
            [
                "### In-flight calibration (auto)",
                "",
                "| in flight | throughput |",
                "|---|---|",
                *(f"| {n} | {v:.1f} |" for n, v in sorted(evidence.calibration.items())),
                "",
                *_auto_changes(events),
            ]
            if evidence.calibration
            else []
        ),
        "### Errors by kind",
        "",
        ", ".join(f"`{k}`: {v}" for k, v in sorted(evidence.errors.items())) or "none",
        "",
    ]
    if recoveries:
        lines += [
            "### Recoveries and back-offs",
            "",
            "| kind | count | first | last |",
            "|---|---|---|---|",
            *(
                f"| {r['kind']} | {r['count']} | {r['first']} | {r['last'] if r['count'] > 1 else ''} |"
                for r in recoveries
            ),
            "",
            f"Every event, with its time: `recoveries` in `{report_dir}/manifest.json`.",
            "",
        ]
    lines += _timeline_lines(samples, image)
    lines += [
        f"Files: `{s.output_dir}/results.parquet`, `chunks/`; `{report_dir}/manifest.json`, "
        "`telemetry/samples.parquet`, `report.md`, `timeline.png`.",
    ]
    return "\n".join(lines) + "\n"


def render_scale_out_report(
    settings: JobSettings, manifest: Manifest, shards: list[Manifest], events: list[str]
) -> str:
    """The parent's report of a job spread over hosts: one line per host, from its shard runs' manifests.

    Each host's own report (with its GPU timeline) is the `<name>-<host>-report` artifact.
    """
    per_host: dict[str, list[Manifest]] = {}
    for shard in shards:
        per_host.setdefault(shard.host or "?", []).append(shard)
    # Hosts work side by side: their rates add up; each host's rate is over its own sending time.
    total_rate = 0.0
    lines = [
        "| host | shard runs | rows sent | requests/s | generated tokens/s | VRAM peak MiB | GPU util mean | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for host, runs in sorted(per_host.items()):
        rows = sum(r.rows_sent for r in runs)
        secs = sum(r.sending_s for r in runs)
        tokens = sum(r.tokens_sent for r in runs)  # each run's last attempt, as its rows and seconds are
        rate = rows / secs if secs else 0.0
        total_rate += rate
        peaks = [r.telemetry.get("vram_peak_mib") for r in runs]
        utils = [r.telemetry.get("gpu_util_mean") for r in runs]
        peak = max((p for p in peaks if p is not None), default=None)
        util = [u for u in utils if u is not None]
        lines.append(
            f"| {host} | {len(runs)} | {rows:,} | {rate:.2f} | {tokens / secs if secs else 0.0:.1f} | "
            f"{_fmt(peak)} | {_fmt(sum(util) / len(util) if util else None, '.0f', ' %')} | "
            f"{runs[-1].verdict or 'n/a'} (`{settings.name}-{host}-report`) |"
        )
    status = "complete" if manifest.complete else f"**incomplete** ({manifest.error})"
    eta = (
        f"**{eta_hours(settings.production_rows, total_rate):.1f} h for the {settings.production_rows:,}-row "
        "production job**"
        if total_rate
        else "no rate: no host sent rows in this run"
    )
    return (
        "\n".join(
            [
                f"# Scale-out report: {settings.name}",
                "",
                f"Status: {status}. {manifest.rows_ok:,} ok and {manifest.rows_error:,} error rows of "
                f"{manifest.rows_total:,} ({manifest.chunks} chunks) over {len(manifest.hosts or [])} host(s), "
                f"wall {duration(manifest.wall_s)}.",
                "",
                *lines,
                "",
                f"All hosts together: {total_rate:.2f} requests/s while sending → {eta}.",
                "",
                "GPU energy, all hosts: "
                + energy_cell({"energy_wh": manifest.energy_wh, "wh_per_1000_rows": manifest.wh_per_1000_rows})
                + ".",
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
