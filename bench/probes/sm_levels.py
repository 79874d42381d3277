"""Probe, off the GPU: which SM counts each model's decode graphs ran at in a step trace's window (multi_model.py
--trace-dir or host_trace.py --raw folders). SM steering's "confine" records set a model's level; "dither" records
change the graphs its next step replays (a level lower while it is ahead). Per model: the share of the window's
time at each SM count its steps were selected for, its level (confine) at the window's start and end, and how many
level changes fell in the window. Whether the 8Bs sit at the deepest level and still wait for the 1B says whether
deeper levels could take their share down further.

Usage: python bench/probes/sm_levels.py DIR [DIR ...] [--out FILE]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trace_holds import read_trace, run_over_dirs


def shares(changes: list[tuple[float, int]], t0: float, t1: float, start: int) -> dict[str, float]:
    """Time share of [t0, t1) at each value of a step function that is `start` before its first (time, value)
    change and each change's value after it."""
    out: dict[int, float] = {}
    at, value = t0, start
    for t, v in changes:
        if t >= t1:
            break
        if t > at:
            out[value] = out.get(value, 0.0) + (t - at)
            at = t
        value = v
    out[value] = out.get(value, 0.0) + (t1 - at)
    return {str(k): round(v / (t1 - t0), 3) for k, v in sorted(out.items(), reverse=True)}


def value_at(changes: list[tuple[float, int]], t: float, start: int) -> int:
    value = start
    for when, v in changes:
        if when > t:
            break
        value = v
    return value


def levels(raw: Path, total_sms: int = 0) -> dict[str, Any]:
    events, window = read_trace(raw)
    t0, t1 = window["t0"], window["t1"]
    models = sorted({e["model"] for e in events if e["ev"] == "launch"})
    whole = total_sms or max([e["sms"] for e in events if "sms" in e] or [0])
    out: dict[str, Any] = {"window_s": round(t1 - t0, 2), "largest_sms_seen": whole}
    for m in models:
        confine = [(e["t"], e["sms"]) for e in events if e["ev"] == "confine" and e["model"] == m]
        selected = [(e["t"], e["sms"]) for e in events if e["ev"] in ("confine", "dither") and e["model"] == m]
        out[m] = {
            "level_at_start": value_at(confine, t0, whole),
            "level_at_end": value_at(confine, t1, whole),
            "level_changes_in_window": sum(1 for t, _ in confine if t0 <= t < t1),
            "selected_share": shares(selected, t0, t1, whole),
        }
    return out


if __name__ == "__main__":
    run_over_dirs("sm_levels.py", levels)
