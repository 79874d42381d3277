"""Probe, off the GPU: the host loop's passes and slow moments in a step trace (bench/probes/host_trace.py --raw, or
bench/multi_model.py --trace-dir: steps.jsonl and tokens.json, gzipped or not, and canary.json where there is one).

A loop pass collects the steps that finished, launches the next ones, then sends the tokens it collected (unless
LLMHOST_SEND_BEFORE_LAUNCH sends them first). What this probe reports, over the window:
- `launch_ms`, `collect_ms`: how long the loop took per decode launch and per collection (p50, p99, max).
- `slow_moments`: spans of BUCKET_S buckets whose median decode launch took over SLOW_FACTOR times the window's
  median, merged when adjacent: when, how long, how slow, and what lay beside them (prompt steps, garbage
  collections, the OS figures of the slow passes inside (ThreadUsage), the canary's late wake-ups and the
  container's CPU throttling: bench/probes/canary.py).
- per model, `top_gaps`: its largest 3% of decode collection gaps (the GPU side of its token gaps), by whether they
  overlap a slow moment, a prompt step (any model's), both or neither.
- per model, `after_collect_ms`: how long its tokens took from their collection to the client, split into the wait
  for their pass's send (the launches after the collection; `launches_after`: how many) and the rest (the pipe and
  the client). And `itl_ms`: the token gaps' mean and p99 as the clients saw them, against `at_collection_p99_ms`,
  what the p99 would have been had every token reached its client the median send-to-arrival time after its
  collection: what sending before the launches can win at most.

Passes come from the records' pass numbers (traces from 2026-12-05 on); older traces have none, and their passes
are inferred: a collection after a launch starts a new pass, and a slow pass's record ends one. There, a token's
send is taken as its pass's last record before the token reached the client (traces then recorded only slow sends),
which puts a few records of the next pass, where it launched without collecting, into `wait_for_send`.

Usage: python bench/probes/loop_passes.py DIR [DIR ...] [--out FILE]"""

from __future__ import annotations

import bisect
import itertools
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # llmhost, where it is not installed

import canary as canary_probe
from multi_model_drivers import latency_ms, percentile
from trace_holds import read, read_trace, run_over_dirs

BUCKET_S = 0.05  # slow moments are found in buckets this long
SLOW_FACTOR = 2.0  # a bucket whose median decode launch takes this many times the window's median is slow
SAMPLE_GRACE_S = 0.01  # the canary's samples come every 10 ms: one on either side brackets a slow moment
OS_FIELDS = ("cpu_ms", "runq_wait_ms", "minflt", "majflt", "vol_switches", "invol_switches")


@dataclass
class Pass:
    """One loop pass: its records in order."""

    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def end(self) -> float:
        return self.records[-1]["t"]


def passes(steps: list[dict[str, Any]]) -> list[Pass]:
    """The trace's loop passes, by pass number where recorded, else inferred (module docstring)."""
    out: list[Pass] = []
    numbered = any("pass_no" in e for e in steps)
    current: Pass | None = None
    key = None
    launched = False
    for e in steps:
        if e["ev"] not in ("launch", "launched", "collect", "send", "pass"):
            continue  # garbage collections and SM moves happen inside a pass, and say nothing of its bounds
        if numbered:
            new = current is None or e["pass_no"] != key
        else:
            new = current is None or (e["ev"] == "collect" and launched)
        if new:
            current = Pass()
            out.append(current)
            key, launched = e.get("pass_no"), False
        assert current is not None
        current.records.append(e)
        launched |= e["ev"] in ("launch", "launched")
        if e["ev"] == "pass" and not numbered:
            current = None  # a slow pass's record is its last
    return out


def send_of(p: Pass, i: int, arrival: float) -> float:
    """When the tokens of the collection at `p.records[i]` left the loop: the pass's first traced send after it (a
    pass sends twice under LLMHOST_SEND_BEFORE_LAUNCH: before its launches, and after them what a CPU step gave),
    else inferred."""
    return next((e["t"] for e in p.records[i + 1 :] if e["ev"] == "send"), None) or inferred_send(p, i, arrival)


