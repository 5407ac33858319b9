"""Verdict rules on recorded-looking sample series (frames -> summarize -> RunEvidence -> judge)."""

from __future__ import annotations

import math
from typing import Any

import polars as pl
import pytest

from tasks.analysis.kv import GEMMA3_12B, eta_hours, slots_that_fit
from tasks.analysis.telemetry import SCHEMA, summarize
from tasks.analysis.verdict import (
    LevelReading,
    RunEvidence,
    TelemetrySummary,
    Verdict,
    eta_scope,
    judge,
    render_markdown,
)
from tasks.inference.backends.protocol import model_geometry
from tasks.inference.calibrate import best_in_flight, calibration_knee

GIB_MIB = 1024.0
CARD_MIB = 16_376.0  # an RTX 4080 16 GB as NVML reports it


def samples(
    n: int = 60,
    *,
    util: list[float] | float | None = 97.0,
    vram_used_mib: float = 10_752.0,  # 10.5 GiB, the team's measured baseline
    power_w: float = 280.0,
    cpu_pct: float = 6.0,
    job_cpu_pct: float | None = None,
    ram_available_mib: float = 40_000.0,
    ollama: tuple[float, float] | None = None,
) -> pl.DataFrame:
    """A 1 Hz series of one GPU (or none when util is None), shaped like Sampler.frame()."""
    utils = util if isinstance(util, list) else [util] * n
    rows: list[dict[str, Any]] = []
    for i in range(n):
        row: dict[str, Any] = {
            "t": 1_000.0 + i,
            "cpu_pct": cpu_pct,
            "job_cpu_pct": job_cpu_pct,
            "cpu_per_core": [cpu_pct] * 4,
            "ram_used_mib": 64_000.0 - ram_available_mib,
            "ram_available_mib": ram_available_mib,
            "ram_total_mib": 64_000.0,
            "rss_mib": 300.0,
            "ollama_size_mib": ollama[0] if ollama else None,
            "ollama_size_vram_mib": ollama[1] if ollama else None,
        }
        if util is not None:
            row |= {
                "gpu": 0,
                "vram_used_mib": vram_used_mib,
                "vram_total_mib": CARD_MIB,
                "gpu_util_pct": utils[i],
                "mem_util_pct": 35.0,
                "power_w": power_w,
            }
        rows.append(row)
    return pl.DataFrame(rows, schema=SCHEMA, strict=False)


def evidence(frame: pl.DataFrame, **kw: Any) -> RunEvidence:
    base: dict[str, Any] = {
        "backend": "ollama",
        "in_flight": 1,
        "requests_per_s": 3.5,
        "tokens_per_s": 650.0,
        "rows_total": 170_000,
        "rows_done": 5_000,
        "num_ctx": 4096,
        "telemetry": summarize(frame, 0, 1e12),
        "kv_geometry": GEMMA3_12B,  # what Ollama's /api/show says of gemma3:12b
    }
    return RunEvidence(**(base | kw))


def test_summarize_output_is_the_evidence_contract() -> None:
    TelemetrySummary.model_validate(summarize(samples(), 0, 1e12))
    TelemetrySummary.model_validate(summarize(samples(util=None), 0, 1e12))


def test_util_100_at_one_in_flight_is_client_bound_not_gpu_bound() -> None:
    # The trap: NVML says 100 % while one sequence at a time leaves throughput unused.
    v = judge(evidence(samples(util=100.0, power_w=300.0)))
    assert v.kind == "client-bound"
    assert "parallel slots" in v.headline
    # 16,376 - 10,752 MiB = 5.5 GiB headroom, minus 0.5 GiB margin, 0.72 GiB per 4k slot -> 6 more.
    assert any("OLLAMA_NUM_PARALLEL=7" in a and "4.3 GiB" in a for a in v.advice)
    assert any("a kernel was running" in x for x in v.evidence)
    assert any("ETA 13.1 h" in x for x in v.evidence)


def test_a_busy_gpu_with_every_slot_busy_is_not_called_one_sequence_per_step() -> None:
    """8 requests on 8 slots of a llama.cpp server, which says no model shape: the verdict must not claim
    one sequence per decode step, which its own evidence contradicts."""
    busy = samples(util=97.0, power_w=600.0)
    e = evidence(busy, backend="openai", engine="llama.cpp", in_flight=8, parallel_slots=8, slots_source="server")
    v = judge(e.model_copy(update={"kv_geometry": None}))
    assert "one sequence" not in v.headline and "8 sequences per decode step" in v.headline, v.headline
    shaped = judge(evidence(busy, in_flight=8, parallel_slots=8, slots_source="operator"))
    assert not any("one sequence" in x for x in shaped.evidence), shaped.evidence
    assert any("8 sequences per decode step can leave much of it idle" in x for x in shaped.evidence)


