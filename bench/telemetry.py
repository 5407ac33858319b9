"""Telemetry: the CPU the run's telemetry Sampler costs per sample (budget: < 1 % of a core at the 1 s default).

Baseline, same process and moment: the psutil reads each sample makes, alone in a loop (`sampler_over_bare`).
"""

from __future__ import annotations

import time
from typing import Any

import psutil

from bench.common import r


def bench_telemetry(samples: int = 200) -> dict[str, Any]:
    """The run's telemetry Sampler: CPU per sample, against the bare psutil reads each sample makes."""
    from tasks.analysis.telemetry import Sampler

    sampler = Sampler(interval_s=0.005, gpu_source=None)  # host fields only, as the bare loop reads
    sampler.start()
    deadline = time.monotonic() + 60
    while sampler.samples < samples and time.monotonic() < deadline:
        time.sleep(0.01)
    sampler.stop()
    per_sample = sampler.cpu_seconds_per_sample or 0.0
    # Baseline, same machine, same moment: the psutil calls alone, no rows, no frames.
    proc, began = psutil.Process(), time.thread_time()
    for _ in range(samples):
        psutil.cpu_times(percpu=True), psutil.virtual_memory(), proc.memory_info(), proc.cpu_times()
    bare = (time.thread_time() - began) / samples
    return {
        "method": "Sampler at a 5 ms interval on a thread, its thread CPU per sample; bare: the same psutil reads in a loop",
        "samples": sampler.samples,
        "sampler_cpu_ms_per_sample": r(per_sample * 1000, 3),
        "bare_psutil_cpu_ms_per_sample": r(bare * 1000, 3),
        "sampler_over_bare": r(per_sample / bare, 2) if bare else None,
        # The budget: under 1 % of a core at the default 1 s interval, i.e. < 10 ms of CPU per sample.
        "target_lt_1pct_of_a_core_at_1s": per_sample < 0.010,
    }
