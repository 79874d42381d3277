"""Probe: can CUDA stream priorities steer how two models decoding at once share the GPU's bandwidth, without
holding either back? The pair of bench/multi_model.py (Mistral-7B + Qwen2.5-14B shapes, batch 1, one thread each
on its own stream, as its threads baseline) with each combination of stream priorities: each model's tokens/s,
its normalized speed (together / alone) and the combined effective bandwidth. The host's fair sharing holds the
model ahead of its share back (launch_ok), which leaves the other's stream alone on the GPU; if priorities move
the split, the host could steer with them instead.

Usage: python bench/probes/stream_priority.py [--quick] [--out FILE]"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import multi_model as mm

WARM_S = 1.0
WINDOW_S = 4.0
PRIORITIES = [(0, 0), (-1, 0), (-2, 0), (0, -1), (0, -2), (-1, -1)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    mode = mm.MODES["quick" if args.quick else "full"]
    d = mm.drivers()
    models = mode.pair
    loads = mm._loads(mode, models, 1, mode.pair_tokens)
    engines = [d.random_engine(*spec) for spec in mm._engine_specs(mode, models, mode.pair_tokens, 1)]
    for e, load in zip(engines, loads, strict=True):
        d.warm_engine(e, load)
    out: dict[str, object] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "models": models}
    alone = {}
    for e, load, m in zip(engines, loads, models, strict=True):  # each alone on a side stream of priority 0
        t0 = time.monotonic() + 0.1
        streams = d.drive_threads([e], [load], t0, t0 + WARM_S + WINDOW_S)
        alone[m] = mm._per_model(mode, (m,), streams, t0 + WARM_S, t0 + WARM_S + WINDOW_S, 1)[m]["tokens_per_s"]
    out["alone_tokens_per_s"] = alone
    runs = []
    for prios in PRIORITIES:
        t0 = time.monotonic() + 0.2
        streams = d.drive_threads(engines, loads, t0, t0 + WARM_S + WINDOW_S, priorities=prios)
        per = mm._per_model(mode, models, streams, t0 + WARM_S, t0 + WARM_S + WINDOW_S, 1)
        row = {
            "priorities": prios,
            "combined_bandwidth_GBps": round(sum(p["effective_bandwidth_GBps"] for p in per.values()), 1),
            "normalized": {m: round(per[m]["tokens_per_s"] / alone[m], 4) for m in models},
            "p99_itl_ms": {m: per[m]["itl_ms"]["p99"] for m in models},
        }
        runs.append(row)
        print(json.dumps(row), flush=True)
    out["runs"] = runs
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