def test_flat_calibration_is_gpu_bound() -> None:
    curve = {1: 88.0, 2: 170.0, 4: 320.0, 8: 600.0, 16: 615.0}
    v = judge(evidence(samples(util=100.0), in_flight=8, parallel_slots=8, calibration=curve))
    assert v.kind == "gpu-bound"
    assert any("8 -> 16 in flight" in x and "+2.5%" in x for x in v.evidence)


def test_calibration_still_rising_above_current_in_flight_is_client_bound() -> None:
    curve = {1: 88.0, 2: 170.0, 4: 320.0, 8: 600.0, 16: 615.0}
    v = judge(evidence(samples(util=100.0), in_flight=2, parallel_slots=2, calibration=curve))
    assert v.kind == "client-bound"
    assert "to 8" in v.headline
    assert any("OLLAMA_NUM_PARALLEL=8" in a for a in v.advice)


def test_all_slots_busy_and_no_vram_headroom_is_gpu_bound() -> None:
    v = judge(evidence(samples(util=100.0, vram_used_mib=CARD_MIB - 600), in_flight=4, parallel_slots=4))
    assert v.kind == "gpu-bound"
    assert any("fits 0 more" in x for x in v.evidence)


def test_fewer_in_flight_than_server_slots_is_client_bound() -> None:
    v = judge(evidence(samples(vram_used_mib=CARD_MIB - 600), in_flight=2, parallel_slots=4))
    assert v.kind == "client-bound"
    assert "4 server slots" in v.headline
    # No curve was measured: the advice is to measure up to the slots, not to jump to them.
    assert v.advice[0].startswith("Set in_flight: auto") and "up to 4" in v.advice[0]


def test_idle_gaps_are_client_bound_with_idle_fraction() -> None:
    util = [0.0 if i % 5 < 2 else 100.0 for i in range(60)]  # idle 40 % of samples
    v = judge(evidence(samples(util=util), in_flight=4, parallel_slots=4))
    assert v.kind == "client-bound"
    assert any("40% of samples" in x for x in v.evidence)


def test_the_model_load_before_the_first_answer_is_not_idle_gpu_time() -> None:
    """Ollama loads the model at the first request: 15 s at 0 % of a 60 s run read as "client-bound,
    idle 25 %". Each attempt's start to its first answer (both marked) is left out of util and idle."""
    from tasks.analysis.telemetry import FIRST_ANSWER, MARK_SCHEMA, warm_ups

    frame = samples(util=[0.0] * 15 + [95.0] * 45, power_w=300.0)
    loading = judge(evidence(frame, in_flight=8, parallel_slots=8))
    assert "idle" in loading.headline, loading.headline  # what the run said before
    marks = pl.DataFrame(
        [
            (1_000.0, "attempt 1 start"),
            (1_000.5, "chunk-00000 start"),
            (1_015.0, FIRST_ANSWER),  # chunk 0's first answer
            (1_030.0, FIRST_ANSWER),  # chunk 1's: not a load
            (1_059.0, "chunk-00000 end"),
        ],
        schema=MARK_SCHEMA,
        orient="row",
    )
    spans = warm_ups(marks)
    assert spans == [(1_000.0, 1_015.0)]
    steady = summarize(frame, 0, 1e12, spans)
    assert (steady["gpu_idle_fraction"], steady["gpu_util_mean"], steady["warm_up_s"]) == (0.0, 95.0, 15.0)
    assert steady["vram_peak_mib"] == 10_752.0 and steady["power_mean_w"] == 300.0  # the load counts here
    v = judge(evidence(frame, in_flight=8, parallel_slots=8, telemetry=steady))
    assert "idle" not in v.headline, v.headline
    # A second attempt loads again; one that never got an answer leaves out nothing.
    later = pl.concat(
        [
            marks,
            pl.DataFrame(
                [(2_000.0, "attempt 2 start"), (2_004.0, FIRST_ANSWER), (3_000.0, "attempt 3 start")],
                schema=MARK_SCHEMA,
                orient="row",
            ),
        ]
    )
    assert warm_ups(later) == [(1_000.0, 1_015.0), (2_000.0, 2_004.0)]
    assert summarize(frame, 0, 1e12)["warm_up_s"] is None
    idle = [0.0] * 15 + [0.0 if i % 2 else 100.0 for i in range(45)]  # idle after the load too: still said
    v = judge(evidence(frame, telemetry=summarize(samples(util=idle), 0, 1e12, spans), in_flight=4, parallel_slots=4))
    assert v.kind == "client-bound"
    said = "in 49% of samples while rows remained (the 15 s before the GPU's first work: the GPU slot, a model load; left out)"
    assert any(said in line for line in v.evidence), v.evidence


