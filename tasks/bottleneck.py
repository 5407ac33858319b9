"""Bottleneck verdict for a finished (or running) batch: explicit rules, pure functions, no I/O.

NVML utilisation is the share of time *some* kernel ran, so
util >= 95 % alone never means GPU-bound. One sequence at a time reads all weights per token;
more sequences in flight share that read almost for free. GPU-bound needs evidence that more
in-flight work no longer helps (a flat calibration curve) or cannot fit (no VRAM for a KV slot).

Rules, first match wins: cpu-spill, memory-pressure, backend-errors, no-gpu-data / cpu-bound,
idle gaps (client-bound / cpu-bound), calibration curve, KV slots vs VRAM headroom.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

VerdictKind = Literal[
    "gpu-bound",
    "client-bound",
    "cpu-spill",
    "memory-pressure",
    "backend-errors",
    "cpu-bound",
    "no-gpu-data",
]

ERROR_RATE_MAX = 0.05  # more than 1 row in 20 failing is a backend problem, not noise
RAM_AVAILABLE_MIN = 0.05  # below 5 % available the host swaps or the OOM killer is near
IDLE_FRACTION_MAX = 0.20  # GPU util < 10 % in more than a fifth of samples: nobody fed it
IDLE_UTIL_PCT = 10.0
FLAT_GAIN = 0.05  # doubling in-flight for < 5 % more tokens/s: the engine is saturated
CPU_SATURATED_PCT = 85.0
VRAM_MARGIN_GIB = 0.5  # room left for compute buffers and fragmentation when adding KV slots

# Gemma 3 12B: 48 layers, 8 KV heads x 256 dims, f16 cache -> 8 KiB per token per layer.
# 8 layers are global (full context); 40 use a 1024-token sliding window, which llama.cpp
# sizes as window + ubatch (512). Gives ~0.72 GiB at 4k, ~0.97 GiB at 8k (measured 0.6-0.9 GiB).
_KV_BYTES_PER_TOKEN_LAYER = 2 * 8 * 256 * 2
_GLOBAL_LAYERS, _LOCAL_LAYERS, _SWA_TOKENS = 8, 40, 1024 + 512


class TelemetrySummary(BaseModel):
    """What `tasks.telemetry.summarize()` returns for the run's window."""

    model_config = ConfigDict(extra="forbid")

    samples: int = Field(0, ge=0, description="host samples in the window")
    cpu_mean_pct: float | None = Field(None, description="mean host CPU, all cores")
    rss_peak_mib: float | None = Field(None, description="peak RSS of the pipeline process")
    ram_available_min_mib: float | None = Field(None, description="lowest host RAM available")
    ram_total_mib: float | None = Field(None, description="host RAM total")
    ollama_spill: bool | None = Field(None, description="/api/ps size_vram < size seen")
    vram_peak_mib: float | None = Field(None, description="peak VRAM used")
    vram_mean_mib: float | None = Field(None, description="mean VRAM used")
    vram_total_mib: float | None = Field(None, description="VRAM of the card")
    vram_headroom_mib: float | None = Field(None, description="total - peak")
    gpu_util_mean: float | None = Field(None, description="NVML 'a kernel ran' %, mean")
    mem_util_mean: float | None = Field(None, description="NVML memory-bandwidth util %, mean")
    gpu_idle_fraction: float | None = Field(None, ge=0, le=1, description="share util < 10 %")
    power_mean_w: float | None = Field(None, description="mean board power")
    power_max_w: float | None = Field(None, description="peak board power")


