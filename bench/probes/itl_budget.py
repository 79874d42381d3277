"""Probe, off the GPU: what the four-model p99 target (issue 6: no model's p99 inter-token latency above 3x its solo
value) asks of each model's share of the GPU, from a bench/multi_model.py result.

A model's eight clients stream without pause, so its mean token gap together is its solo mean gap over its
normalized speed s (tokens/s together / alone): `predicted_mean_ms` beside the measured mean checks that. Its p99 is
its mean times its tail (p99 / mean together), so the target holds only where

    s >= tail * solo_mean / (3 * solo_p99)

`needed_flat` is that bound for a flat distribution (tail 1: no run can do better), `needed_at_tail` for the tail
measured in the run. Fair sharing at equal weights gives every model about the same s, and the four s add up to
what running together gains over taking turns (`normalized_sum`; 1.0 is time slicing): where the needed speeds add
up to more than any run's sum, no split of the GPU meets the target at that tail. The baselines (threads, MPS,
processes) are put against the host's solo numbers the same way.

The equal share (host runs with the bytes each model read, alone and together): where every model progresses at
the same normalized speed s, as equal weights make them (overlapped steps are charged their solo cost), the bytes
they read together are s times the sum of their solo reads, so at the bytes the run read

    s_equal = bytes read together / sum of bytes read alone

and a model's p99 over solo is (1 / s) x (tail / solo tail). The target then holds only where each model's tail
grows by at most 3 x s_equal over its solo tail (`tail_growth_allowed`, against each model's measured
`tail_growth`): with the GPU reading at its copy bandwidth, no schedule raises s_equal much, and what is left of the
target is in the tails.

Usage: python bench/probes/itl_budget.py RESULT.json [RESULT.json ...] [--out FILE]"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: multi_model_report

from multi_model_report import EXPERIMENTS

LIMIT = 3.0  # the bound: p99 together within this many times the solo p99


def _r(x: float) -> float:
    return round(x, 3)


def _model(solo: dict[str, Any], tok_s: float, itl: dict[str, Any]) -> dict[str, Any]:
    """One model's numbers together against its solo ones (the host's, with the model alone)."""
    s = tok_s / solo["tokens_per_s_alone"]
    solo_mean, solo_p99 = solo["itl_ms_alone"]["mean"], solo["itl_ms_alone"]["p99"]
    tail = itl["p99"] / itl["mean"]
    flat = solo_mean / (LIMIT * solo_p99)
    solo_tail = solo_p99 / solo_mean
    return {
        "normalized": _r(s),
        "itl_mean_ms": itl["mean"],
        "predicted_mean_ms": _r(solo_mean / s),
        "p99_ms": itl["p99"],
        "p99_over_solo": _r(itl["p99"] / solo_p99),
        "tail": _r(tail),
        "solo_tail": _r(solo_tail),
        "tail_growth": _r(tail / solo_tail),
        "needed_flat": _r(flat),
        "needed_at_tail": _r(flat * tail),
    }


def _run(models: dict[str, dict[str, Any]], phase: dict[str, Any] | None = None) -> dict[str, Any]:
    sums = {k: _r(sum(m[k] for m in models.values())) for k in ("normalized", "needed_flat", "needed_at_tail")}
    out = {
        "normalized_sum": sums["normalized"],
        "needed_flat_sum": sums["needed_flat"],
        "needed_at_tail_sum": sums["needed_at_tail"],
        "short_of_target": sorted(n for n, m in models.items() if m["normalized"] < m["needed_at_tail"]),
    }
    share = _equal_share(phase or {}, list(models))
    if share is not None:
        out["equal_share"] = _r(share)
        out["tail_growth_allowed"] = _r(LIMIT * share)
        for m in models.values():
            m["p99_over_solo_at_equal_share"] = _r(m["tail_growth"] / share)
    return {**out, "models": models}


def _equal_share(phase: dict[str, Any], names: list[str]) -> float | None:
    """s_equal of the module's docstring from a raw host phase (bench/multi_model.py's `raw`: its `alone` and
    `together` windows with each model's bytes_per_s); None where a figure is missing."""
    alone, together = phase.get("alone") or {}, phase.get("together") or {}
    solo = [(alone.get(n) or {}).get("bytes_per_s") for n in names]
    both = [(together.get(n) or {}).get("bytes_per_s") for n in names]
    if any(not x for x in solo) or any(x is None for x in both):
        return None
    return float(sum(both)) / float(sum(solo))


def _raw_phase(doc: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The raw phase behind a four-model summary key ("host", or an experiment's: multi_model_report.EXPERIMENTS)."""
    phase = "four/host" if key == "host" else next((p for p, (k, _) in EXPERIMENTS.items() if k == key), None)
    raw = (doc.get("raw") or {}).get(phase) if phase is not None else None
    return raw if isinstance(raw, dict) else None


def budget(doc: dict[str, Any]) -> dict[str, Any]:
    """Every four-model host run of a multi_model result (the default host and each experiment) and every
    baseline, against the default host's solo numbers."""
    four = doc.get("four") or {}
    host = four.get("host") or {}
    solo = host.get("models") or {}
    if not solo:
        raise ValueError("the result has no four-model host run (four.host.models)")
    runs: dict[str, Any] = {}
    for key, run in four.items():
        if not key.startswith("host") or not isinstance(run, dict) or not run.get("models"):
            continue
        # Each host run's own solo numbers: the experiment may change them too.
        runs[key] = _run(
            {n: _model(m, m["tokens_per_s_together"], m["itl_ms_together"]) for n, m in run["models"].items()},
            _raw_phase(doc, key),
        )
    for key, run in (four.get("baselines") or {}).items():
        rows = run.get("models") if isinstance(run, dict) else None
        if rows and all(n in solo for n in rows):
            runs[f"baseline_{key}"] = _run(
                {n: _model(solo[n], r["tokens_per_s"], r["itl_ms"]) for n, r in rows.items()}
            )
    return {"gpu": doc.get("gpu"), "limit": LIMIT, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    out = {
        "command": "python bench/probes/itl_budget.py " + " ".join(str(p) for p in args.results),
        "results": {str(p): budget(json.loads(p.read_text())) for p in args.results},
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
