"""Probe: a trace of the host core's steps while four models serve eight clients each (bench/multi_model.py's
"four" scenario, together only): every step's launch and collection time, shape and how many steps were in flight,
each sequence's token gaps as the host collected them against the gaps the clients saw, and the steps around the
largest gaps. Where do the p99 inter-token latencies come from: the GPU schedule, the host loop, or delivery?

Usage: python bench/probes/host_trace.py [--quick | --cpu-smoke] [--switch-ms MS] [--out FILE]"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import multi_model as mm
import torch

from llmhost.host import core as core_mod


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary_ms(xs: list[float]) -> dict[str, float]:
    return {
        "n": len(xs),
        "mean": round(1e3 * sum(xs) / max(1, len(xs)), 3),
        "p50": round(1e3 * pct(xs, 0.5), 3),
        "p99": round(1e3 * pct(xs, 0.99), 3),
        "max": round(1e3 * max(xs, default=0.0), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--switch-ms", type=float, default=None, help="sys.setswitchinterval for this run")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.switch_ms is not None:
        sys.setswitchinterval(args.switch_ms / 1e3)
    torch.set_grad_enabled(False)
    mode = mm.MODES["cpu-smoke" if args.cpu_smoke else "quick" if args.quick else "full"]
    trace: list[dict[str, Any]] = []
    tokens: dict[str, list[float]] = {}
    loop = {"iterations": 0, "iter_s": 0.0}

    cls = core_mod.HostCore
    orig_execute, orig_collect, orig_iterate = cls._execute, cls._collect, cls.iterate

    def execute(self: Any, name: str, plan: Any, shape: Any, stream: Any) -> Any:
        t0 = time.monotonic()
        inflight = sum(len(r) for r in self._inflight.values())
        run = orig_execute(self, name, plan, shape, stream)
        trace.append({
            "ev": "launch", "t": t0, "cpu_ms": round(1e3 * (time.monotonic() - t0), 3), "model": name,
            "rows": shape.decode_rows, "prefill": shape.prefill_tokens, "inflight": inflight,
        })  # fmt: skip
        return run

    def collect(self: Any, run: Any) -> Any:
        t0 = time.monotonic()
        events = orig_collect(self, run)
        t1 = time.monotonic()
        for e in events:
            tokens.setdefault(e.request_id, []).append(t1)
        trace.append({
            "ev": "collect", "t": t0, "cpu_ms": round(1e3 * (t1 - t0), 3), "model": run.name,
            "rows": run.shape.decode_rows, "prefill": run.shape.prefill_tokens, "overlapped": run.overlapped,
            "since_launch_ms": round(1e3 * (t1 - (run.t0 - time.perf_counter() + time.monotonic())), 3),
        })  # fmt: skip
        return events

    def iterate(self: Any) -> None:
        t0 = time.perf_counter()
        orig_iterate(self)
        loop["iterations"] += 1
        loop["iter_s"] += time.perf_counter() - t0

    cls._execute, cls._collect, cls.iterate = execute, collect, iterate  # type: ignore[method-assign]

    from llmhost.config import HostConfig
    from llmhost.memory.inventory import detect_inventory

    d = mm.drivers()
    inventory = detect_inventory()
    loads = mm._loads(mode, mode.four, mm.FOUR_CLIENTS, mode.four_tokens)
    models = mm._host_models(mode, mode.four, mode.four_tokens, mm.FOUR_CLIENTS, (1.0,) * len(mode.four))
    run = d.start_host(inventory, HostConfig(), models, "trace")
    # warm each model alone briefly (graphs, Triton kernels for prefill shapes), as the bench's alone windows do
    for ld in loads:
        d.drive_host(run, [ld], time.monotonic() + 1.0)
    trace.clear()
    tokens.clear()
    loop.update(iterations=0, iter_s=0.0)
    t_start = time.monotonic()
    t0, t1 = t_start + mode.warm_s, t_start + mode.warm_s + mode.window_s
    streams = d.drive_host(run, loads, t1)
    d.stop_host(run)

    out: dict[str, Any] = {"switch_ms": args.switch_ms, "window_s": mode.window_s}
    out["client"] = mm._per_model(mode, mode.four, streams, t0, t1, False)
    # host-side gaps between the tokens of each request, in the window
    gaps_all: list[float] = []
    collects = [e for e in trace if e["ev"] == "collect"]
    for ts in tokens.values():
        gaps = [b - a for a, b in itertools.pairwise(ts) if t0 <= b < t1]
        gaps_all.extend(gaps)
    out["host_gaps_all_ms"] = summary_ms(gaps_all)
    # per model step cadence: time between consecutive collects of the same model
    cadence: dict[str, list[float]] = {}
    last: dict[str, float] = {}
    for e in collects:
        if e["model"] in last and t0 <= e["t"] < t1:
            cadence.setdefault(e["model"], []).append(e["t"] - last[e["model"]])
        last[e["model"]] = e["t"]
    out["collect_cadence_ms"] = {m: summary_ms(v) for m, v in cadence.items()}
    win = [e for e in trace if t0 <= e["t"] < t1]
    out["steps_in_window"] = {
        m: {
            "launches": sum(1 for e in win if e["ev"] == "launch" and e["model"] == m),
            "with_prefill": sum(1 for e in win if e["ev"] == "launch" and e["model"] == m and e["prefill"]),
            "prefill_tokens": sum(e["prefill"] for e in win if e["ev"] == "launch" and e["model"] == m),
            "launch_cpu_ms_mean": round(
                sum(e["cpu_ms"] for e in win if e["ev"] == "launch" and e["model"] == m)
                / max(1, sum(1 for e in win if e["ev"] == "launch" and e["model"] == m)),
                3,
            ),
            "overlapped": sum(1 for e in win if e["ev"] == "collect" and e["model"] == m and e["overlapped"]),
        }
        for m in cadence
    }
    out["inflight_at_launch"] = {
        str(k): sum(1 for e in win if e["ev"] == "launch" and e["inflight"] == k) for k in range(5)
    }
    out["loop"] = {"iterations": loop["iterations"], "iter_s": round(loop["iter_s"], 3)}
    # the largest cadence gaps and what ran in them
    worst = []
    prev: dict[str, float] = {}
    for e in collects:
        m = e["model"]
        if m in prev and t0 <= e["t"] < t1:
            worst.append((e["t"] - prev[m], m, prev[m], e["t"]))
        prev[m] = e["t"]
    worst.sort(reverse=True)
    out["worst_gaps"] = []
    for gap, m, a, b in worst[:6]:
        inside = [
            f"{1e3 * (e['t'] - a):8.2f} {e['ev']:7} {e['model']:14} rows {e['rows']:2} prefill {e['prefill']:4} "
            f"cpu {e['cpu_ms']:6.2f} ms "
            + (
                f"in flight {e['inflight']}"
                if e["ev"] == "launch"
                else f"overlapped {e['overlapped']:d} latency {e['since_launch_ms']:.2f} ms"
            )
            for e in trace
            if a <= e["t"] <= b
        ]
        out["worst_gaps"].append({"model": m, "gap_ms": round(1e3 * gap, 2), "events": inside[:80]})
    text = json.dumps(out, indent=1)
    print(text[:6000])
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
