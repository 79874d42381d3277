"""Probe: where the p99 inter-token latencies of four models x eight clients come from (bench/multi_model.py's
"four" scenario, together only). The host runs in its own process, as in the bench, with its step trace on
(LLMHOST_STEP_TRACE, host/step_trace.py): every launch and collection with its shape, GPU time, latency, stream
priority and the steps beside it. Printed: each model's client-side ITL, its steps by kind, and for each model
the largest token gaps with the host's steps inside them.

Usage: python bench/probes/host_trace.py [--quick | --cpu-smoke] [--unsteered] [--out FILE] [--raw DIR]"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import multi_model as mm

from llmhost.host.core import SLOW_SEND_S
from llmhost.host.step_trace import ENV

PASS_PARTS = ("admit_ms", "yield_ms", "drain_ms", "step_ms")  # where a slow pass of the host loop spent its time


def fast_send(e: dict[str, Any]) -> bool:
    """A send of a token batch within SLOW_SEND_S (the host traces every send; only the slow ones tell anything
    here)."""
    return e["ev"] == "send" and e["ms"] <= 1e3 * SLOW_SEND_S


def describe(e: dict[str, Any], since: float) -> str:
    if e["ev"] == "pass":
        parts = " ".join(f"{k[:-3]} {e[k]}" for k in PASS_PARTS)
        return f"{1e3 * (e['t'] - since):8.2f} pass    {parts} ms"
    if e["ev"] in ("gc", "send"):  # a garbage collection (its generation) or a send of a token batch
        return f"{1e3 * (e['t'] - since):8.2f} {e['ev']:7} {e['ms']} ms generation {e.get('generation', '-')}"
    if e["ev"] in ("confine", "dither"):  # SM steering moved the model's decode graphs to another SM count
        return f"{1e3 * (e['t'] - since):8.2f} {e['ev']:7} {e['model']:14} {e['sms']} SMs"
    if e["ev"] == "hold":  # fair sharing began to keep the model back, waiting for model `by`
        return f"{1e3 * (e['t'] - since):8.2f} hold    {e['model']:14} by {e['by']}"
    where = f"{1e3 * (e['t'] - since):8.2f} {e['ev']:7} {e['model']:14} rows {e['rows']:2} prefill {e['prefill']:4}"
    if e["ev"] == "launched":  # the last slice of a step launched in slices queued, ms after its first
        return where + f" took {e['ms']} ms"
    if e["ev"] == "launch":
        return where + (
            f" beside {e['beside']} follows {e['follows']:d} sliced {e['sliced']:d} prio {e['priority']}"
            f" took {e.get('ms')} ms"
        )
    return where + (
        f" gpu {e['gpu_ms']} ms latency {e['latency_ms']} ms overlapped {e['overlapped']:d} took {e.get('ms')} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--unsteered", action="store_true", help="the host with [host] sm_steering off")
    ap.add_argument("--raw", type=Path, default=None, help="also write the step trace and token times here")
    args = ap.parse_args()
    mode = mm.MODES["cpu-smoke" if args.cpu_smoke else "quick" if args.quick else "full"]
    trace_file = Path(tempfile.mkdtemp()) / "steps.jsonl"
    os.environ[ENV] = str(trace_file)  # inherited by the spawned host process
    host = mm.HostConfig(sm_steering=not args.unsteered)
    if args.raw:
        args.raw.mkdir(parents=True, exist_ok=True)
    with mm.canary_beside(args.raw):  # --raw: a canary process beside the run (canary.json: bench/probes/canary.py)
        streams, t0, t1 = mm.drive_four(mode, "trace", in_process=False, host=host)
    trace = [json.loads(line) for line in trace_file.read_text().splitlines()]
    if args.raw:  # for analysis off the GPU: every step, every token's arrival, the window
        (args.raw / "steps.jsonl").write_text(trace_file.read_text())
        mm.drivers().write_tokens(args.raw / "tokens.json", streams, t0, t1)
    win = [e for e in trace if t0 <= e["t"] < t1]

    out: dict[str, Any] = {
        "window_s": mode.window_s,
        "client": mm._per_model(mode, mode.four, streams, t0, t1, mm.FOUR_CLIENTS),
    }
    steps: dict[str, dict[str, Any]] = {}
    for m in sorted({e["model"] for e in win if e["model"]}):
        launches = [e for e in win if e["ev"] == "launch" and e["model"] == m]
        collects = [e for e in win if e["ev"] == "collect" and e["model"] == m]
        prompt = [e for e in collects if e["prefill"]]
        steps[m] = {
            "launches": len(launches),
            "follows": sum(e["follows"] for e in launches),
            "sliced": sum(e["sliced"] for e in launches),
            "with_prefill": len(prompt),
            "prefill_tokens": sum(e["prefill"] for e in prompt),
            "prompt_step_gpu_ms": [e["gpu_ms"] for e in prompt],
            "decode_gpu_ms_mean": round(
                sum(e["gpu_ms"] or 0.0 for e in collects if not e["prefill"])
                / max(1, sum(1 for e in collects if not e["prefill"])),
                3,
            ),
        }
        # how long the loop took to launch each step (a step launched in slices: to queue its first), and to collect it
        for ev, events in (("launch", launches), ("collect", collects)):
            took = sorted(e["ms"] for e in events if e.get("ms") is not None)
            if took:
                steps[m][f"{ev}_took_ms"] = {"mean": round(sum(took) / len(took), 3), "largest": took[-5:]}
    out["steps"] = steps
    slow = [e for e in win if e["ev"] == "pass"]
    out["slow_passes"] = {"n": len(slow), **{k: round(sum(e[k] for e in slow), 3) for k in PASS_PARTS}}
    # the caching allocator's [cudaMalloc retries, cudaMallocs, cudaFrees] at the window's first and last slow pass
    if slow:
        out["slow_passes"]["allocator"] = [slow[0].get("allocator"), slow[-1].get("allocator")]
    for kind in ("gc", "send"):
        ms = sorted(e["ms"] for e in win if e["ev"] == kind and not fast_send(e))
        out[kind] = {"n": len(ms), "total_ms": round(sum(ms), 3), "largest_ms": ms[-5:]}
    # each model's largest client-side token gaps in the window, and the host's steps inside them
    gaps: dict[str, list[tuple[float, float, float]]] = {}
    for s in streams:
        for a, b in itertools.pairwise(s.times):
            if t0 <= b < t1 and b > a:
                gaps.setdefault(s.model, []).append((b - a, a, b))
    out["worst_gaps"] = {}
    for m, gs in gaps.items():
        seen: list[tuple[float, float]] = []
        worst = []
        for gap, a, b in sorted(gs, reverse=True):
            if any(a < y and x < b for x, y in seen):
                continue  # the same stall seen by another request of the model
            seen.append((a, b))
            inside = [describe(e, a) for e in trace if a - 0.03 <= e["t"] <= b and not fast_send(e)]
            worst.append({"gap_ms": round(1e3 * gap, 2), "events": inside[-60:]})
            if len(worst) == 3:
                break
        out["worst_gaps"][m] = worst
    text = json.dumps(out, indent=1)
    print(text[:8000])
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
