"""Probe (no GPU needed): how well the host's solo step-cost samples measure a model's decode step alone, read from
step traces that bench/probes/host_trace.py wrote with --raw (steps.jsonl and tokens.json, gzipped or not).

The probe warms each model alone before its window, and the trace covers that too. Per model, over its steps
before the window: the GPU time (its timing events) of decode steps run ahead (queued behind its step in flight:
their start event completes as that step ends) and of decode steps launched after a collection with nothing beside
them (the host's default samples, GpuScheduler.observe: their start event is recorded before the host stages their
inputs and launches the graph), and the estimate the host charged with when the window began (the first solo_ms
there). Decode steps launched after a collection beside another step are left out (their time is the pair's).

Usage: python bench/probes/solo_samples.py DIR [DIR ...]   (e.g. bench/results/host_trace_raw-h100/undithered)"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trace_holds import read_trace

WINDOW_MARGIN_S = 0.5  # steps this close to the window's start are left out: the models start together there


def samples(steps: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    """Per model: {"run_ahead": {n, p50_ms}, "after_collect_alone": {n, p50_ms}, "estimate_ms": ...}."""
    launches: dict[str, deque[dict[str, Any]]] = defaultdict(deque)
    times: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"run_ahead": [], "after_collect_alone": []})
    estimate: dict[str, float] = {}
    for e in steps:
        if e.get("prefill", 1) != 0 or e["ev"] not in ("launch", "collect"):
            continue
        name = e["model"]
        if e["ev"] == "launch":
            launches[name].append(e)
            continue
        launch = launches[name].popleft() if launches[name] else None  # a model's decode steps finish in order
        kinds = times[name]  # every model with a decode step gets a row, sampled or not
        if e["t"] >= t0:
            if name not in estimate and e.get("solo_ms") is not None:
                estimate[name] = e["solo_ms"]
            continue
        if launch is None or e.get("gpu_ms") is None or e["t"] >= t0 - WINDOW_MARGIN_S:
            continue
        if launch["follows"]:
            kinds["run_ahead"].append(e["gpu_ms"])
        elif not e["overlapped"]:
            kinds["after_collect_alone"].append(e["gpu_ms"])
    out: dict[str, Any] = {}
    for name in sorted(times):
        row: dict[str, Any] = {
            kind: {"n": len(xs), "p50_ms": round(statistics.median(xs), 3)} if xs else {"n": 0}
            for kind, xs in times[name].items()
        }
        row["estimate_ms"] = estimate.get(name)
        ahead = row["run_ahead"].get("p50_ms")
        if ahead and row["estimate_ms"] is not None:
            row["estimate_over_run_ahead"] = round(row["estimate_ms"] / ahead, 3)
        out[name] = row
    return out


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    out = {}
    for d in sys.argv[1:]:
        steps, tokens = read_trace(Path(d))
        out[d] = samples(steps, tokens["t0"])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
