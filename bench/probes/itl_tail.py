"""Probe (no GPU needed): where the four-model p99 inter-token latencies come from, read from a step trace that
bench/probes/host_trace.py wrote with --raw (steps.jsonl and tokens.json, gzipped or not).

Per model, over the trace's window: the mean and p99 of its token gaps; how many gaps overlap some model's prompt
step (from its launch to its collection), its own or another's; the mean and p99 of the gaps that overlap none
(what the p99 would be if prompt steps cost the others nothing); and its decode steps' GPU time (p50, p99), which
shows how much a step's length varies with the steps beside it. And how long after its model's latest collection
each token reached the client (client_after_collect_ms: the loop's sending, the pipe and the client's own delay; a
lower bound where a token waited past its model's next collection): where its p99 is large against the gaps', the
tail is in the delivery, not on the GPU.

Usage: python bench/probes/itl_tail.py DIR [--solo-p99 MODEL=MS ...]
(--solo-p99: the model's solo p99 from the same run's record, to print the ratios the issue's target takes)"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # llmhost, where it is not installed

from multi_model_drivers import latency_ms, percentile
from trace_holds import read_trace


def analyse(steps: list[dict[str, Any]], tokens: dict[str, Any]) -> dict[str, Any]:
    t0, t1 = tokens["t0"], tokens["t1"]
    prompts = [
        (e["t"] - e["latency_ms"] / 1e3, e["t"], e["model"])
        for e in steps
        if e["ev"] == "collect" and e["prefill"] > 0 and e.get("latency_ms") is not None
    ]
    gaps: dict[str, list[tuple[float, float, float]]] = {}
    for s in tokens["streams"]:
        for a, b in zip(s["times"], s["times"][1:], strict=False):
            if t0 <= b < t1 and b > a:
                gaps.setdefault(s["model"], []).append((b - a, a, b))
    collected: dict[str, list[float]] = {}
    for e in steps:
        if e["ev"] == "collect":
            collected.setdefault(e["model"], []).append(e["t"])
    for ts in collected.values():
        ts.sort()
    after: dict[str, list[float]] = {}
    for s in tokens["streams"]:
        ts = collected.get(s["model"], [])
        for t in s["times"]:
            i = bisect.bisect_right(ts, t)
            if t0 <= t < t1 and i:
                after.setdefault(s["model"], []).append(t - ts[i - 1])
    out: dict[str, Any] = {"prompt_steps_in_window": sum(1 for p in prompts if t0 <= p[1] < t1), "models": {}}
    for model, gs in sorted(gaps.items()):

        def overlapping(a: float, b: float, m: str = model) -> tuple[bool, bool]:
            hits = [p for p in prompts if p[0] < b and a < p[1]]
            return any(p[2] == m for p in hits), any(p[2] != m for p in hits)

        marks = [overlapping(a, b) for _, a, b in gs]
        clear = [g for (g, _, _), (own, other) in zip(gs, marks, strict=True) if not own and not other]
        ms = [1e3 * g for g, _, _ in gs]
        clear_ms = [1e3 * g for g in clear]
        decode_gpu = [
            e["gpu_ms"]
            for e in steps
            if e["ev"] == "collect" and e["model"] == model and not e["prefill"] and e.get("gpu_ms") is not None
            and t0 <= e["t"] < t1
        ]  # fmt: skip
        out["models"][model] = {
            "gaps": len(ms),
            "itl_ms": {"mean": round(sum(ms) / len(ms), 3), "p99": round(percentile(ms, 0.99), 3)},
            "overlapping_own_prompt": sum(own for own, _ in marks),
            "overlapping_other_prompt": sum(other for _, other in marks),
            "clear_of_prompts": {
                "gaps": len(clear_ms),
                "mean": round(sum(clear_ms) / len(clear_ms), 3) if clear_ms else None,
                "p99": round(percentile(clear_ms, 0.99), 3) if clear_ms else None,
            },
            "decode_gpu_ms": (
                {"p50": round(percentile(decode_gpu, 0.5), 3), "p99": round(percentile(decode_gpu, 0.99), 3)}
                if decode_gpu
                else None
            ),
            "client_after_collect_ms": latency_ms(after[model]) if model in after else None,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path, help="a host_trace.py --raw directory")
    ap.add_argument("--solo-p99", action="append", default=[], metavar="MODEL=MS")
    args = ap.parse_args()
    out = analyse(*read_trace(args.dir))
    for item in args.solo_p99:
        model, ms = item.split("=")
        m = out["models"].get(model)
        if m is not None:
            m["p99_over_solo_p99"] = round(m["itl_ms"]["p99"] / float(ms), 3)
            if m["clear_of_prompts"]["p99"] is not None:
                m["clear_p99_over_solo_p99"] = round(m["clear_of_prompts"]["p99"] / float(ms), 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