def test_long_answers_before_the_first_one_are_work_not_warm_up() -> None:
    """64 long answers came back 20 s after the start on an H100, the GPU busy all along: leaving those
    20 s out as warm-up dropped half of a 40 s run from util. A span ends at the GPU's first busy sample."""
    from tasks.analysis.telemetry import FIRST_ANSWER, MARK_SCHEMA, warm_ups

    util = [0.0] * 3 + [60.0] * 17 + [30.0, 0.0] * 10  # 3 s to start, then the first batch, then a thinner tail
    marks = pl.DataFrame([(1_000.0, "attempt 1 start"), (1_020.0, FIRST_ANSWER)], schema=MARK_SCHEMA, orient="row")
    summary = summarize(samples(len(util), util=util), 0, 1e12, warm_ups(marks))
    assert summary["warm_up_s"] == 3.0
    assert summary["gpu_util_mean"] == pytest.approx((60.0 * 17 + 30.0 * 10) / 37)
    assert summary["gpu_idle_fraction"] == pytest.approx(10 / 37)


def test_idle_gaps_with_the_job_saturating_the_cpu_are_cpu_bound() -> None:
    util = [0.0 if i % 2 else 100.0 for i in range(60)]
    v = judge(evidence(samples(util=util, cpu_pct=95.0, job_cpu_pct=90.0)))
    assert v.kind == "cpu-bound"
    assert "CPU, mean over all cores: the job's process and its children 90 %, the whole host 95 %" in v.evidence


def test_another_process_saturating_the_host_is_not_the_job_being_cpu_bound() -> None:
    """A compiler beside the run fills the host's CPU: the verdict names both figures and judges on the job's."""
    util = [0.0 if i % 2 else 100.0 for i in range(60)]
    v = judge(evidence(samples(util=util, cpu_pct=97.0, job_cpu_pct=12.0)))
    assert v.kind == "client-bound"
    assert any("the job's process and its children 12 %, the whole host 97 %" in x for x in v.evidence)
    no_gpu = judge(evidence(samples(util=None, cpu_pct=97.0, job_cpu_pct=12.0), backend="llamacpp"))
    assert no_gpu.kind == "no-gpu-data"
    # Samples from before the job's CPU was recorded: the host's figure is shown, never judged on.
    older = judge(evidence(samples(util=None, cpu_pct=97.0), backend="llamacpp"))
    assert older.kind == "no-gpu-data" and any("job's own share was not recorded" in x for x in older.evidence)


def test_spill_comes_first() -> None:
    frame = samples(util=100.0, ollama=(12 * GIB_MIB, 9 * GIB_MIB))
    v = judge(evidence(frame, errors={"timeout": 900}))  # spill explains the timeouts too
    assert v.kind == "cpu-spill"


def test_host_memory_pressure() -> None:
    v = judge(evidence(samples(ram_available_mib=1_500.0)))  # 2.3 % of 64 GB
    assert v.kind == "memory-pressure"
    assert any("2.3%" in x for x in v.evidence)


def test_backend_errors_above_threshold() -> None:
    v = judge(evidence(samples(), rows_done=200, errors={"oom": 30, "timeout": 5}))
    assert v.kind == "backend-errors"
    assert "18%" in v.headline
    assert any("Out-of-memory" in a for a in v.advice)


def test_few_errors_do_not_decide() -> None:
    v = judge(evidence(samples(util=100.0), rows_done=5_000, errors={"invalid_output": 3}))
    assert v.kind == "client-bound"


def test_no_gpu_data_says_so_and_judges_in_flight() -> None:
    v = judge(evidence(samples(util=None), backend="ollama"))
    assert v.kind == "no-gpu-data"
    assert any("No GPU telemetry" in x for x in v.evidence)
    assert any("1, 2, 4, 8" in a for a in v.advice)


def test_no_gpu_data_on_the_embedded_backend_points_at_a_gpu_server() -> None:
    v = judge(evidence(samples(util=None), backend="llamacpp"))
    assert v.kind == "no-gpu-data"
    assert any("one sequence at a time" in a and "OLLAMA_NUM_PARALLEL" in a for a in v.advice)


def test_no_gpu_data_with_calibration_uses_it() -> None:
    v = judge(evidence(samples(util=None), calibration={1: 40.0, 2: 70.0, 4: 72.0}))
    assert v.kind == "no-gpu-data"
    assert any("2 in flight" in a and "+75%" in a for a in v.advice)


def test_no_gpu_data_and_saturated_cpu_is_cpu_bound() -> None:
    v = judge(evidence(samples(util=None, cpu_pct=97.0, job_cpu_pct=96.0), backend="llamacpp"))
    assert v.kind == "cpu-bound"


def test_no_telemetry_at_all() -> None:
    v = judge(evidence(samples(), telemetry=None))
    assert v.kind == "no-gpu-data"


