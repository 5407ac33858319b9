"""`python -m bench.benchmark --compare OLD NEW`: every figure of two result files side by side, and new ÷ old."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def flatten(obj: Any, prefix: str = "") -> dict[str, float]:
    """Every number of a result as "section.key.0.key": float; booleans and text are not figures."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in flatten(val, f"{prefix}{key}.").items()}
    if isinstance(obj, list):
        return {k: v for i, val in enumerate(obj) for k, v in flatten(val, f"{prefix}{i}.").items()}
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return {prefix.rstrip("."): float(obj)}
    return {}


def compare(old_path: Path, new_path: Path) -> None:
    """Side by side: every figure of two result files, and new ÷ old."""
    old, new = (flatten(json.loads(p.read_text())) for p in (old_path, new_path))
    width = max(len(k) for k in old.keys() | new.keys())
    print(f"{'figure':<{width}}  {'old':>12}  {'new':>12}  new/old")
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        ratio = f"{b / a:.3f}" if a and b is not None else ""
        print(f"{key:<{width}}  {'' if a is None else f'{a:12.4g}'}  {'' if b is None else f'{b:12.4g}'}  {ratio}")
