"""Charts of a run's telemetry: a PNG timeline and one-line text sparklines (no Prefect here)."""

from __future__ import annotations

import io
from typing import Any, cast

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


# Okabe-Ito colours: told apart with colour-blindness, readable on a light card in either UI theme.
_BLUE, _ORANGE, _GREEN, _PURPLE, _GREY, _RED = "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#555555", "#D55E00"
_STYLE: dict[str, Any] = {
    "font.size": 13,
    "axes.titlesize": 15,
    "axes.labelsize": 13,
    "legend.fontsize": 11,
    "xtick.labelsize": 12,
    "ytick.labelsize": 12,
    "axes.grid": True,
    "grid.color": "#dddddd",
    "lines.linewidth": 2.0,
    # An opaque white card: a transparent chart would put black labels on the UI's dark theme.
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "savefig.facecolor": "white",
}


def timeline_png(samples: pl.DataFrame, marks: pl.DataFrame) -> bytes | None:
    """VRAM, GPU utilisation/power and host CPU over the job, chunk starts as dotted lines.

    1200 px wide at 100 dpi, 13-15 pt text: legible at a glance in the UI and in report.md.
    """
    if samples.height < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on a worker
    import matplotlib.pyplot as plt

    t0 = samples["t"].min()
    gpu = samples.filter(pl.col("vram_used_mib").is_not_null())
    host = samples.unique(subset="t", keep="first").sort("t")
    panels = 3 if gpu.height else 1
    minutes = lambda frame: ((frame["t"] - t0) / 60).to_list()  # noqa: E731
    with plt.rc_context(_STYLE):  # type: ignore[arg-type]
        fig, axes = plt.subplots(panels, 1, figsize=(12, 1.2 + 2.8 * panels), sharex=True, squeeze=False)
        axes = axes[:, 0]
        if gpu.height:
            twin = axes[1].twinx()
            for index, per_gpu in gpu.sort("t").group_by("gpu", maintain_order=True):
                axes[0].plot(
                    minutes(per_gpu),
                    (per_gpu["vram_used_mib"] / 1024).to_list(),
                    color=_BLUE,
                    label=f"GPU {index[0]} used",
                )
                axes[0].axhline(
                    cast(float, per_gpu["vram_total_mib"].max()) / 1024, color=_RED, lw=1.5, ls="--", label="total"
                )
                axes[1].plot(
                    minutes(per_gpu), per_gpu["gpu_util_pct"].to_list(), color=_ORANGE, label="util % (a kernel ran)"
                )
                axes[1].plot(
                    minutes(per_gpu), per_gpu["mem_util_pct"].to_list(), color=_PURPLE, label="memory-bandwidth util %"
                )
                twin.plot(minutes(per_gpu), per_gpu["power_w"].to_list(), color=_GREY, lw=1.2, label="power W")
            twin.set_ylabel("power W")
            twin.grid(False)
            twin.legend(loc="upper right")
            axes[0].set_ylabel("VRAM GiB")
            axes[0].set_ylim(bottom=0)
            axes[0].legend(loc="lower right")
            axes[1].set_ylabel("%")
            axes[1].set_ylim(0, 105)
            axes[1].legend(loc="upper left")
        axes[-1].plot(minutes(host), host["cpu_pct"].to_list(), color=_GREEN, label="host CPU %")
        axes[-1].set_ylabel("CPU %")
        axes[-1].set_ylim(0, 105)
        axes[-1].set_xlabel("minutes since the job started")
        axes[-1].legend(loc="lower left")
        starts = marks.filter(pl.col("label").str.ends_with(" start"))
        for t, label in starts.iter_rows():
            attempt = label.startswith("attempt")
            for ax in axes:
                ax.axvline((t - t0) / 60, color=_RED if attempt else _GREY, lw=1.5 if attempt else 0.8, ls=":")
            name = label.removesuffix(" start")
            if attempt:
                # An attempt starts where its first chunk does: its label sits a row above the chunk labels,
                # so the two never share a place at the same x (and no data is hidden under it).
                axes[0].annotate(
                    name,
                    ((t - t0) / 60, 1.0),
                    xycoords=("data", "axes fraction"),
                    xytext=(0, 32),
                    textcoords="offset points",
                    fontsize=10,
                    color=_RED,
                    va="bottom",
                )
            elif starts.height <= 12:  # beyond that chunk labels would overlap; the lines still show
                axes[0].annotate(
                    f"chunk {int(name[6:])}" if name.startswith("chunk-") else name,
                    ((t - t0) / 60, 1.0),
                    xycoords=("data", "axes fraction"),
                    fontsize=10,
                    rotation=30,
                    va="bottom",
                )
        title = "GPU and host over the job" if gpu.height else "Host over the job (no GPU data)"
        axes[0].set_title(f"{title} (dotted lines: chunk and attempt starts)", pad=66 if starts.height else 8)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
    return buffer.getvalue()