def test_kv_cache_estimate_matches_facts() -> None:
    assert 0.6 <= GEMMA3_12B.gib_per_slot(4096) <= 0.8
    assert 0.85 <= GEMMA3_12B.gib_per_slot(8192) <= 1.0
    assert GEMMA3_12B.gib_per_slot(1024) < GEMMA3_12B.gib_per_slot(4096)
    with pytest.raises(ValueError):
        GEMMA3_12B.gib_per_slot(0)


def test_slots_that_fit() -> None:
    assert slots_that_fit(5.5 * GIB_MIB, 4096, GEMMA3_12B) == 6
    assert slots_that_fit(0.6 * GIB_MIB, 4096, GEMMA3_12B) == 0
    assert slots_that_fit(-100.0, 4096, GEMMA3_12B) == 0


# llama-server on an H200 (Gemma 3 270M, 16 slots): tokens/s by level from one `in_flight: auto` run.
H200_AUTO_CURVE = {1: 485.5, 2: 315.4, 4: 547.7, 8: 1018.0}


def test_calibration_knee() -> None:
    assert calibration_knee({1: 100.0, 2: 180.0, 4: 300.0}) is None
    assert calibration_knee({1: 100.0, 2: 102.0, 4: 103.0}) == 1
    assert calibration_knee({1: 100.0, 4: 300.0, 8: 305.0}) == 4
    assert calibration_knee({1: 100.0, 4: 300.0, 8: 310.0}) is None  # 8 is 3.3 % up: auto keeps 8
    # A real H200 run: a low window at 2 in flight, then +117 % at 8. Still scaling: no knee at 1.
    assert calibration_knee(H200_AUTO_CURVE) is None
    assert best_in_flight(H200_AUTO_CURVE) == 8  # auto keeps best_in_flight's level (test_auto_in_flight.py)


def test_the_report_advises_the_level_auto_kept() -> None:
    e = evidence(samples(util=25.0), backend="openai", in_flight=8, parallel_slots=16, calibration=H200_AUTO_CURVE)
    v = judge(e)
    assert v.kind != "host-bound" and not any("Keep in-flight requests at 1" in a for a in v.advice), v


def test_eta_hours() -> None:
    assert eta_hours(170_000, 3.5) == pytest.approx(13.49, abs=0.01)  # the team's baseline
    assert eta_hours(0, 0.0) == 0.0
    assert math.isinf(eta_hours(10, 0.0))
    with pytest.raises(ValueError):
        eta_hours(10, -1.0)


def test_render_markdown() -> None:
    verdict = Verdict(kind="client-bound", headline="Raise in-flight", evidence=["3.5 req/s"], advice=["Set 7"])
    assert render_markdown(verdict) == [
        "### Bottleneck: `client-bound`",
        "",
        "**Raise in-flight**",
        "",
        "Evidence:",
        "- 3.5 req/s",
        "",
        "Advice:",
        "- Set 7",
        "",
    ]
    assert render_markdown(verdict.model_copy(update={"evidence": [], "advice": []})) == [
        "### Bottleneck: `client-bound`",
        "",
        "**Raise in-flight**",
        "",
    ]


# --- the verdict reads the engine -------------------------------------------------------------

# llama.cpp's llama-server (CUDA) on an H200 serving Gemma 3 270M Q4_K_M, 64 slots: tokens/s by
# requests in flight, and NVML utilisation at the best level (8 in flight: 17 %).
H200_LLAMA_SERVER_CURVE = {1: 370.0, 2: 575.0, 4: 613.0, 8: 674.0, 16: 617.0, 64: 547.0}


def test_a_falling_curve_with_the_gpu_mostly_idle_is_host_bound() -> None:
    e = evidence(
        samples(util=17.0, power_w=137.0, vram_used_mib=20_000.0),
        backend="openai",
        engine="llama.cpp",
        in_flight=8,
        parallel_slots=64,
        slots_source="server",
        calibration=H200_LLAMA_SERVER_CURVE,
        kv_geometry=None,
    )
    v = judge(e)
    assert v.kind == "host-bound"
    assert any("peaked at 8 in flight (674) and fell to 547 at 64" in x for x in v.evidence)
    assert any("GPU util 17 % mean" in x for x in v.evidence)
    assert any("Keep in-flight requests at 8" in a for a in v.advice)  # the knee: 4 -> 8 is +10 %, 8 -> 16 falls


def test_the_same_flat_curve_with_the_gpu_busy_stays_gpu_bound() -> None:
    e = evidence(samples(util=99.0), in_flight=8, parallel_slots=8, calibration={1: 88.0, 8: 600.0, 16: 610.0})
    assert judge(e).kind == "gpu-bound"


