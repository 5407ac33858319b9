"""Check the telemetry on a real NVIDIA GPU: does what the sampler records move with the load?

Needs a CUDA GPU and PyTorch (not a project dependency; the device machine has it). Runs a
decode-shaped load — 48 layers of Gemma-3-12B-sized MLP weight matmuls, one "token" step at a
time — at 1 and then 64 sequences per step, with idle phases around it, while `Sampler` records.
Prints JSON per phase (VRAM, util, power, tokens/s), the bottleneck verdict for the batch-1 phase,
and writes the timeline chart:

    python bench/gpu_telemetry_check.py --out /tmp/gpu-check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tasks.analysis.charts import timeline_png  # noqa: E402
from tasks.analysis.telemetry import Sampler, summarize  # noqa: E402
from tasks.analysis.verdict import RunEvidence, TelemetrySummary, judge  # noqa: E402
from tasks.storage.files import write_parquet_atomic  # noqa: E402

HIDDEN, FFN, LAYERS = 3840, 15360, 48  # Gemma 3 12B's MLP shape


def decode_phase(weights: list[torch.Tensor], batch: int, seconds: float) -> float:
    """Run decode steps for `seconds`; return tokens/s (batch x steps/s)."""
    x = torch.randn(batch, HIDDEN, device="cuda", dtype=torch.bfloat16)
    steps = 0
    torch.cuda.synchronize()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for layer in range(LAYERS):
            up, gate, down = weights[3 * layer : 3 * layer + 3]
            x = ((x @ up) * torch.nn.functional.gelu(x @ gate)) @ down
            x = x / (x.norm(dim=-1, keepdim=True) + 1)  # keep values finite
        steps += 1
        if steps % 10 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=12.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    sampler = Sampler(interval_s=0.25)
    sampler.start()
    phases: dict[str, tuple[float, float]] = {}
    rates: dict[int, float] = {}

    def phase(name: str, fn) -> None:  # type: ignore[no-untyped-def]
        sampler.mark(f"{name} start")
        t0 = time.time()
        fn()
        phases[name] = (t0, time.time())

    phase("idle-before", lambda: time.sleep(4))
    weights: list[torch.Tensor] = []

    def load() -> None:
        for _ in range(LAYERS):
            weights.extend(
                [
                    torch.randn(HIDDEN, FFN, device="cuda", dtype=torch.bfloat16) * 0.02,
                    torch.randn(HIDDEN, FFN, device="cuda", dtype=torch.bfloat16) * 0.02,
                    torch.randn(FFN, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02,
                ]
            )
        torch.cuda.synchronize()
        time.sleep(2)

    phase("weights-loaded", load)
    for batch in (1, 64):
        phase(f"decode-batch-{batch}", lambda b=batch: rates.__setitem__(b, decode_phase(weights, b, args.seconds)))
    weights.clear()
    torch.cuda.empty_cache()
    phase("idle-after", lambda: time.sleep(4))
    sampler.stop()

    frame = sampler.frame()
    write_parquet_atomic(frame, args.out / "samples.parquet")
    chart = timeline_png(frame, sampler.marks())
    if chart:
        (args.out / "timeline.png").write_bytes(chart)
    report: dict[str, object] = {"gpu": torch.cuda.get_device_name(), "sampler_cpu_ms_per_sample": None}
    if sampler.cpu_seconds_per_sample is not None:
        report["sampler_cpu_ms_per_sample"] = round(sampler.cpu_seconds_per_sample * 1000, 3)
    for name, (t0, t1) in phases.items():
        summary = summarize(frame, t0, t1)
        batch = int(name.rsplit("-", 1)[1]) if name.startswith("decode") else None
        report[name] = {
            "tokens_per_s": None if batch is None else round(rates[batch], 1),
            **{k: (round(v, 1) if isinstance(v, float) else v) for k, v in summary.items()},
        }
    # What the verdict says about the batch-1 phase, given the measured curve (NVML's 100 % at batch 1).
    b1 = phases["decode-batch-1"]
    verdict = judge(
        RunEvidence(
            backend="ollama",
            in_flight=1,
            requests_per_s=0.0,
            tokens_per_s=rates[1],
            rows_total=0,
            telemetry=TelemetrySummary(**summarize(frame, *b1)),
            calibration={1: rates[1], 64: rates[64]},
        )
    )
    report["verdict_batch_1"] = verdict.model_dump()
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
