"""KV-cache arithmetic (how many more slots fit in the VRAM left) and the ETA of the production job."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

VRAM_MARGIN_GIB = 0.5  # room left for compute buffers and fragmentation when adding KV slots


class KvGeometry(BaseModel):
    """What sizes one sequence's KV cache, as the engine or the GGUF file says (f16 cache assumed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: int = Field(ge=1)
    kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    sliding_window: int | None = Field(None, ge=1, description="tokens a local layer keeps; None: all global")
    global_every: int = Field(1, ge=1, description="one layer in N attends to the whole context (Gemma 3: 6)")
    source: str = Field("", description="where the numbers came from")

    def gib_per_slot(self, num_ctx: int) -> float:
        if num_ctx < 1:
            raise ValueError("num_ctx must be >= 1")
        per_token_layer = 2 * self.kv_heads * self.head_dim * 2  # K and V, f16
        if self.sliding_window is None or self.global_every == 1:
            tokens = self.layers * num_ctx
        else:
            global_layers = self.layers // self.global_every
            # llama.cpp sizes a sliding-window layer's cache as window + one ubatch (512).
            window = min(num_ctx, self.sliding_window + 512)
            tokens = global_layers * num_ctx + (self.layers - global_layers) * window
        return tokens * per_token_layer / 1024**3


# Gemma 3 12B as its GGUF describes it: 48 layers, 8 KV heads x 256, a 1024-token window on 5 of
# every 6 layers. ~0.72 GiB a slot at 4k, ~0.97 GiB at 8k.
# One layer in N attends to the whole context; the others keep a sliding window (llama.cpp's
# per-architecture pattern, which GGUF metadata does not carry).
GLOBAL_EVERY = {"gemma3": 6, "gemma2": 2, "cohere2": 4}

GEMMA3_12B = KvGeometry(
    layers=48, kv_heads=8, head_dim=256, sliding_window=1024, global_every=GLOBAL_EVERY["gemma3"], source="gemma3:12b"
)


def slots_that_fit(headroom_mib: float, num_ctx: int, geometry: KvGeometry) -> int:
    """How many more KV slots fit in the measured VRAM headroom, keeping a safety margin."""
    usable = headroom_mib / 1024 - VRAM_MARGIN_GIB
    return max(0, math.floor(usable / geometry.gib_per_slot(num_ctx)))


def eta_hours(rows_total: int, rows_per_s: float) -> float:
    """Hours to process `rows_total` rows at `rows_per_s` (inf when nothing moves)."""
    if rows_total < 0 or rows_per_s < 0:
        raise ValueError("rows_total and rows_per_s must be >= 0")
    if rows_total == 0:
        return 0.0
    return math.inf if rows_per_s == 0 else rows_total / rows_per_s / 3600
