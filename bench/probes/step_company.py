"""Probe, off the GPU: how long each model's decode steps take on the GPU by the company they keep, from a raw step
trace (bench/probes/host_trace.py --raw, or bench/multi_model.py --trace-dir: steps.jsonl and tokens.json, gzipped or
not).

A decode step's GPU time (its CUDA events: from its start on its stream to its end, so a step queued behind its
model's previous one counts from when that one ended) is the floor of its model's token gap: no launch order, hold
or send can make a gap shorter than the step in it. Each decode step collected in the window is put in a class by
what ran beside it, from the other steps' GPU intervals (collection time minus GPU time):
- `prompt`: some model's prompt step overlapped it at all; else `own rows`: it carried prompt rows in its graph
  (ModelConfig.graph_prompt_tokens; the trace's `prompt_rows`); else `rows`: another model's step carrying prompt
  rows overlapped it at all; else `decode`;
- `beside N`: how many other models had decode steps on the GPU for more than half of it.
Per class: how many steps, and their GPU time's mean, p90, p99 and max. Where even the steps in the commonest class
have a p99 over 3x the model's solo p99, the issue's p99 target is out of reach at that share of the GPU. And the
prompt steps themselves: per model how many, their tokens and GPU time, and the share of the window one was running.

Usage: python bench/probes/step_company.py DIR [DIR ...] [--out FILE]"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # llmhost, where it is not installed

from multi_model_drivers import percentile
from trace_holds import read_trace, run_over_dirs

HALF = 0.5  # another model's decode steps on the GPU for more than this fraction of a step count as its company


def _overlap(a: float, b: float, spans: list[tuple[float, float]]) -> float:
    """Seconds of [a, b) covered by `spans` (a model's steps never overlap each other on the GPU)."""
    return sum(max(0.0, min(b, y) - max(a, x)) for x, y in spans)


def _prompt_steps(steps: list[dict[str, Any]], t0: float, t1: float) -> dict[str, Any]:
    """The prompt steps collected in the window: per model how many, their tokens and GPU time; and the share of
    the window some prompt step was on the GPU (the time every decode step beside one is in the `prompt` class)."""
    mine = [e for e in steps if e["ev"] == "collect" and e["prefill"] and e.get("gpu_ms") and t0 <= e["t"] < t1]
    spans = sorted((e["t"] - e["gpu_ms"] / 1e3, e["t"]) for e in mine)
    covered, end = 0.0, t0
    for a, b in spans:  # the union of the spans, clipped to the window
        a, b = max(a, end, t0), min(b, t1)
        if b > a:
            covered += b - a
            end = b
    per_model: dict[str, Any] = {}
    for model in sorted({e["model"] for e in mine}):
        es = [e for e in mine if e["model"] == model]
        per_model[model] = {
            "steps": len(es),
            "tokens_p50": percentile([e["prefill"] for e in es], 0.5),
            "gpu_ms_p50": round(percentile([e["gpu_ms"] for e in es], 0.5), 3),
            "gpu_ms_max": round(max(e["gpu_ms"] for e in es), 3),
        }
    return {"window_share": round(covered / (t1 - t0), 4), "models": per_model}


def company(steps: list[dict[str, Any]], t0: float, t1: float) -> dict[str, Any]:
    decode: dict[str, list[tuple[float, float]]] = {}
    prompts: list[tuple[float, float]] = []
    carrying: dict[str, set[tuple[float, float]]] = {}  # decode steps that carried prompt rows in their graph
    for e in steps:
        if e["ev"] != "collect" or not e.get("gpu_ms"):
            continue
        span = (e["t"] - e["gpu_ms"] / 1e3, e["t"])
        if e["prefill"]:
            prompts.append(span)
        else:
            decode.setdefault(e["model"], []).append(span)
            if e.get("prompt_rows"):
                carrying.setdefault(e["model"], set()).add(span)
    out: dict[str, Any] = {"prompt_steps": _prompt_steps(steps, t0, t1), "models": {}}
    for model, spans in sorted(decode.items()):
        classes: dict[str, list[float]] = {}
        for a, b in spans:
            if not t0 <= b < t1:
                continue
            beside = sum(1 for m, other in decode.items() if m != model and _overlap(a, b, other) > HALF * (b - a))
            rows_beside = [x for m, spans in carrying.items() if m != model for x in spans]
            if _overlap(a, b, prompts) > 0.0:
                kind = "prompt"
            elif (a, b) in carrying.get(model, set()):
                kind = "own rows"
            elif _overlap(a, b, rows_beside) > 0.0:
                kind = "rows"
            else:
                kind = "decode"
            classes.setdefault(f"{kind} beside {beside}", []).append(1e3 * (b - a))
        total = sum(len(v) for v in classes.values())
        out["models"][model] = {
            key: {
                "steps": len(ms),
                "share": round(len(ms) / total, 3),
                "mean_ms": round(statistics.mean(ms), 3),
                "p90_ms": round(percentile(ms, 0.9), 3),
                "p99_ms": round(percentile(ms, 0.99), 3),
                "max_ms": round(max(ms), 3),
            }
            for key, ms in sorted(classes.items())
        }
    return out


def analyse(raw: Path) -> dict[str, Any]:
    steps, tokens = read_trace(raw)
    return company(steps, tokens["t0"], tokens["t1"])


def main() -> None:
    run_over_dirs("step_company.py", analyse)


if __name__ == "__main__":
    main()