def test_unknown_slots_are_assumed_from_in_flight_not_one() -> None:
    # 4 in flight on Ollama, OLLAMA_NUM_PARALLEL unknown, VRAM for 2 more 4k slots: 6, never 3.
    v = judge(evidence(samples(util=98.0, vram_used_mib=CARD_MIB - 2300), in_flight=4))
    assert any("OLLAMA_NUM_PARALLEL=6" in a for a in v.advice), v.advice
    assert any("4 slot(s) (assumed)" in x for x in v.evidence)
    assert any("set server_slots" in a for a in v.advice)


def test_slots_the_server_says_are_used_and_named() -> None:
    e = evidence(
        samples(vram_used_mib=CARD_MIB - 2300), backend="openai", in_flight=4, parallel_slots=4, slots_source="server"
    )
    v = judge(e)
    assert any("4 slot(s) (the server says)" in x for x in v.evidence)
    assert any("llama.cpp --parallel" in a and "to 6" in a for a in v.advice)
    assert not any("server_slots" in a for a in v.advice)


def test_an_unknown_model_shape_is_said_not_guessed() -> None:
    v = judge(evidence(samples(util=100.0), in_flight=1, kv_geometry=None))
    assert v.kind == "client-bound" and any("KV cache per slot unknown" in x for x in v.evidence)
    assert not any("GiB per slot" in x for x in v.evidence)


def test_geometry_from_gguf_metadata_sizes_the_kv_cache() -> None:
    from tasks.analysis.report import kv_geometry

    meta = {
        "general.architecture": "gemma3",
        "gemma3.block_count": 48,
        "gemma3.attention.head_count": 16,
        "gemma3.attention.head_count_kv": 8,
        "gemma3.attention.key_length": 256,
        "gemma3.attention.sliding_window": 1024,
    }
    geometry = kv_geometry(model_geometry(meta))
    assert geometry is not None
    assert geometry.gib_per_slot(4096) == pytest.approx(GEMMA3_12B.gib_per_slot(4096))
    llama = {
        "general.architecture": "llama",
        "llama.block_count": 32,
        "llama.attention.head_count": 32,
        "llama.attention.head_count_kv": 8,
        "llama.embedding_length": 4096,
    }
    plain = kv_geometry(model_geometry(llama))
    assert plain is not None and plain.gib_per_slot(4096) == pytest.approx(32 * 4096 * 2 * 8 * 128 * 2 / 1024**3)
    assert model_geometry({"general.architecture": "x"}) is None


def test_error_rows_are_split_by_cause_and_only_engine_faults_decide() -> None:
    # The demo's case: schema-invalid answers and one empty field are not the backend's fault.
    e = evidence(samples(util=None), backend="llamacpp", rows_done=24, errors={"invalid_output": 2, "empty_field": 1})
    v = judge(e)
    assert v.kind == "no-gpu-data"
    causes = {f.cause: f for f in v.findings}
    assert set(causes) == {"model-output", "input-data"}
    assert causes["model-output"].headline.startswith("2 of 24 rows (8.3%): invalid_output: 2")
    assert any("output schema" in a for a in causes["model-output"].advice)
    assert any("empty template field" in a for a in causes["input-data"].advice)
    faults = judge(evidence(samples(), rows_done=100, errors={"timeout": 10, "invalid_output": 50}))
    assert faults.kind == "backend-errors" and "10%" in faults.headline
    assert {f.cause for f in faults.findings} == {"engine", "model-output"}
    assert "Error rows by cause:" in render_markdown(faults)


def test_a_cpu_run_says_what_its_eta_is_for() -> None:
    cpu = evidence(samples(util=None), backend="llamacpp")
    assert "embedded model on this machine (no GPU seen)" in (eta_scope(cpu) or "")
    assert eta_scope(evidence(samples(), backend="ollama")) is None


# Gemma 3 12B's exact shape on llama.cpp's server (CUDA), an H100, 64 slots, 128-token answers: generated
# tokens/s, NVML util, power and p50 latency by requests in flight, recorded 12 s per level.
H100_LONG_CURVE = {1: 91.0, 2: 154.0, 4: 188.0, 8: 190.0, 16: 243.0, 32: 316.0, 64: 210.0}
H100_LONG_LEVELS = {
    n: LevelReading(gpu_util_pct=u, power_w=w, latency_p50_s=lat)
    for n, u, w, lat in zip(
        H100_LONG_CURVE,
        (65.0, 60.0, 49.0, 37.0, 25.0, 20.0, 15.0),
        (349.0, 340.0, 300.0, 260.0, 187.0, 171.0, 159.0),
        (1.37, 1.66, 2.70, 5.71, 8.38, 12.9, 39.0),
        strict=True,
    )
}


