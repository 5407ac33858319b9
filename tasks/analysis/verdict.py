"""What limited the run: rules over the run's evidence, and the verdict rendered as markdown."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.analysis.kv import KvGeometry, eta_hours, slots_that_fit
from tasks.analysis.telemetry import IDLE_UTIL_PCT
from tasks.inference.calibrate import best_in_flight, calibration_knee

VerdictKind = Literal[
    "gpu-bound",
    "host-bound",
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
FLAT_GAIN = 0.05  # doubling in-flight for < 5 % more tokens/s: the engine is saturated
CPU_SATURATED_PCT = 85.0
HOST_BOUND_UTIL_PCT = 50.0  # more in flight stopped helping while kernels ran under half the time
# The host-bound signature across calibration levels: from the lowest to the highest level the GPU's
# utilisation and power fell (on a GPU-bound engine both rise or hold with more work) while tokens/s
# gained under half of what the extra requests would give if sequences shared the GPU for free. The
# H100 long-answer curve (Gemma 3 12B's shape on llama.cpp): 64x the requests for 2.3x tokens/s, util
# 65 -> 15 %, power 349 -> 159 W.
HOST_UTIL_FALL = 0.8  # util at the top level at most 80 % of the lowest level's
HOST_POWER_FALL = 0.9  # power at the top level at most 90 % of the lowest level's
HOST_SCALING_MAX = 0.5  # tokens/s gain below half the in-flight gain
# A tenth of a request outside the server's own prompt and generation time is HTTP and the host loop;
# the H100's prompt cache took a third at 1 in flight (0.216 s of 0.63 s).
OUTSIDE_SHARE = 0.1
# The GPU idles while the client keeps its requests out (this share of in_flight on average) and they sit
# inside the server (its own timings cover this share of their time), not in a queue for its slots:
# nothing the client does would feed it; the server's host side holds the work. The H100 sitting of
# Gemma 3 12B's shape, 16 in flight on 64 slots: 98 % out, 89 % inside, GPU idle 37 %.
SERVER_HELD_SHARE = 0.8

HOST_BOUND_HEADLINE = "Host-bound: the engine's CPU-side loop limits the run, not the GPU"

# Which error kinds say what about the run: only engine faults limit throughput.
OUTPUT_ERRORS = frozenset({"invalid_output"})
INPUT_ERRORS = frozenset({"empty_field", "context_length"})


class TelemetrySummary(BaseModel):
    """What `tasks.analysis.telemetry.summarize()` returns for the run's window."""

    model_config = ConfigDict(extra="forbid")

    samples: int = Field(0, ge=0, description="host samples in the window")
    cpu_mean_pct: float | None = Field(None, description="mean host CPU, all cores, every process on the machine")
    job_cpu_mean_pct: float | None = Field(
        None, description="mean CPU of the job's process and its children, as a share of all cores"
    )
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
    warm_up_s: float | None = Field(
        None,
        description="seconds from each attempt's start to the GPU's first work (or first answer), left out of util "
        "and idle share",
    )


class LevelReading(BaseModel):
    """What the GPU and the requests did while calibration held one in-flight level."""

    model_config = ConfigDict(extra="forbid")

    gpu_util_pct: float | None = Field(None, description="NVML util mean over the level's window")
    power_w: float | None = Field(None, description="board power mean over the window")
    latency_p50_s: float | None = Field(None, description="median request latency in the window")


