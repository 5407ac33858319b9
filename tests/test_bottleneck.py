"""Verdict rules on recorded-looking sample series (frames -> summarize -> RunEvidence -> judge)."""

from __future__ import annotations

import math
from typing import Any

import polars as pl
import pytest

from tasks.bottleneck import (
    RunEvidence,
    TelemetrySummary,
    Verdict,
    calibration_knee,
    eta_hours,
    judge,
    kv_cache_gib_per_slot,
    render_markdown,
    slots_that_fit,
)
from tasks.telemetry import SCHEMA, summarize

GIB_MIB = 1024.0
CARD_MIB = 16_376.0  # an RTX 4080 16 GB as NVML reports it


def samples(
    n: int = 60,
    *,
    util: list[float] | float | None = 97.0,
    vram_used_mib: float = 10_752.0,  # 10.5 GiB, the team's measured baseline
    power_w: float = 280.0,
    cpu_pct: float = 6.0,
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
    }
    return RunEvidence(**(base | kw))


def test_summarize_output_is_the_evidence_contract() -> None:
    TelemetrySummary.model_validate(summarize(samples(), 0, 1e12))
    TelemetrySummary.model_validate(summarize(samples(util=None), 0, 1e12))


def test_util_100_at_one_in_flight_is_client_bound_not_gpu_bound() -> None:
    # The trap: NVML says 100 % while one sequence at a time leaves throughput unused.
    v = judge(evidence(samples(util=100.0, power_w=300.0)))
    assert v.kind == "client-bound"
    assert "OLLAMA_NUM_PARALLEL" in v.headline
    # 16,376 - 10,752 MiB = 5.5 GiB headroom, minus 0.5 GiB margin, 0.72 GiB per 4k slot -> 6 more.
    assert any("OLLAMA_NUM_PARALLEL=7" in a and "4.3 GiB" in a for a in v.advice)
    assert any("a kernel was running" in x for x in v.evidence)
    assert any("ETA 13.1 h" in x for x in v.evidence)


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


def test_idle_gaps_are_client_bound_with_idle_fraction() -> None:
    util = [0.0 if i % 5 < 2 else 100.0 for i in range(60)]  # idle 40 % of samples
    v = judge(evidence(samples(util=util), in_flight=4, parallel_slots=4))
    assert v.kind == "client-bound"
    assert any("40% of samples" in x for x in v.evidence)


def test_idle_gaps_with_saturated_host_cpu_are_cpu_bound() -> None:
    util = [0.0 if i % 2 else 100.0 for i in range(60)]
    v = judge(evidence(samples(util=util, cpu_pct=95.0)))
    assert v.kind == "cpu-bound"


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
    v = judge(evidence(samples(util=None, cpu_pct=97.0), backend="llamacpp"))
    assert v.kind == "cpu-bound"


def test_no_telemetry_at_all() -> None:
    v = judge(evidence(samples(), telemetry=None))
    assert v.kind == "no-gpu-data"


def test_kv_cache_estimate_matches_facts() -> None:
    assert 0.6 <= kv_cache_gib_per_slot(4096) <= 0.8
    assert 0.85 <= kv_cache_gib_per_slot(8192) <= 1.0
    assert kv_cache_gib_per_slot(1024) < kv_cache_gib_per_slot(4096)
    with pytest.raises(ValueError):
        kv_cache_gib_per_slot(0)


def test_slots_that_fit() -> None:
    assert slots_that_fit(5.5 * GIB_MIB, 4096) == 6
    assert slots_that_fit(0.6 * GIB_MIB, 4096) == 0
    assert slots_that_fit(-100.0, 4096) == 0


def test_calibration_knee() -> None:
    assert calibration_knee({1: 100.0, 2: 180.0, 4: 300.0}) is None
    assert calibration_knee({1: 100.0, 2: 102.0, 4: 103.0}) == 1
    assert calibration_knee({1: 100.0, 4: 300.0, 8: 310.0}) == 4


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
