"""What llama-server's main loop did, window by window, read from its log (the default verbosity):

    python -m bench.gpu.server_log /tmp/gpu-bench/server.log [--window 20]

Per window: requests started (`launch_slot_`), requests released, answered or cancelled (`release`),
host prompt cache evictions (`making room for prompt cache entry`: each makes room for a slot's state
copied into host memory), and the median time from a slot's selection (`get_availabl`) to its launch,
which is the prompt cache update of that slot (its old state saved, a cached one looked up). All of it
runs on the loop that also runs every decode step. Log lines start with the time since the server
started, `M.SS.mmm.uuu`. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections import Counter
from pathlib import Path

STAMP = re.compile(r"(\d+)\.(\d+)\.(\d+)\.(\d+) ")
EVENTS = {"launch_slot_": "started", "release:": "finished", "making room for prompt cache entry": "evicted"}


def seconds(stamp: re.Match[str]) -> float:
    return int(stamp[1]) * 60 + int(stamp[2]) + int(stamp[3]) / 1e3 + int(stamp[4]) / 1e6


def windows(lines: list[str], window_s: int) -> tuple[dict[int, Counter[str]], dict[int, list[float]]]:
    """Events counted per window, and the selection-to-launch gaps per window."""
    counts: dict[int, Counter[str]] = {}
    gaps: dict[int, list[float]] = {}
    selected: dict[str, float] = {}  # slot id -> when it was selected
    for line in lines:
        stamp = STAMP.match(line)
        if not stamp:
            continue
        at = seconds(stamp)
        window = int(at) // window_s * window_s
        for marker, event in EVENTS.items():
            if marker in line:
                counts.setdefault(window, Counter())[event] += 1
        slot = re.search(r"slot \w+: id +(\d+)", line)
        if slot and "get_availabl" in line:
            selected[slot[1]] = at
        elif slot and "launch_slot_" in line and slot[1] in selected:
            gaps.setdefault(window, []).append(at - selected.pop(slot[1]))
    return counts, gaps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", type=Path)
    parser.add_argument("--window", type=int, default=20, help="seconds per row")
    args = parser.parse_args(argv)
    counts, gaps = windows(args.log.read_text(errors="replace").splitlines(), args.window)
    print("| from (m:ss) | requests started | requests released | prompt cache evictions | select → launch, median |")
    print("|---|---|---|---|---|")
    for at in sorted(counts):
        c, g = counts[at], gaps.get(at)
        gap = f"{statistics.median(g):.3f} s" if g else ""
        print(f"| {at // 60}:{at % 60:02d} | {c['started']} | {c['finished']} | {c['evicted']} | {gap} |")
    total = sum(counts.values(), Counter())
    print(f"| all | {total['started']} | {total['finished']} | {total['evicted']} | |")


if __name__ == "__main__":
    main()
