"""Probe: which calls inside the host loop take over 2 ms while four models x eight clients run together
(bench/multi_model.py's "four" scenario, host in this process). The engine's launch-path functions (step inputs,
host-to-device staging, the fused kernels' launchers, FlashAttention, matmuls, scheduling, sampling) are wrapped
with timers; each slow call is counted by name with its largest times. For the stalls the step trace shows in the
first slice of a prompt step's launch (bench/probes/host_trace.py).

Usage: python bench/probes/slow_calls.py [--quick] [--out FILE]"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import multi_model as mm
import torch
import torch.nn.functional as F

from llmhost.engine import engine, sampler, step_inputs
from llmhost.engine.kernels import fused, varlen_attention

SLOW_S = 0.002
slow: dict[str, list[float]] = {}
calls: dict[str, int] = {}
active = [False]


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            took = time.perf_counter() - t
            if active[0]:
                calls[name] = calls.get(name, 0) + 1
                if took > SLOW_S:
                    slow.setdefault(name, []).append(round(1e3 * took, 2))

    return wrapper


def wrap(owner: Any, attr: str, name: str) -> None:
    setattr(owner, attr, timed(name, getattr(owner, attr)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    mode = mm.MODES["quick" if args.quick else "full"]
    wrap(step_inputs.StepInputs, "__init__", "StepInputs()")
    wrap(step_inputs.StepInputs, "to", "StepInputs.to")
    wrap(step_inputs.PinnedStaging, "to_device", "PinnedStaging.to_device")
    for k in ("rope_write_kv", "add_rms_norm", "rms_norm", "silu_mul"):
        wrap(fused, k, f"fused.{k}")
    wrap(varlen_attention, "varlen_attention", "varlen_attention")
    wrap(F, "linear", "F.linear")
    wrap(F, "embedding", "F.embedding")
    wrap(torch.Tensor, "clone", "Tensor.clone")
    wrap(engine.Engine, "schedule", "Engine.schedule")
    wrap(engine.Engine, "collect", "Engine.collect")
    wrap(engine.Engine, "_launch_sample", "Engine._launch_sample")
    wrap(sampler, "_pack", "sampler._pack")

    def on() -> Any:
        active[0] = True

    mm.drive_four(mode, "slow-calls", in_process=True, warm_s=1.0, on_window=on)
    active[0] = False
    doc = {
        "slow_ms": {k: {"n": len(v), "of": calls.get(k, 0), "largest": sorted(v)[-8:]} for k, v in slow.items()},
        "calls": calls,
    }
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