def h100_long(frame: pl.DataFrame | None = None, **kw: Any) -> RunEvidence:
    # Util over the whole run sat near the busy levels' (auto ran at 32: 20 %), power 171 W.
    base: dict[str, Any] = {
        "backend": "openai",
        "engine": "llama.cpp",
        "in_flight": 32,
        "parallel_slots": 64,
        "slots_source": "server",
        "calibration": H100_LONG_CURVE,
        "levels": H100_LONG_LEVELS,
        "requests_per_s": 2.47,
        "tokens_per_s": 316.0,
        "production_rows": 170_000,
        "kv_geometry": None,
    }
    return evidence(
        frame if frame is not None else samples(util=20.0, power_w=171.0, vram_used_mib=33_000.0), **(base | kw)
    )


def test_the_h100_long_answer_curve_names_the_host_loop_with_its_evidence_and_remedies() -> None:
    v = judge(h100_long(backend_sampling=False))
    assert v.kind == "host-bound", v
    assert any("peaked at 32 in flight (316) and fell to 210 at 64" in x for x in v.evidence)
    assert any("GPU util went 65 % -> 15 % and power 349 -> 159 W" in x for x in v.evidence), v.evidence
    assert any("1.37 s at 1 in flight -> 39.00 s at 64 (x28 for x64 the requests)" in x for x in v.evidence)
    assert any("Keep in-flight requests at 32 (auto chose it)" in a for a in v.advice)
    assert any("did not use llama.cpp's backend sampling" in a and "structured_output: validate" in a for a in v.advice)
    assert any("vLLM, SGLang" in a for a in v.advice)
    assert any("--cache-ram 0" in a for a in v.advice)  # llama-server's host prompt cache
    assert any("170,000-row production job takes 19.1 h" in a for a in v.advice), v.advice
    used = judge(h100_long(backend_sampling=True))
    assert any("This run used llama.cpp's backend sampling" in a for a in used.advice)
    ollama = judge(h100_long(backend_sampling=False, engine="ollama"))
    assert ollama.kind == "host-bound" and not any("--cache-ram" in a for a in ollama.advice), ollama.advice
    # Ollama has no backend-sampling switch: the advice says it takes another engine, not a setting of this one.
    assert any(a.startswith("ollama samples on the host and has no switch for it") for a in ollama.advice)


def test_the_prompt_cache_advice_follows_the_servers_own_timings() -> None:
    """Unmeasured, --cache-ram 0 is advice; the share of request time outside the server's prompt and
    generation makes it a finding with its figure, or drops it when that share is small."""

    def cache_advice(**kw: Any) -> list[str]:
        return [a for a in judge(h100_long(backend_sampling=False, **kw)).advice if "--cache-ram 0" in a]

    assert cache_advice()[0].startswith("Unless llama-server already runs with --cache-ram 0")
    # The H100 at 1 in flight: 0.63 s a request, 0.27 s of it prompt and generation by the server's timings.
    [measured] = cache_advice(server_share=0.43, outside_s=0.36)
    assert measured.startswith("57% of the requests' time (0.36 s a request) passed outside"), measured
    assert "queueing" not in measured
    assert cache_advice(server_share=0.95, outside_s=0.02) == []
    [queued] = cache_advice(server_share=0.43, outside_s=0.36, in_flight=96)
    assert "part of it queueing for its 64 slots" in queued, queued


def test_util_and_power_falling_with_small_gains_is_host_bound_even_with_a_busy_mean() -> None:
    # Still rising at the top level (no knee) and util above half on average, but 64x the requests gave
    # 4.4x the tokens while util and power fell: the GPU doing less as more is asked is the tell.
    v = judge(h100_long(samples(util=60.0, power_w=300.0), calibration={1: 91.0, 2: 154.0, 64: 400.0}, in_flight=64))
    assert v.kind == "host-bound", v
    assert any("rose only 4.4x (91 -> 400) for 64x the requests in flight (1 -> 64)" in x for x in v.evidence)
    assert any("Keep in-flight requests at 64 (auto chose it)" in a for a in v.advice)


def test_a_gpu_that_works_harder_with_more_in_flight_is_not_host_bound() -> None:
    # The H100 roofline (FACTS-like numbers): tokens/s 62x over 64x the requests, util 100 %, power rising.
    levels = {
        1: LevelReading(gpu_util_pct=100.0, power_w=427.0, latency_p50_s=0.6),
        64: LevelReading(gpu_util_pct=100.0, power_w=633.0, latency_p50_s=0.62),
    }
    e = h100_long(samples(util=100.0, power_w=600.0), calibration={1: 111.0, 64: 6936.0}, levels=levels, in_flight=64)
    assert judge(e).kind != "host-bound"