class RunEvidence(BaseModel):
    """Everything the verdict looks at, gathered by the flow after (or during) a run."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["ollama", "llamacpp", "openai"] = Field(description="inference engine")
    in_flight: int = Field(ge=1, description="requests the client kept in flight")
    parallel_slots: int | None = Field(
        None, ge=1, description="OLLAMA_NUM_PARALLEL if known (default 1 since Ollama 0.10)"
    )
    num_ctx: int | None = Field(None, ge=1, description="context per slot; None assumes 4096")
    requests_per_s: float = Field(ge=0, description="whole-run rows finished per second")
    tokens_per_s: float = Field(ge=0, description="whole-run generated tokens per second")
    chunk_tokens_per_s: list[float] = Field(default_factory=list, description="per chunk")
    rows_total: int = Field(ge=0, description="rows in the job")
    rows_done: int = Field(0, ge=0, description="rows finished (ok or error) so far")
    telemetry: TelemetrySummary | None = Field(None, description="summarize() of the run")
    errors: dict[str, int] = Field(default_factory=dict, description="error rows by kind")
    calibration: dict[int, float] | None = Field(None, description="measured {in_flight: tokens_per_s}")


class Verdict(BaseModel):
    """The bottleneck call with the numbers behind it and what to change."""

    kind: VerdictKind
    headline: str
    evidence: list[str] = Field(default_factory=list)
    advice: list[str] = Field(default_factory=list)


def kv_cache_gib_per_slot(num_ctx: int) -> float:
    """KV cache one Ollama slot of Gemma 3 12B needs at `num_ctx` (GiB, f16 cache)."""
    if num_ctx < 1:
        raise ValueError("num_ctx must be >= 1")
    tokens = _GLOBAL_LAYERS * num_ctx + _LOCAL_LAYERS * min(num_ctx, _SWA_TOKENS)
    return tokens * _KV_BYTES_PER_TOKEN_LAYER / 1024**3


def slots_that_fit(headroom_mib: float, num_ctx: int) -> int:
    """How many more KV slots fit in the measured VRAM headroom, keeping a safety margin."""
    usable = headroom_mib / 1024 - VRAM_MARGIN_GIB
    return max(0, math.floor(usable / kv_cache_gib_per_slot(num_ctx)))


def calibration_knee(curve: dict[int, float]) -> int | None:
    """Smallest in-flight n where going to >= 2n raised tokens/s by < 5 %; None if still scaling."""
    points = sorted(curve)
    for n in points:
        doubled = [m for m in points if m >= 2 * n]
        if doubled and curve[n] > 0 and curve[doubled[0]] < curve[n] * (1 + FLAT_GAIN):
            return n
    return None


def eta_hours(rows_total: int, rows_per_s: float) -> float:
    """Hours to process `rows_total` rows at `rows_per_s` (inf when nothing moves)."""
    if rows_total < 0 or rows_per_s < 0:
        raise ValueError("rows_total and rows_per_s must be >= 0")
    if rows_total == 0:
        return 0.0
    return math.inf if rows_per_s == 0 else rows_total / rows_per_s / 3600


def judge(e: RunEvidence) -> Verdict:
    """Apply the rules in order; the first that matches gives the verdict."""
    rules: list[Callable[[RunEvidence], Verdict | None]] = [
        _spill,
        _memory_pressure,
        _backend_errors,
        _no_gpu_data,
        _idle_gaps,
        _calibration,
        _kv_slots,
    ]
    for rule in rules:
        verdict = rule(e)
        if verdict is not None:
            verdict.evidence[:0] = _common_evidence(e)
            return verdict
    raise AssertionError("_kv_slots always decides")  # pragma: no cover


def render_markdown(v: Verdict) -> list[str]:
    """The verdict as markdown lines (for the run report artifact)."""
    lines = [f"### Bottleneck: `{v.kind}`", "", f"**{v.headline}**", ""]
    if v.evidence:
        lines += ["Evidence:", *(f"- {x}" for x in v.evidence), ""]
    if v.advice:
        lines += ["Advice:", *(f"- {x}" for x in v.advice), ""]
    return lines


# --- rules -----------------------------------------------------------------------------------


def _spill(e: RunEvidence) -> Verdict | None:
    spill = _t(e).ollama_spill
    if not spill:
        return None
    return Verdict(
        kind="cpu-spill",
        headline="Part of the model runs on the CPU (Ollama /api/ps size_vram < size)",
        evidence=["Ollama reported size_vram below size: layers spilled to system RAM"],
        advice=[
            "Lower num_ctx or OLLAMA_NUM_PARALLEL so weights + KV x slots fit in VRAM",
            "Check nvidia-smi for other processes holding VRAM",
        ],
    )


def _memory_pressure(e: RunEvidence) -> Verdict | None:
    t = _t(e)
    if t.ram_available_min_mib is None or not t.ram_total_mib:
        return None
    share = t.ram_available_min_mib / t.ram_total_mib
    if share >= RAM_AVAILABLE_MIN:
        return None
    evidence = [f"Host RAM available fell to {share:.1%} ({t.ram_available_min_mib:,.0f} MiB)"]
    if t.rss_peak_mib is not None:
        evidence.append(f"Pipeline process peak RSS {t.rss_peak_mib:,.0f} MiB")
    return Verdict(
        kind="memory-pressure",
        headline="Host memory is nearly exhausted",
        evidence=evidence,
        advice=[
            "Use smaller chunks so fewer rows and results are held in memory",
            "Stop other memory-hungry processes on the host",
        ],
    )


_ERROR_ADVICE = {
    "oom": "Out-of-memory errors: lower in-flight requests, OLLAMA_NUM_PARALLEL or num_ctx",
    "timeout": "Timeouts: lower in-flight requests or raise the request timeout",
    "invalid_output": "Invalid outputs: tighten the prompt/schema, raise num_predict if cut off",
    "connection": "Connection errors: check the server is up and not restarting",
}


def _backend_errors(e: RunEvidence) -> Verdict | None:
    n_err = sum(e.errors.values())
    rate = n_err / max(e.rows_done, 1)
    if n_err == 0 or rate <= ERROR_RATE_MAX:
        return None
    by_kind = ", ".join(f"{k}: {n}" for k, n in sorted(e.errors.items(), key=lambda x: -x[1]))
    advice = [_ERROR_ADVICE[k] for k in e.errors if k in _ERROR_ADVICE and e.errors[k]]
    return Verdict(
        kind="backend-errors",
        headline=f"{rate:.0%} of finished rows failed",
        evidence=[f"{n_err} errors over {e.rows_done} rows ({by_kind})"],
        advice=advice or ["Read the error column of the failed rows"],
    )


def _no_gpu_data(e: RunEvidence) -> Verdict | None:
    t = _t(e)
    if t.vram_peak_mib is not None:
        return None
    evidence = ["No GPU telemetry (NVML unavailable): judging from throughput and in-flight only"]
    if t.cpu_mean_pct is not None and t.cpu_mean_pct >= CPU_SATURATED_PCT:
        return Verdict(
            kind="cpu-bound",
            headline=f"Host CPU saturated ({t.cpu_mean_pct:.0f} % mean) and no GPU seen",
            evidence=evidence,
            advice=["Run on a GPU host, or give the engine more threads/cores"],
        )
    advice: list[str] = []
    if e.calibration and (better := _better_in_flight(e)) is not None:
        n, gain = better
        advice.append(f"Calibration: {n} in flight gave {gain:+.0%} tokens/s; use it")
    elif e.backend == "llamacpp":
        advice.append(
            "The embedded llama.cpp backend decodes one sequence at a time, so more in-flight requests "
            "only queue; for throughput run Ollama on a GPU with OLLAMA_NUM_PARALLEL > 1"
        )
    elif e.in_flight == 1:
        advice.append(
            "One request in flight: measure tokens/s at 1, 2, 4, 8 in flight; "
            "on a GPU more parallel sequences usually raise total tokens/s"
        )
    return Verdict(
        kind="no-gpu-data",
        headline="No GPU data: bottleneck cannot be confirmed from the GPU side",
        evidence=evidence,
        advice=advice or ["Enable NVML (NVIDIA driver) to get a GPU-side verdict"],
    )


def _idle_gaps(e: RunEvidence) -> Verdict | None:
    t = _t(e)
    idle = t.gpu_idle_fraction
    if idle is None or idle <= IDLE_FRACTION_MAX:
        return None
    evidence = [f"GPU idle (util < {IDLE_UTIL_PCT:.0f} %) in {idle:.0%} of samples while rows remained"]
    if t.cpu_mean_pct is not None and t.cpu_mean_pct >= CPU_SATURATED_PCT:
        return Verdict(
            kind="cpu-bound",
            headline="GPU waits on a saturated host CPU",
            evidence=[*evidence, f"Host CPU {t.cpu_mean_pct:.0f} % mean"],
            advice=["Profile prompt rendering / output validation; move it off the hot path"],
        )
    return Verdict(
        kind="client-bound",
        headline="Client-bound: the GPU sits idle between requests",
        evidence=evidence,
        advice=[
            f"Keep more requests in flight (now {e.in_flight}) so the server always has work",
            "Start the next chunk as soon as one ends (GPU slot hand-over gaps)",
        ],
    )


def _calibration(e: RunEvidence) -> Verdict | None:
    if not e.calibration:
        return None
    curve = e.calibration
    knee = calibration_knee(curve)
    if knee is not None and e.in_flight >= knee:
        doubled = min(m for m in curve if m >= 2 * knee)
        gain = curve[doubled] / curve[knee] - 1
        return Verdict(
            kind="gpu-bound",
            headline="GPU-bound: more requests in flight no longer raise throughput",
            evidence=[
                f"Calibration: {knee} -> {doubled} in flight changed tokens/s by {gain:+.1%} "
                f"({curve[knee]:,.0f} -> {curve[doubled]:,.0f})",
                *_gpu_lines(e),
            ],
            advice=[
                "Throughput is at this card's limit for this model; a faster card, smaller "
                "quantisation or a batching engine (vLLM) is the next step",
            ],
        )
    better = _better_in_flight(e)
    if better is None:
        return None
    n, gain = better
    return Verdict(
        kind="client-bound",
        headline=f"Client-bound / under-batched: raise in-flight requests to {n}",
        evidence=[f"Calibration: {n} in flight gave {gain:+.0%} tokens/s over {e.in_flight}"],
        advice=[
            f"Set in-flight requests to {n}" + (f" and OLLAMA_NUM_PARALLEL={n}" if e.backend == "ollama" else ""),
        ],
    )


def _kv_slots(e: RunEvidence) -> Verdict:
    t = _t(e)
    slots = 1 if e.backend == "llamacpp" else (e.parallel_slots or 1)
    if e.backend == "ollama" and e.in_flight < slots:
        return Verdict(
            kind="client-bound",
            headline=f"Client-bound: {e.in_flight} in flight but {slots} server slots are ready",
            evidence=_gpu_lines(e),
            advice=[f"Raise in-flight requests to {slots} (slots already allocated: no VRAM cost)"],
        )
    num_ctx = e.num_ctx or 4096
    kv = kv_cache_gib_per_slot(num_ctx)
    extra = slots_that_fit(t.vram_headroom_mib or 0.0, num_ctx)
    kv_line = (
        f"KV cache ~{kv:.2f} GiB per slot at num_ctx {num_ctx}"
        + ("" if e.num_ctx else " (num_ctx assumed)")
        + f"; headroom {(t.vram_headroom_mib or 0) / 1024:.1f} GiB fits {extra} more"
    )
    if extra == 0:
        return Verdict(
            kind="gpu-bound",
            headline="GPU-bound: every slot is busy and VRAM has no room for another",
            evidence=[*_gpu_lines(e), kv_line],
            advice=[
                f"Halving num_ctx to {num_ctx // 2} would free ~"
                f"{(kv - kv_cache_gib_per_slot(max(1, num_ctx // 2))) * slots:.1f} GiB for more slots",
                "Confirm with a calibration run (tokens/s at 1, 2, 4, 8 in flight)",
            ],
        )
    target = slots + extra
    util_note = (
        f"NVML util {t.gpu_util_mean:.0f} % only says a kernel was running, not that the "
        "GPU's throughput is used up: one sequence per step leaves most of it idle"
        if t.gpu_util_mean is not None
        else "One sequence per decode step leaves most of the GPU's throughput unused"
    )
    if e.backend == "llamacpp":
        advice = [
            "The embedded llama.cpp decodes one sequence at a time; use the Ollama backend "
            f"with OLLAMA_NUM_PARALLEL={target} and {target} requests in flight",
        ]
    else:
        advice = [
            f"Set OLLAMA_NUM_PARALLEL={target} and in-flight requests to {target}: needs "
            f"~{extra * kv:.1f} GiB more VRAM ({extra} x {kv:.2f} GiB)",
        ]
    advice.append("Confirm with a calibration run (tokens/s at 1, 2, 4, 8 in flight)")
    return Verdict(
        kind="client-bound",
        headline="Client-bound / under-batched: raise in-flight requests and OLLAMA_NUM_PARALLEL",
        evidence=[f"{e.in_flight} request(s) in flight, {slots} slot(s)", util_note, kv_line],
        advice=advice,
    )


# --- helpers ---------------------------------------------------------------------------------


def _t(e: RunEvidence) -> TelemetrySummary:
    return e.telemetry or TelemetrySummary()


def _better_in_flight(e: RunEvidence) -> tuple[int, float] | None:
    """The calibrated in-flight worth moving to (knee, else best), and its gain over now."""
    curve = e.calibration or {}
    now = curve.get(e.in_flight)
    if not now:
        below = [n for n in curve if n <= e.in_flight]
        now = curve[max(below)] if below else None
    if not now:
        return None
    knee = calibration_knee(curve)
    target = knee if knee is not None else max(curve, key=lambda n: curve[n])
    gain = curve[target] / now - 1
    return (target, gain) if target > e.in_flight and gain >= FLAT_GAIN else None


def _gpu_lines(e: RunEvidence) -> list[str]:
    t = _t(e)
    lines = []
    if t.gpu_util_mean is not None:
        mem = f", memory-bandwidth util {t.mem_util_mean:.0f} %" if t.mem_util_mean is not None else ""
        lines.append(f"GPU util {t.gpu_util_mean:.0f} % (a kernel was running){mem}")
    if t.power_mean_w is not None and t.power_max_w is not None:
        lines.append(f"Power {t.power_mean_w:.0f} W mean, {t.power_max_w:.0f} W peak")
    return lines


def _common_evidence(e: RunEvidence) -> list[str]:
    lines = [
        f"Throughput {e.requests_per_s:.2f} req/s, {e.tokens_per_s:,.0f} tokens/s "
        f"with {e.in_flight} in flight ({e.backend})"
    ]
    if len(e.chunk_tokens_per_s) > 1:
        lo, hi = min(e.chunk_tokens_per_s), max(e.chunk_tokens_per_s)
        lines.append(f"Per chunk {lo:,.0f}-{hi:,.0f} tokens/s")
    t = _t(e)
    if t.vram_peak_mib is not None and t.vram_total_mib is not None:
        lines.append(f"VRAM peak {t.vram_peak_mib / 1024:.1f} of {t.vram_total_mib / 1024:.1f} GiB")
    remaining = max(0, e.rows_total - e.rows_done)
    if remaining and e.requests_per_s > 0:
        lines.append(f"{remaining:,} rows left: ETA {eta_hours(remaining, e.requests_per_s):.1f} h")
    return lines
