"""Probe, off the GPU: how each model's decode steps follow one another in a step trace that
`bench/probes/host_trace.py --raw DIR` wrote (steps.jsonl and tokens.json, gzipped or not). For every pair of
consecutive decode steps of a model collected in the window: the gap between their collections, and whether the
second was queued behind the first (run ahead, GpuScheduler.follow_ok) or launched after the first was collected,
and then how long fair sharing held it (from that collection to its launch) and how long it ran (launch to
collection). A gap's p99 shows which of the two makes a model's tail. Also: the fraction of gaps during which a
prompt step (any model's) ran, and how many of the top 3% did; and, where the trace has the host's "hold" records,
each model's holds by the model it waited for (`hold_ms_by_blocker`; "none": launched after a collection without
being held, its hold is the loop's latency).

Usage: python bench/probes/trace_holds.py DIR [DIR ...] [--out FILE]  (e.g. bench/results/host_trace_raw-h200/steered)
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # llmhost, where it is not installed

from multi_model_drivers import percentile


def read(path: Path) -> str:
    gz = path.with_name(path.name + ".gz")
    return gzip.decompress(gz.read_bytes()).decode() if gz.exists() else path.read_text()


def read_trace(raw: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A host_trace.py --raw directory: its step events and its client token times (with the window, t0 and t1)."""
    steps = [json.loads(line) for line in read(raw / "steps.jsonl").splitlines() if line.strip()]
    return steps, json.loads(read(raw / "tokens.json"))


def run_over_dirs(script: str, analyse: Callable[[Path], dict[str, Any]]) -> None:
    """The command line of a probe over raw trace folders (DIR [DIR ...] [--out FILE]): `analyse` of each, printed
    as JSON with the command that made it, and written to FILE too."""
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", type=Path, nargs="+", help="host_trace.py --raw or multi_model.py --trace-dir folders")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    command = f"python bench/probes/{script} " + " ".join(sys.argv[1:])
    text = json.dumps({"command": command, "runs": {str(d): analyse(d) for d in args.dirs}}, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def ms(x: float) -> float:
    return round(1e3 * x, 2)


def summary(xs: list[float]) -> dict[str, float]:
    return {
        "n": len(xs),
        "mean": ms(statistics.mean(xs)),
        "p90": ms(percentile(xs, 0.9)),
        "p99": ms(percentile(xs, 0.99)),
    }


def holds(raw: Path) -> dict[str, Any]:
    events, window = read_trace(raw)
    t0, t1 = window["t0"], window["t1"]
    # Prompt steps, from their launch's start to their collection (a model's prompt steps never overlap).
    started: dict[str, float] = {}
    prompts: list[tuple[float, float]] = []
    for e in events:
        if e.get("prefill") and e["ev"] == "launch":
            started[e["model"]] = e["t"]
        elif e.get("prefill") and e["ev"] == "collect" and e["model"] in started:
            prompts.append((started.pop(e["model"]), e["t"]))
    out: dict[str, Any] = {}
    for model in sorted({e["model"] for e in events if e["model"]}):
        steps = [e for e in events if e["model"] == model and not e.get("prefill") and e["ev"] in ("launch", "collect")]
        launches = [e for e in steps if e["ev"] == "launch"]
        collects = [e for e in steps if e["ev"] == "collect"]
        pairs = list(zip(launches, collects, strict=False))  # a model's decode steps complete in launch order
        # (gap, run ahead, hold, run) of each step collected in the window after its model's previous one
        rows = [
            (
                c_next["t"] - c_prev["t"],
                l_next["follows"],
                max(0.0, l_next["t"] - c_prev["t"]),
                c_next["t"] - l_next["t"],
            )
            for (_, c_prev), (l_next, c_next) in itertools.pairwise(pairs)
            if t0 <= c_next["t"] < t1
        ]
        # Which gaps had a prompt step (any model's) running at some point between their two collections.
        beside = [any(p0 < c_next["t"] and p1 > c_prev["t"] for p0, p1 in prompts) for (_, c_prev), (_, c_next) in
                  itertools.pairwise(pairs) if t0 <= c_next["t"] < t1]  # fmt: skip
        top3 = sorted(zip(rows, beside, strict=True), key=lambda x: x[0][0])[-max(1, 3 * len(rows) // 100) :]
        follow = [r[0] for r in rows if r[1]]
        after = [r for r in rows if not r[1]]
        top = sorted(rows)[-max(1, len(rows) // 100) :]
        # Whom each hold waited for: the model named by the host's last "hold" record of it between the collection
        # and the launch (traces before those records: none, so no breakdown).
        marks = [e for e in events if e["ev"] == "hold" and e["model"] == model]
        by: dict[str, list[float]] = {}
        for (_, c_prev), (l_next, c_next) in itertools.pairwise(pairs):
            if l_next["follows"] or not t0 <= c_next["t"] < t1:
                continue
            within = [m["by"] for m in marks if c_prev["t"] <= m["t"] <= l_next["t"]]
            by.setdefault(within[-1] if within else "none", []).append(max(0.0, l_next["t"] - c_prev["t"]))
        out[model] = {
            "gap_ms": summary([r[0] for r in rows]),
            "run_ahead_gap_ms": summary(follow) if follow else None,
            "launched_after_collect": {
                "gap_ms": summary([r[0] for r in after]),
                "hold_ms": summary([r[2] for r in after]),
                "run_ms": summary([r[3] for r in after]),
            }
            if after
            else None,
            "hold_ms_by_blocker": {b: summary(xs) for b, xs in sorted(by.items())} if marks else None,
            "top_1pct_run_ahead": sum(1 for r in top if r[1]),
            "top_1pct": len(top),
            "gaps_beside_a_prompt_step": round(sum(beside) / len(beside), 3) if beside else None,
            "top_3pct": len(top3),
            "top_3pct_beside_a_prompt_step": sum(1 for _, b in top3 if b),
        }
    return out


def main() -> None:
    run_over_dirs("trace_holds.py", holds)


if __name__ == "__main__":
    main()