def test_a_run_that_moved_its_level_gives_the_verdict_util_power_and_latency_per_level() -> None:
    from tasks.analysis.report import level_readings
    from tasks.inference.runner import level_windows
    from tasks.schema import ChunkStats

    # 'auto' held 1 in flight for 10 s, then 8 for 10 s, then 1 again for 5 s; answers came back throughout.
    # Each answer counts for the level its request went out at: the 7 s one went out under 8 and came
    # back after the level fell to 1, and judges 8, not 1.
    changes = [(1_000.0, 1), (1_010.0, 8), (1_020.0, 1)]
    sent_at = [1, 1, 8, 8, 8, 1]
    latencies = [1_000.0, 1_200.0, 5_000.0, 6_000.0, 7_000.0, 1_100.0]
    levels = level_windows(changes, 1_025.0, sent_at, latencies)
    assert levels == {
        1: {"windows": [[1_000.0, 1_010.0], [1_020.0, 1_025.0]], "latency_p50_ms": 1_100.0},
        8: {"windows": [[1_010.0, 1_020.0]], "latency_p50_ms": 6_000.0},
    }
    assert level_windows([(1_000.0, 4)], 1_010.0, [4], [900.0]) is None  # one level: nothing to compare
    # The GPU worked less at 8 in flight than at 1: util 60 -> 20 %, power 340 -> 170 W.
    frame = samples(25, util=[60.0] * 10 + [20.0] * 10 + [60.0] * 5, power_w=340.0)
    frame = frame.with_columns(pl.when(pl.col("gpu_util_pct") == 20.0).then(170.0).otherwise(340.0).alias("power_w"))
    stats = [ChunkStats(index=0, rows=10, levels=levels)]
    readings = level_readings(stats, frame)
    assert readings is not None
    assert (readings[1].gpu_util_pct, readings[1].power_w, readings[1].latency_p50_s) == (60.0, 340.0, 1.1)
    assert (readings[8].gpu_util_pct, readings[8].power_w, readings[8].latency_p50_s) == (20.0, 170.0, 6.0)


def test_rates_count_endpoints_side_by_side_once_and_one_after_the_other_in_turn() -> None:
    """The rate the ETA is built on: rows over the seconds in which any chunk was sending."""
    from tasks.analysis.report import sending_s
    from tasks.schema import ChunkStats

    def chunk(index: int, endpoint: str, start: float, end: float) -> ChunkStats:
        return ChunkStats(index=index, rows=100, sent_rows=100, endpoint=endpoint, started_at=start, finished_at=end)

    side_by_side = [chunk(0, "a", 0.0, 10.0), chunk(1, "b", 0.0, 10.0), chunk(2, "a", 10.0, 20.0)]
    assert sending_s(side_by_side) == 20.0  # 300 rows in 20 s: 15 rows/s, both endpoints' rates added
    # Endpoint a ran chunks 0-1, failed; the next attempt ran 2-3 on b: 400 rows in 40 s, not twice that rate.
    in_turn = [chunk(0, "a", 0, 10), chunk(1, "a", 10, 20), chunk(2, "b", 50, 60), chunk(3, "b", 60, 70)]
    assert sending_s(in_turn) == 40.0
    assert sending_s([ChunkStats(index=0, rows=5)]) == 0.0  # nothing sent: no time


def test_gpus_setting_keeps_another_cards_idle_time_out_of_the_verdict() -> None:
    """Two GPUs: the job's (0) at 95 %, another one idle. Averaged over both, the verdict read half the
    samples as idle and called the run client-bound; `gpus: [0]` reads the job's card only."""
    from tasks.analysis.report import gpus_label
    from tasks.analysis.telemetry import energy_wh, of_gpus

    ours = samples(util=95.0, power_w=300.0)
    other = samples(util=0.0, power_w=60.0).with_columns(pl.lit(1, dtype=pl.Int32).alias("gpu"))
    both = pl.concat([ours, other])
    mixed = judge(evidence(both, in_flight=8, parallel_slots=8, slots_source="operator"))
    assert "idle" in mixed.headline.lower(), mixed.headline  # what the operator saw
    job = summarize(of_gpus(both, [0]), 0, 1e12)
    assert job["gpu_util_mean"] == 95.0 and job["gpu_idle_fraction"] == 0.0
    assert "idle" not in judge(evidence(of_gpus(both, [0]), in_flight=8, parallel_slots=8)).headline.lower()
    assert energy_wh(of_gpus(both, [0])) == pytest.approx(300.0 * 59 / 3600)  # 60 samples, 59 one-second steps
    assert of_gpus(both, None).height == both.height
    assert (gpus_label(None), gpus_label([0]), gpus_label([0, 2])) == (
        "all GPUs NVML sees",
        "GPU 0 (gpus)",
        "GPUs 0, 2 (gpus)",
    )


