"""Probe, off the GPU: each model's token gaps in a step trace's window (multi_model.py --trace-dir or
host_trace.py --raw folders), by the other models' prompt work in flight during the gap: none, or which models had
a step with prompt tokens (rows of a decode graph, "rows N", or an eager prompt step, "eager") running. A gap runs
from the collection of a model's decode step to the next one's. Where the p99 gaps fall says whose prompts make a
model's tail (the four-model bench: the small models' beside the two 8Bs' prompt rows at once).

Usage: python bench/probes/prompt_company.py DIR [DIR ...] [--out FILE]
"""

from __future__ import annotations

import itertools
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trace_holds import ms, read_trace, run_over_dirs


def steps_of(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every collected step: model, launch and collection times, decode rows, prompt tokens (eager), prompt rows."""
    launched: dict[str, list[dict[str, Any]]] = defaultdict(list)
    out = []
    for e in events:
        if e["ev"] == "launch":
            launched[e["model"]].append(e)
        elif e["ev"] == "collect" and launched[e["model"]]:
            first = launched[e["model"]].pop(0)
            out.append({"model": e["model"], "launch": first["t"], "collect": e["t"], "rows": e["rows"],
                        "eager": e["prefill"], "prompt_rows": e.get("prompt_rows", 0)})  # fmt: skip
    return out


def company(raw: Path) -> dict[str, Any]:
    events, window = read_trace(raw)
    t0, t1 = window["t0"], window["t1"]
    steps = steps_of(events)
    out: dict[str, Any] = {}
    for model in sorted({s["model"] for s in steps}):
        own = [s for s in steps if s["model"] == model and s["rows"] and not s["eager"]]
        by: dict[str, list[float]] = defaultdict(list)
        gaps = []
        for a, b in itertools.pairwise(own):
            if not t0 <= b["collect"] < t1:
                continue
            start = max(a["collect"], b["launch"])
            prompts = sorted({
                f"{s['model']} " + ("eager" if s["eager"] else f"rows {s['prompt_rows']}")
                for s in steps
                if s["model"] != model and (s["eager"] or s["prompt_rows"]) and s["launch"] < b["collect"]
                and s["collect"] > start
            })  # fmt: skip
            key = " + ".join(prompts) or "none"
            gap = b["collect"] - a["collect"]
            by[key].append(gap)
            gaps.append((gap, key))
        if not gaps:
            continue
        gaps.sort()
        top = gaps[int(0.99 * len(gaps)) :]
        out[model] = {
            "gaps": len(gaps),
            "p99_ms": ms(gaps[int(0.99 * len(gaps))][0]),
            "top_1pct_beside": {k: sum(1 for _, c in top if c == k) for k in sorted({c for _, c in top})},
            "beside": {
                k: {"n": len(v), "mean_ms": ms(statistics.mean(v)), "max_ms": ms(max(v))}
                for k, v in sorted(by.items(), key=lambda kv: -len(kv[1]))
            },
        }
    return out


if __name__ == "__main__":
    run_over_dirs("prompt_company.py", company)