class RunEvidence(BaseModel):
    """Everything the verdict looks at, gathered by the flow after (or during) a run."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["ollama", "llamacpp", "openai"] = Field(description="inference engine")
    engine: str | None = Field(None, description="what the server says it is (llama.cpp, ollama, ...)")
    in_flight: int = Field(ge=1, description="requests the client kept in flight")
    parallel_slots: int | None = Field(
        None, ge=1, description="sequences the server decodes together: from the server, or the operator's word"
    )
    slots_source: Literal["server", "operator"] | None = Field(None, description="who said parallel_slots")
    kv_geometry: KvGeometry | None = Field(None, description="the model's KV-cache shape, where known")
    num_ctx: int | None = Field(None, ge=1, description="context per slot; None assumes 4096")
    requests_per_s: float = Field(ge=0, description="whole-run rows finished per second")
    tokens_per_s: float = Field(ge=0, description="whole-run generated tokens per second")
    chunk_tokens_per_s: list[float] = Field(default_factory=list, description="per chunk")
    rows_total: int = Field(ge=0, description="rows in the job")
    rows_done: int = Field(0, ge=0, description="rows finished (ok or error) so far")
    telemetry: TelemetrySummary | None = Field(None, description="summarize() of the run")
    errors: dict[str, int] = Field(default_factory=dict, description="error rows by kind")
    calibration: dict[int, float] | None = Field(None, description="measured {in_flight: tokens_per_s}")
    levels: dict[int, LevelReading] | None = Field(
        None, description="GPU util, power and latency per calibrated in-flight level"
    )
    backend_sampling: bool | None = Field(
        None, description="whether requests used llama.cpp's backend (GPU-side) sampling; None: not llama.cpp's server"
    )
    production_rows: int | None = Field(None, ge=1, description="rows of the production job, for its ETA")
    server_share: float | None = Field(
        None, ge=0, description="share of the requests' time the server spent on prompt and generation (its timings)"
    )
    outside_s: float | None = Field(None, ge=0, description="mean seconds a request spent outside them")
    occupancy: float | None = Field(
        None, ge=0, description="requests out on average / in_flight (Little's law: requests/s x median latency)"
    )


class Finding(BaseModel):
    """Error rows of one cause, with what to do; beside the verdict, since they did not limit throughput."""

    cause: Literal["engine", "model-output", "input-data"]
    headline: str
    advice: list[str] = Field(default_factory=list)


class Verdict(BaseModel):
    """The bottleneck call with the numbers behind it and what to change."""

    kind: VerdictKind
    headline: str
    evidence: list[str] = Field(default_factory=list)
    advice: list[str] = Field(default_factory=list)
    findings: list[Finding] = Field(default_factory=list)


def judge(e: RunEvidence) -> Verdict:
    """Apply the rules in order; the first that matches gives the verdict."""
    rules: list[Callable[[RunEvidence], Verdict | None]] = [
        _spill,
        _memory_pressure,
        _backend_errors,
        _no_gpu_data,
        _idle_gaps,
        _host_bound,
        _calibration,
        _kv_slots,
    ]
    for rule in rules:
        verdict = rule(e)
        if verdict is not None:
            verdict.evidence[:0] = _common_evidence(e)
            verdict.findings = error_findings(e)
            return verdict
    raise AssertionError("_kv_slots always decides")  # pragma: no cover


def render_markdown(v: Verdict) -> list[str]:
    """The verdict as markdown lines (for the run report artifact)."""
    lines = [f"### Bottleneck: `{v.kind}`", "", f"**{v.headline}**", ""]
    if v.evidence:
        lines += ["Evidence:", *(f"- {x}" for x in v.evidence), ""]
    if v.advice:
        lines += ["Advice:", *(f"- {x}" for x in v.advice), ""]
    if v.findings:
        lines += ["Error rows by cause:", ""]
        for f in v.findings:
            lines += [f"- **{f.cause}**: {f.headline}", *(f"  - {x}" for x in f.advice)]
        lines.append("")
    return lines


def _cause(kind: str) -> Literal["engine", "model-output", "input-data"]:
    if kind in OUTPUT_ERRORS:
        return "model-output"
    return "input-data" if kind in INPUT_ERRORS else "engine"


def error_findings(e: RunEvidence) -> list[Finding]:
    """Error rows split by cause: the engine's faults, the model's output, the input data."""
    by_cause: dict[str, dict[str, int]] = {}
    for kind, n in e.errors.items():
        if n:
            by_cause.setdefault(_cause(kind), {})[kind] = n
    found = []
    for cause in ("engine", "model-output", "input-data"):
        if not (counts := by_cause.get(cause)):
            continue
        total = sum(counts.values())
        shown = ", ".join(f"{k}: {n}" for k, n in sorted(counts.items(), key=lambda x: -x[1]))
        advice = [_ERROR_ADVICE[k] for k in counts if k in _ERROR_ADVICE]
        found.append(
            Finding(
                cause=_cause(next(iter(counts))),
                headline=f"{total} of {e.rows_done:,} rows ({total / max(e.rows_done, 1):.1%}): {shown}",
                advice=advice or ["Read the error column of these rows"],
            )
        )
    return found


def eta_scope(e: RunEvidence) -> str | None:
    """What the production ETA estimates, when the run was not the production engine on a GPU."""
    no_gpu = _t(e).vram_peak_mib is None
    if e.backend != "llamacpp" and not no_gpu:
        return None
    where = "the embedded model" if e.backend == "llamacpp" else f"this {e.backend} server"
    return (
        f"This ETA is for {where} on this machine{' (no GPU seen)' if no_gpu else ''}: "
        "it says nothing about the production model on its GPU."
    )


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
    "oom": "Out-of-memory errors: lower in-flight requests, the server's parallel slots or num_ctx",
    "timeout": "Timeouts: lower in-flight requests or raise the request timeout",
    "dropped": "Dropped connections: check the server is up and not restarting",
    "unreachable": "Unreachable server: check it is up and not restarting",
    "invalid_output": "Answers that fail the output schema: tighten the prompt or schema, raise num_predict if "
    "answers are cut off (done_reason 'length'), or use a model that follows the format",
    "empty_field": "Rows with an empty template field were not sent: fix or drop them in the input",
    "context_length": "Prompts longer than the server's context: set trim_field, or give the server a larger "
    "context per slot",
}


def _backend_errors(e: RunEvidence) -> Verdict | None:
    # Only the engine's faults say the backend limited the run; bad answers and bad rows are findings.
    faults = {k: n for k, n in e.errors.items() if n and _cause(k) == "engine"}
    n_err = sum(faults.values())
    rate = n_err / max(e.rows_done, 1)
    if n_err == 0 or rate <= ERROR_RATE_MAX:
        return None
    by_kind = ", ".join(f"{k}: {n}" for k, n in sorted(faults.items(), key=lambda x: -x[1]))
    advice = [_ERROR_ADVICE[k] for k in faults if k in _ERROR_ADVICE]
    return Verdict(
        kind="backend-errors",
        headline=f"The engine failed {rate:.0%} of finished rows",
        evidence=[f"{n_err} engine faults over {e.rows_done} rows ({by_kind})"],
        advice=advice or ["Read the error column of the failed rows"],
    )


def _no_gpu_data(e: RunEvidence) -> Verdict | None:
    t = _t(e)
    if t.vram_peak_mib is not None:
        return None
    evidence = ["No GPU telemetry (NVML unavailable): judging from throughput and in-flight only", *_cpu_lines(t)]
    if _job_cpu_saturated(t):
        return Verdict(
            kind="cpu-bound",
            headline=f"The job's CPU saturated ({t.job_cpu_mean_pct:.0f} % of all cores, mean) and no GPU seen",
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
    if t.warm_up_s:
        evidence[0] += f" (the {t.warm_up_s:.0f} s before the GPU's first work: the GPU slot, a model load; left out)"
    if _job_cpu_saturated(t):
        return Verdict(
            kind="cpu-bound",
            headline="GPU waits on the job's saturated CPU",
            evidence=[*evidence, *_cpu_lines(t)],
            advice=["Profile prompt rendering / output validation; move it off the hot path"],
        )
    if (
        e.in_flight > 1  # at 1 in flight the idle time is the client's gap between requests: batch more
        and e.server_share is not None
        and e.server_share >= SERVER_HELD_SHARE
        and e.occupancy is not None
        and e.occupancy >= SERVER_HELD_SHARE  # the client kept its requests out, with no gaps between them
        and (e.parallel_slots is None or e.in_flight <= e.parallel_slots)
    ):
        slots = f" on {e.parallel_slots} slots" if e.parallel_slots else ""
        return Verdict(
            kind="host-bound",
            headline=HOST_BOUND_HEADLINE,
            evidence=[
                *evidence,
                f"Meanwhile the client kept {e.occupancy:.0%} of its {e.in_flight} requests out{slots}, and they "
                f"spent {e.server_share:.0%} of their time inside the server's prompt processing and generation "
                "(its own timings): the server's host side left the GPU waiting",
                *_cpu_lines(t),
            ],
            advice=[
                f"Auto measured {_curve_text(e.calibration)} tokens/s by level and kept {e.in_flight}: on a host-bound "
                "engine more in flight helps little"
                if e.calibration and len(e.calibration) > 1
                else "Measure the engine's curve (in_flight: auto, or runs at 1, 4, 16, 64 in flight): on a host-bound "
                "engine more in flight helps little",
                *_host_remedies(e),
            ],
        )
    return Verdict(
        kind="client-bound",
        headline="Client-bound: the GPU sits idle between requests",
        evidence=[*evidence, *_cpu_lines(t)],
        advice=[
            f"Keep more requests in flight (now {e.in_flight}) so the server always has work",
            "Start the next chunk as soon as one ends (GPU slot hand-over gaps)",
        ],
    )


def _host_bound(e: RunEvidence) -> Verdict | None:
    """More in flight stopped helping (or hurt) while the GPU ran kernels under half the time, or
    helped little while the GPU's utilisation and power fell as in-flight rose: the engine's host-side
    loop (sampling, grammar, bookkeeping per sequence) is the limit, not the GPU."""
    t = _t(e)
    if not e.calibration or t.gpu_util_mean is None:
        return None
    curve = e.calibration
    knee = calibration_knee(curve)
    starved = _host_signature(e)
    if not starved and (t.gpu_util_mean >= HOST_BOUND_UTIL_PCT or knee is None):
        return None
    keep = knee or best_in_flight(curve)
    best = max(curve, key=lambda n: curve[n])
    low, top = min(curve), max(curve)
    falling = top > best and curve[top] < curve[best] * (1 - FLAT_GAIN)
    if falling:
        shape = f"tokens/s peaked at {best} in flight ({curve[best]:,.0f}) and fell to {curve[top]:,.0f} at {top}"
    elif knee is not None:
        shape = f"tokens/s flat from {knee} in flight ({curve[knee]:,.0f} -> {curve[top]:,.0f} at {top})"
    else:
        shape = (
            f"tokens/s rose only {curve[top] / curve[low]:.1f}x ({curve[low]:,.0f} -> {curve[top]:,.0f}) for "
            f"{top // low}x the requests in flight ({low} -> {top})"
        )
    now = " (auto chose it)" if e.in_flight == keep else f" (now {e.in_flight})"
    util_line = (
        f"GPU util {t.gpu_util_mean:.0f} % mean: kernels ran under half the time while more requests "
        "in flight no longer raised throughput"
        if t.gpu_util_mean < HOST_BOUND_UTIL_PCT
        else f"GPU util {t.gpu_util_mean:.0f} % mean (a kernel was running, not how much of the GPU was used)"
    )
    return Verdict(
        kind="host-bound",
        headline=HOST_BOUND_HEADLINE,
        evidence=[f"Calibration: {shape}", *_level_lines(e), util_line, *_gpu_lines(e)[1:]],
        advice=[f"Keep in-flight requests at {keep}{now}: more only adds latency", *_host_remedies(e)],
    )


def _host_signature(e: RunEvidence) -> bool:
    """Util and power fell from the lowest to the highest calibrated level while tokens/s gained
    under half of the in-flight gain."""
    curve, levels = e.calibration or {}, e.levels or {}
    measured = sorted(n for n in curve if n in levels)
    if len(measured) < 2:
        return False
    low, top = levels[measured[0]], levels[measured[-1]]
    if None in (low.gpu_util_pct, top.gpu_util_pct, low.power_w, top.power_w):
        return False
    assert low.gpu_util_pct is not None and top.gpu_util_pct is not None  # for mypy: checked above
    assert low.power_w is not None and top.power_w is not None
    scaling = (curve[measured[-1]] / curve[measured[0]]) / (measured[-1] / measured[0])
    return (
        top.gpu_util_pct <= low.gpu_util_pct * HOST_UTIL_FALL
        and top.power_w <= low.power_w * HOST_POWER_FALL
        and scaling < HOST_SCALING_MAX
    )


def _level_lines(e: RunEvidence) -> list[str]:
    """Util, power and latency from the lowest to the highest calibrated level, where measured."""
    levels = e.levels or {}
    measured = sorted(levels)
    if len(measured) < 2:
        return []
    lo_n, hi_n = measured[0], measured[-1]
    lo, hi = levels[lo_n], levels[hi_n]
    lines = []
    if (
        lo.gpu_util_pct is not None
        and hi.gpu_util_pct is not None
        and lo.power_w is not None
        and hi.power_w is not None
    ):
        lines.append(
            f"From {lo_n} to {hi_n} in flight GPU util went {lo.gpu_util_pct:.0f} % -> {hi.gpu_util_pct:.0f} % and "
            f"power {lo.power_w:.0f} -> {hi.power_w:.0f} W: the GPU did less as more was asked of it"
        )
    if lo.latency_p50_s and hi.latency_p50_s:
        lines.append(
            f"Per-request latency (p50) {lo.latency_p50_s:.2f} s at {lo_n} in flight -> {hi.latency_p50_s:.2f} s at "
            f"{hi_n} (x{hi.latency_p50_s / lo.latency_p50_s:.0f} for x{hi_n // lo_n} the requests): requests wait "
            "their turn in the host loop"
        )
    return lines


def _host_remedies(e: RunEvidence) -> list[str]:
    """What raises a host-bound engine's ceiling, and what this run's ETA is without it."""
    if e.engine == "llama.cpp":
        remedies = [
            "This run used llama.cpp's backend sampling (GPU-side: only the sampled token comes back to the "
            "host); what is left on the host is per-sequence bookkeeping"
            if e.backend_sampling
            else "This run did not use llama.cpp's backend sampling: try backend_sampling: auto (or on) with "
            "structured_output: validate (a JSON-schema grammar keeps sampling on the CPU), so the vocabulary "
            "is sampled on the GPU and only the sampled token comes back to the host. It is experimental; on a "
            "Gemma-3-12B-shaped model on an H100 it gave 1.35x the tokens/s for 128-token answers at 64 in flight "
            "and 0.80x for 16-token answers at 16 (one batch each): compare the two runs' reports",
        ]
        if (cache := _prompt_cache_line(e)) is not None:
            remedies.append(cache)
    else:
        remedies = [  # Ollama and the embedded model have no such switch: it takes another engine
            f"{e.engine or 'This engine'} samples on the host and has no switch for it; served by llama.cpp's "
            "llama-server instead (backend: openai), backend_sampling: auto samples on the GPU (without a grammar) "
            "and returns only the sampled token to the host"
        ]
    remedies.append(
        "An engine that samples on the GPU and batches sequences in one step (vLLM, SGLang) removes the per-token "
        "host loop; a faster CPU core or a simpler output schema only raises the ceiling a little"
    )
    if e.production_rows and e.requests_per_s > 0:
        remedies.append(
            f"At this ceiling ({e.requests_per_s:.2f} req/s) the {e.production_rows:,}-row production job takes "
            f"{eta_hours(e.production_rows, e.requests_per_s):.1f} h; more requests in flight will not shorten it"
        )
    return remedies


def _prompt_cache_line(e: RunEvidence) -> str | None:
    """llama-server's host prompt cache, with what the server's own timings say of it. /props does not
    say whether the cache is on, so the figure is the evidence: requests that spend little time outside
    prompt and generation have no cache cost worth naming."""
    cache = (
        "unless llama-server already runs with --cache-ram 0 (its /props does not say), start it so: its host "
        "prompt cache (on by default) copies every idle slot's state to host "
        "memory at each new request, which a batch of distinct records never reuses; with a large model and "
        "many slots it can stall the server for minutes"
    )
    if e.server_share is None or e.outside_s is None:
        return cache[0].upper() + cache[1:]
    outside = 1 - e.server_share
    if outside < OUTSIDE_SHARE:
        return None
    queued = e.parallel_slots is not None and e.in_flight > e.parallel_slots
    return (
        f"{outside:.0%} of the requests' time ({e.outside_s:.2f} s a request) passed outside the server's prompt "
        "processing and generation (its own timings)"
        + (f", part of it queueing for its {e.parallel_slots} slots" if queued else "")
        + f": {cache}"
    )


def _calibration(e: RunEvidence) -> Verdict | None:
    if not e.calibration:
        return None
    curve = e.calibration
    knee = calibration_knee(curve)
    if knee is not None and e.in_flight >= knee:
        doubled = min(m for m in curve if m > knee)
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
    top = max(curve)
    if e.in_flight == top and len(curve) > 1 and best_in_flight(curve) == top:
        below = max(n for n in curve if n < top)
        gain = curve[top] / curve[below] - 1
        if gain >= FLAT_GAIN:
            return _rising_at_the_ceiling(e, below, gain)
    better = _better_in_flight(e)
    if better is None:
        return None
    n, gain = better
    return Verdict(
        kind="client-bound",
        headline=f"Client-bound / under-batched: raise in-flight requests to {n}",
        evidence=[f"Calibration: {n} in flight gave {gain:+.0%} tokens/s over {e.in_flight}"],
        advice=[
            f"Set in-flight requests to {n}"
            + (f" and OLLAMA_NUM_PARALLEL={n}" if e.backend == "ollama" else "")
            + (" and the server's parallel slots to at least that" if e.backend == "openai" else ""),
        ],
    )


def _rising_at_the_ceiling(e: RunEvidence, below: int, gain: float) -> Verdict:
    """The calibration's top level was its best and still gaining: the ceiling (the server's slots, or
    max_in_flight) stopped the climb, not the engine."""
    t = _t(e)
    top = e.in_flight
    knob = {
        "ollama": "OLLAMA_NUM_PARALLEL",
        "openai": "the server's parallel sequences (llama.cpp --parallel with -c to match, vLLM --max-num-seqs)",
    }.get(e.backend, "the server's parallel sequences")
    room = f", while VRAM has room ({t.vram_headroom_mib / 1024:.0f} GiB free)" if t.vram_headroom_mib else ""
    return Verdict(
        kind="client-bound",
        headline=f"Under-batched at the ceiling: tokens/s still rose {gain:+.0%} from {below} to {top} in flight, "
        "the most this run could try",
        evidence=[f"Calibration (tokens/s by level): {_curve_text(e.calibration or {})}", *_gpu_lines(e)],
        advice=[f"Raise {knob} above {top}, and max_in_flight with it{room}; in_flight: auto climbs to it"],
    )


def _curve_text(curve: dict[int, float]) -> str:
    return ", ".join(f"{n}: {curve[n]:,.0f}" for n in sorted(curve))


def _kv_slots(e: RunEvidence) -> Verdict:
    t = _t(e)
    known = e.parallel_slots is not None
    # The embedded model decodes one sequence at a time; elsewhere, when nobody said, assume the
    # operator matched in_flight to the server's slots (and say that it is assumed).
    slots = 1 if e.backend == "llamacpp" else (e.parallel_slots or e.in_flight)
    said = {"server": "the server says", "operator": "the job says"}.get(e.slots_source or "", "assumed")
    if e.backend != "llamacpp" and known and e.in_flight < slots:
        if curve := e.calibration:  # auto chose the level
            return Verdict(
                kind="client-bound",
                headline=f"Auto kept {e.in_flight} in flight of {slots} server slots",
                evidence=[f"Calibration (tokens/s by level): {_curve_text(curve)}", *_gpu_lines(e)],
                advice=[
                    "This run measured one level, the one an earlier run of this job kept (in-flight-auto.json "
                    "beside the output directory); a longer run re-probes its neighbours"
                    if len(curve) == 1
                    else f"No level up to {max(curve)} measured better; nothing to change",
                ],
            )
        return Verdict(
            kind="client-bound",
            headline=f"Client-bound: {e.in_flight} in flight but {slots} server slots are ready",
            evidence=[f"{slots} parallel slots ({said})", *_gpu_lines(e)],
            # No curve here: on a host-bound engine more in flight only adds latency, so the advice is to
            # measure, not to jump to the slot count.
            advice=[
                f"Set in_flight: auto to find the best level up to {slots} (slots already allocated: no VRAM "
                "cost); a host-bound engine gains nothing from more in flight",
            ],
        )
    num_ctx = e.num_ctx or 4096
    geometry = e.kv_geometry
    slots_line = f"{e.in_flight} request(s) in flight, {slots} slot(s) ({said})"
    per_step = "one sequence per decode step" if slots == 1 else f"{slots} sequences per decode step"
    if geometry is None:
        return Verdict(
            kind="client-bound",
            headline="Under-batched: one sequence per decode step leaves the GPU's throughput unused"
            if slots == 1
            else f"Possibly under-batched: every slot is busy ({per_step}); more may raise throughput",
            evidence=[slots_line, *_gpu_lines(e), "KV cache per slot unknown: nobody gave the model's shape"],
            advice=[
                "Measure with in_flight: auto (tokens/s at 1, 2, 4, 8 in flight) and raise the server's parallel "
                "slots while tokens/s still grows and VRAM has room",
            ],
        )
    kv = geometry.gib_per_slot(num_ctx)
    extra = slots_that_fit(t.vram_headroom_mib or 0.0, num_ctx, geometry)
    kv_line = (
        f"KV cache ~{kv:.2f} GiB per slot at num_ctx {num_ctx}"
        + ("" if e.num_ctx else " (num_ctx assumed)")
        + f" ({geometry.source}); headroom {(t.vram_headroom_mib or 0) / 1024:.1f} GiB fits {extra} more"
    )
    if extra == 0:
        return Verdict(
            kind="gpu-bound",
            headline="GPU-bound: every slot is busy and VRAM has no room for another",
            evidence=[slots_line, *_gpu_lines(e), kv_line],
            advice=[
                f"Halving num_ctx to {num_ctx // 2} would free ~"
                f"{(kv - geometry.gib_per_slot(max(1, num_ctx // 2))) * slots:.1f} GiB for more slots",
                "Confirm with a calibration run (tokens/s at 1, 2, 4, 8 in flight)",
            ],
        )
    target = slots + extra
    util_note = (
        f"NVML util {t.gpu_util_mean:.0f} % only says a kernel was running, not that the "
        f"GPU's throughput is used up: {per_step} can leave much of it idle"
        if t.gpu_util_mean is not None
        else f"{per_step[0].upper()}{per_step[1:]} can leave much of the GPU's throughput unused"
    )
    knob = {
        "ollama": f"OLLAMA_NUM_PARALLEL={target}",
        "openai": f"the server's parallel sequences to {target} (llama.cpp --parallel, vLLM --max-num-seqs)",
    }.get(e.backend, "")
    if e.backend == "llamacpp":
        advice = [
            "The embedded llama.cpp decodes one sequence at a time; serve the model with Ollama or llama.cpp's "
            f"server with {target} parallel slots and {target} requests in flight",
        ]
    else:
        advice = [
            f"Set {knob} and in-flight requests to {target}: needs ~{extra * kv:.1f} GiB more VRAM "
            f"({extra} x {kv:.2f} GiB)",
        ]
    if not known and e.backend != "llamacpp":
        advice.append(
            f"The server's slot count is not known (Ollama does not say it): {slots} assumed from in_flight; "
            "set server_slots in the job to what OLLAMA_NUM_PARALLEL is"
        )
    advice.append("Confirm with a calibration run (tokens/s at 1, 2, 4, 8 in flight)")
    return Verdict(
        kind="client-bound",
        headline="Client-bound / under-batched: raise in-flight requests and the server's parallel slots",
        evidence=[slots_line, util_note, kv_line],
        advice=advice,
    )


# --- helpers ---------------------------------------------------------------------------------


def _job_cpu_saturated(t: TelemetrySummary) -> bool:
    # The job's own CPU only: the machine's also counts other processes (a compiler, another job), which
    # the job can neither use nor change.
    return t.job_cpu_mean_pct is not None and t.job_cpu_mean_pct >= CPU_SATURATED_PCT


def _cpu_lines(t: TelemetrySummary) -> list[str]:
    """Both CPU figures, so a busy machine is not read as a busy job."""
    if t.cpu_mean_pct is None:
        return []
    if t.job_cpu_mean_pct is None:
        return [f"Host CPU {t.cpu_mean_pct:.0f} % mean (all processes; the job's own share was not recorded)"]
    return [
        f"CPU, mean over all cores: the job's process and its children {t.job_cpu_mean_pct:.0f} %, "
        f"the whole host {t.cpu_mean_pct:.0f} %"
    ]


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
    target = best_in_flight(curve)
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