def test_an_idle_gpu_while_the_server_holds_the_requests_is_host_bound_not_client_bound() -> None:
    """The H100 sitting, Gemma 3 12B's shape, 16 in flight on 64 slots: GPU idle 37 % of samples, yet the
    requests spent 89 % of their time inside the server's own prompt and generation. The client kept it
    fed (the job's CPU 0 %); the server's host side left the GPU waiting."""
    util = [5.0 if i % 8 < 3 else 70.0 for i in range(60)]  # idle 3 samples in 8
    frame = samples(util=util, power_w=235.0, cpu_pct=7.0, job_cpu_pct=0.4, vram_used_mib=33_155.0)
    held = {"in_flight": 16, "parallel_slots": 64, "engine": "llama.cpp", "backend": "openai", "occupancy": 0.98}
    v = judge(evidence(frame, **held, server_share=0.89, outside_s=0.51))
    assert v.kind == "host-bound", v.headline
    said = "the client kept 98% of its 16 requests out on 64 slots, and they spent 89% of their time inside"
    assert any(said in line for line in v.evidence), v.evidence
    assert any("backend_sampling" in advice for advice in v.advice)
    # The idle GPU is the client's: without the server's timings; with the requests queueing for its slots;
    # with gaps between the client's requests (occupancy); at 1 in flight (Ollama, a small model: 0.2 s in
    # the server of a 0.21 s request, then 0.1 s before the next).
    assert judge(evidence(frame, **held)).kind == "client-bound"
    timed = {"server_share": 0.89, "outside_s": 0.51}
    assert judge(evidence(frame, **held | {"in_flight": 96}, **timed)).kind == "client-bound"
    assert judge(evidence(frame, **held | {"occupancy": 0.6}, **timed)).kind == "client-bound"
    ollama = {"in_flight": 1, "engine": "ollama", "backend": "ollama", "occupancy": 0.68}
    assert judge(evidence(frame, **ollama, server_share=0.95, outside_s=0.01)).kind == "client-bound"


def test_occupancy_is_littles_law_over_the_level() -> None:
    from tasks.analysis.report import occupancy
    from tasks.schema import ChunkStats

    # The H100 fixed-16 run: 3.34 requests/s, median latency 4.71 s, 16 in flight: 98 % of them out.
    ran = [ChunkStats(index=i, rows=60, latency_p50_ms=ms, in_flight=16) for i, ms in enumerate([4_650.0, 4_713.0])]
    assert occupancy(ran, 3.34) == pytest.approx(0.984, abs=0.001)
    assert occupancy([ChunkStats(index=0, rows=1)], 3.34) is None  # no latency: unknown
    assert occupancy([], 0.0) is None
    # The H100 auto run: 3.47 requests/s, median 8.3 s (probes at 32 lengthened them), kept 16: at most 1.
    assert occupancy([ChunkStats(index=0, rows=60, latency_p50_ms=8_312.0, in_flight=16)], 3.47) == 1.0


def test_auto_runs_get_advice_from_their_own_curve() -> None:
    """The H100 sitting of 2026-12-06c (Gemma 3 12B's shape, llama-server, 64 slots): the verdicts of auto
    runs told the operator to measure with in_flight: auto, or to raise in-flight to the slots."""
    frame = samples(util=45.0, power_w=280.0)
    server = {"engine": "llama.cpp", "backend": "openai", "parallel_slots": 64, "slots_source": "server"}
    # Long answers: 16 -> 32 -> 64 still rising when the slots stopped the climb.
    v = judge(evidence(frame, **server, in_flight=64, calibration={16: 178.6, 32: 235.4, 64: 392.1}))
    assert v.headline.startswith("Under-batched at the ceiling: tokens/s still rose +67% from 32 to 64"), v.headline
    assert "above 64" in v.advice[0] and "--parallel" in v.advice[0] and "(5 GiB free)" in v.advice[0]
    # Short answers, a remembered start: one level measured, 16 of 64 slots.
    v = judge(evidence(frame, **server, in_flight=16, calibration={16: 60.5}))
    assert v.headline == "Auto kept 16 in flight of 64 server slots"
    assert "an earlier run of this job kept (in-flight-auto.json" in v.advice[0]
    # Short answers, a fresh search that peaked at 16, the GPU idle between the host's steps.
    idle = samples(util=[5.0 if i % 8 < 3 else 70.0 for i in range(60)])
    curve = {8: 63.3, 16: 67.5, 32: 62.5}
    v = judge(evidence(idle, **server, in_flight=16, calibration=curve, server_share=0.93, occupancy=0.99))
    assert v.kind == "host-bound"
    assert v.advice[0].startswith("Auto measured 8: 63, 16: 68, 32: 62 tokens/s by level and kept 16"), v.advice
    # A fixed run below the slots has no curve: it is told to measure.
    assert judge(evidence(frame, **server, in_flight=16)).advice[0].startswith("Set in_flight: auto")
