"""Charts of a run's telemetry: a PNG timeline and one-line text sparklines (no Prefect here)."""

from __future__ import annotations

import io
from typing import cast

import polars as pl

_SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 60, top: float | None = None) -> str:
    """A one-line text chart: `width` buckets of the series, scaled to `top` (or its max)."""
    if not values:
        return ""
    size = max(1, len(values) // width + (len(values) % width > 0))
    buckets = [sum(values[i : i + size]) / len(values[i : i + size]) for i in range(0, len(values), size)]
    top = top or max(buckets) or 1.0
    return "".join(_SPARKS[min(len(_SPARKS) - 1, int(v / top * (len(_SPARKS) - 1) + 0.5))] for v in buckets)


def timeline_png(samples: pl.DataFrame, marks: pl.DataFrame) -> bytes | None:
    """VRAM, GPU utilisation/power and host CPU over the run, chunk starts as dotted lines."""
    if samples.height < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on a worker
    import matplotlib.pyplot as plt

    t0 = samples["t"].min()
    gpu = samples.filter(pl.col("vram_used_mib").is_not_null())
    host = samples.unique(subset="t", keep="first").sort("t")
    panels = 3 if gpu.height else 1
    fig, axes = plt.subplots(panels, 1, figsize=(9, 2.2 * panels), sharex=True, squeeze=False)
    axes = axes[:, 0]
    minutes = lambda frame: ((frame["t"] - t0) / 60).to_list()  # noqa: E731
    if gpu.height:
        for index, per_gpu in gpu.sort("t").group_by("gpu", maintain_order=True):
            axes[0].plot(minutes(per_gpu), (per_gpu["vram_used_mib"] / 1024).to_list(), label=f"GPU {index[0]} used")
            axes[0].axhline(
                cast(float, per_gpu["vram_total_mib"].max()) / 1024, color="red", lw=0.8, ls="--", label="total"
            )
            axes[1].plot(minutes(per_gpu), per_gpu["gpu_util_pct"].to_list(), label="util % (a kernel ran)")
            axes[1].plot(minutes(per_gpu), per_gpu["mem_util_pct"].to_list(), label="memory-bandwidth util %")
            twin = axes[1].twinx()
            twin.plot(minutes(per_gpu), per_gpu["power_w"].to_list(), color="gray", lw=0.8, label="power W")
            twin.set_ylabel("power W")
            twin.legend(loc="lower right", fontsize=7)
        axes[0].set_ylabel("VRAM GiB")
        axes[0].legend(loc="lower right", fontsize=7)
        axes[1].set_ylabel("%")
        axes[1].set_ylim(0, 105)
        axes[1].legend(loc="lower left", fontsize=7)
    axes[-1].plot(minutes(host), host["cpu_pct"].to_list(), color="green", label="host CPU %")
    axes[-1].set_ylabel("CPU %")
    axes[-1].set_ylim(0, 105)
    axes[-1].set_xlabel("minutes since start")
    axes[-1].legend(loc="lower left", fontsize=7)
    starts = marks.filter(pl.col("label").str.ends_with(" start"))
    for t, label in starts.iter_rows():
        for ax in axes:
            ax.axvline((t - t0) / 60, color="black", lw=0.5, ls=":")
        if starts.height <= 12:  # beyond that labels would overlap; the lines still show
            axes[0].annotate(
                label.removesuffix(" start"),
                ((t - t0) / 60, 1.0),
                xycoords=("data", "axes fraction"),
                fontsize=6,
                rotation=30,
                va="bottom",
            )
    title = "GPU and host over the run" if gpu.height else "Host over the run (no GPU data)"
    axes[0].set_title(f"{title} (dotted lines: chunk starts)", pad=30 if starts.height <= 12 else 6)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    plt.close(fig)
    return buffer.getvalue()