def inferred_send(p: Pass, i: int, arrival: float) -> float:
    """Where the trace has no send for the pass (older traces recorded only slow ones): its last record after the
    collection `i` and before the token's arrival (later ones belong to passes that launched without collecting,
    which the inference merges into this one)."""
    return max((e["t"] for e in p.records[i:] if e["t"] <= arrival), default=p.records[i]["t"])


def _stats(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    return {"p50": round(percentile(xs, 0.5), 3), "p99": round(percentile(xs, 0.99), 3), "max": round(max(xs), 3)}


def _overlap(a: float, b: float, spans: list[tuple[float, float]]) -> bool:
    return any(x < b and a < y for x, y in spans)


def slow_moments(
    steps: list[dict[str, Any]], t0: float, t1: float, prompts: list[tuple[float, float]], canary: dict[str, Any] | None
) -> tuple[list[dict[str, Any]], list[tuple[float, float]]]:
    """The window's slow moments (module docstring), as reported and as (start, end) spans."""
    decode = [e for e in steps if e["ev"] == "launch" and not e["prefill"] and t0 <= e["t"] < t1]
    if not decode:
        return [], []
    median = statistics.median(e["ms"] for e in decode)
    buckets: dict[int, list[float]] = {}
    for e in decode:
        buckets.setdefault(int((e["t"] - t0) / BUCKET_S), []).append(e["ms"])
    slow = sorted(k for k, v in buckets.items() if statistics.median(v) > SLOW_FACTOR * median)
    runs: list[list[int]] = []
    for k in slow:
        if runs and k == runs[-1][-1] + 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    out, spans = [], []
    for run in runs:
        a, b = t0 + run[0] * BUCKET_S, t0 + (run[-1] + 1) * BUCKET_S
        spans.append((a, b))
        inside = [e for e in steps if a <= e["t"] < b]
        launches = [e["ms"] for e in inside if e["ev"] == "launch" and not e["prefill"]]
        collects = [e["ms"] for e in inside if e["ev"] == "collect" and e.get("ms") is not None]
        slow_passes = [e for e in inside if e["ev"] == "pass"]
        moment: dict[str, Any] = {
            "at_s": round(a - t0, 3),
            "ms": round(1e3 * (b - a), 1),
            "decode_launch_ms_p50": round(statistics.median(launches), 3),
            "collect_ms_p50": round(statistics.median(collects), 3) if collects else None,
            "slow_passes": len(slow_passes),
            "slow_pass_ms": round(sum(e["step_ms"] + e["drain_ms"] for e in slow_passes), 3),
            "drain_ms_p50": round(statistics.median(e["drain_ms"] for e in slow_passes), 3) if slow_passes else None,
            "prompt_step": _overlap(a, b, prompts),
            "gc_ms": round(sum(e["ms"] for e in inside if e["ev"] == "gc"), 3),
        }
        if any("cpu_ms" in e for e in slow_passes):  # what the OS gave the loop's thread over those passes
            moment["slow_pass_os"] = {k: round(sum(e.get(k, 0) for e in slow_passes), 3) for k in OS_FIELDS}
        if canary is not None:
            stalls = [h for h in canary["hiccups"] if a <= h["t"] < b]
            moment["canary_late_naps"] = len(stalls)
            moment["canary_longest_ms"] = max((h["ms"] for h in stalls), default=0.0)
            throttled = [
                x for x in canary.get("throttle_samples", []) if a - SAMPLE_GRACE_S <= x[0] < b + SAMPLE_GRACE_S
            ]
            if len(throttled) >= 2:  # the container's CPU quota ran out meanwhile
                moment["container_throttled_ms"] = round(throttled[-1][2] - throttled[0][2], 3)
        out.append(moment)
    return out, spans


def analyse(raw: Path) -> dict[str, Any]:
    steps, tokens = read_trace(raw)
    canary_file = raw / "canary.json"
    canary = (
        json.loads(read(canary_file)) if canary_file.exists() or canary_file.with_suffix(".json.gz").exists() else None
    )
    t0, t1 = tokens["t0"], tokens["t1"]
    window = [e for e in steps if t0 <= e["t"] < t1]
    started: dict[str, float] = {}
    prompts: list[tuple[float, float]] = []
    for e in steps:
        if e["ev"] == "launch" and e["prefill"]:
            started[e["model"]] = e["t"] - e["ms"] / 1e3
        elif e["ev"] == "collect" and e["prefill"] and e["model"] in started:
            prompts.append((started.pop(e["model"]), e["t"]))
    moments, spans = slow_moments(steps, t0, t1, prompts, canary)
    all_passes = passes(steps)
    # Per model, its decode collections in time order, with the pass each was in.
    collected: dict[str, list[tuple[float, Pass, int]]] = {}
    for p in all_passes:
        for i, e in enumerate(p.records):
            if e["ev"] == "collect":
                collected.setdefault(e["model"], []).append((e["t"], p, i))
    out: dict[str, Any] = {
        "numbered_passes": any("pass_no" in e for e in steps),
        "passes_in_window": sum(1 for p in all_passes if t0 <= p.end < t1),
        "launch_ms": _stats([e["ms"] for e in window if e["ev"] == "launch" and not e["prefill"]]),
        "collect_ms": _stats([e["ms"] for e in window if e["ev"] == "collect" and e.get("ms") is not None]),
        "slow_moments": moments,
        "slow_moment_share": round(sum(b - a for a, b in spans) / (t1 - t0), 4),
        "canary": canary_probe.summary(canary, t0, t1) if canary is not None else None,
        "models": {},
    }
    for model, cs in sorted(collected.items()):
        times = [c[0] for c in cs]
        decode = [(c[0], c[1]) for c in cs if not c[1].records[c[2]]["prefill"]]
        gaps = [(b[0] - a[0], a[0], b[0]) for a, b in itertools.pairwise(decode) if t0 <= b[0] < t1]
        top = sorted(gaps)[-max(1, 3 * len(gaps) // 100) :] if gaps else []
        marks = [(_overlap(a, b, spans), _overlap(a, b, prompts)) for _, a, b in top]
        wait, rest, launches_after = [], [], []
        actual, shifted = [], []
        streams = [s for s in tokens["streams"] if s["model"] == model]
        for s in streams:
            at_collection = []
            for t in s["times"]:
                k = bisect.bisect_right(times, t) - 1
                if k < 0:
                    at_collection.append(t)
                    continue
                tc, p, i = cs[k]
                at_collection.append(tc)
                if not t0 <= t < t1:
                    continue
                send = send_of(p, i, t)
                wait.append(send - tc)
                rest.append(t - send)
                launches_after.append(
                    sum(1 for e in p.records[i + 1 :] if e["ev"] in ("launch", "launched") and e["t"] <= send)
                )
            for (a, b), (x, y) in zip(itertools.pairwise(s["times"]), itertools.pairwise(at_collection), strict=True):
                if t0 <= b < t1 and b > a:
                    actual.append(b - a)
                    shifted.append(y - x)
        entry: dict[str, Any] = {
            "decode_gaps": len(gaps),
            "top_gaps": {
                "n": len(top),
                "smallest_ms": round(1e3 * top[0][0], 3) if top else None,
                "slow_moment_only": sum(1 for m in marks if m == (True, False)),
                "prompt_step_only": sum(1 for m in marks if m == (False, True)),
                "both": sum(1 for m in marks if m == (True, True)),
                "neither": sum(1 for m in marks if m == (False, False)),
            },
        }
        if wait:
            entry["after_collect_ms"] = {
                "wait_for_send": latency_ms(wait),
                "send_to_client": latency_ms(rest),
                "launches_after": {"p50": percentile(launches_after, 0.5), "p99": percentile(launches_after, 0.99)},
            }
        if actual:
            median_rest = percentile(rest, 0.5) if rest else 0.0
            entry["itl_ms"] = {
                "mean": round(1e3 * statistics.mean(actual), 3),
                "p99": round(1e3 * percentile(actual, 0.99), 3),
                "at_collection_p99_ms": round(1e3 * percentile(shifted, 0.99), 3),
                "median_send_to_client_ms": round(1e3 * median_rest, 3),
            }
        out["models"][model] = entry
    return out


def main() -> None:
    run_over_dirs("loop_passes.py", analyse)


if __name__ == "__main__":
    main()
