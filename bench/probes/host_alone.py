"""Probe: why one model alone on the host decodes ~2% slower than the same engine driven by engine.step()
(bench/results/multi_model-h100.json: the pair's models alone, batch 1). Drives the pair's first model at batch 1
through the host (its own process, step trace on), then through the engine (engine.step(), this process): on the
default stream, again after a GEMM ran on another stream, and on a side stream. Prints tokens/s of each, and for
the host: its decode steps' GPU time (CUDA events), the GPU's busy fraction (their sum over the window) and the
wall time between consecutive collections.

Usage: python bench/probes/host_alone.py [--quick]"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import multi_model as mm

from llmhost.config import HostConfig
from llmhost.host.step_trace import ENV
from llmhost.memory.inventory import detect_inventory

WINDOW_S = 3.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--unsteered", action="store_true", help="[host] sm_steering off: no green contexts made")
    args = ap.parse_args()
    mode = mm.MODES["quick" if args.quick else "full"]
    trace_file = Path(tempfile.mkdtemp()) / "steps.jsonl"
    os.environ[ENV] = str(trace_file)
    d = mm.drivers()
    inventory = detect_inventory()
    model = mode.pair[:1]
    load = mm._loads(mode, model, 1, mode.pair_tokens)[0]
    out: dict[str, object] = {"model": model[0], "sm_steering": not args.unsteered}

    host = HostConfig(sm_steering=not args.unsteered)
    models = mm._host_models(mode, model, mode.pair_tokens, 1, (1.0,))
    run = d.start_host(inventory, host, models, "alone", in_process=False)
    d.drive_host(run, [load], time.monotonic() + 1.0)
    t0 = time.monotonic()
    streams = d.drive_host(run, [load], t0 + WINDOW_S)
    d.stop_host(run)
    host = d.stream_stats(streams, t0 + 0.5, t0 + WINDOW_S)
    trace = [json.loads(line) for line in trace_file.read_text().splitlines()]
    win = [e for e in trace if e["ev"] == "collect" and not e["prefill"] and t0 + 0.5 <= e["t"] < t0 + WINDOW_S]
    gpu = [e["gpu_ms"] for e in win if e["gpu_ms"] is not None]
    gaps = sorted(b["t"] - a["t"] for a, b in itertools.pairwise(win))
    out["host"] = {
        "tokens_per_s": host["tokens_per_s"],
        "steps": len(win),
        "gpu_ms_mean": round(sum(gpu) / max(1, len(gpu)), 4),
        "gpu_busy_fraction": round(sum(gpu) / 1e3 / (WINDOW_S - 0.5), 4),
        "collect_interval_ms_p50": round(1e3 * gaps[len(gaps) // 2], 4) if gaps else None,
        "follows": sum(1 for e in trace if e["ev"] == "launch" and e["follows"] and t0 + 0.5 <= e["t"] < t0 + WINDOW_S),
        # Launches on the default stream, of all since the host started (HostCore._default_stream_ok).
        "default_stream_launches": [
            sum(1 for e in trace if e["ev"] == "launch" and e.get("default_stream")),
            sum(1 for e in trace if e["ev"] == "launch"),
        ],
    }

    spec = mm._engine_specs(mode, model, mode.pair_tokens, 1)[0]
    engine = d.random_engine(*spec)
    d.warm_engine(engine, load)
    t0 = time.monotonic()
    streams = d.drive_engine(engine, load, t0 + WINDOW_S, 0)
    out["engine"] = {"tokens_per_s": d.stream_stats(streams, t0 + 0.5, t0 + WINDOW_S)["tokens_per_s"]}
    if engine.device.type == "cuda":
        # Before HostCore._default_stream_ok the host ran every step on side streams. Measured here: the same
        # engine on the default stream slows by ~2% for the rest of the process once a GEMM ran on another stream
        # (a default-stream GEMM, a trivial side-stream kernel or emptying the allocator's cache do not do it or
        # undo it).
        a = torch.randn(4096, 4096, device=engine.device, dtype=torch.bfloat16)
        with torch.cuda.stream(torch.cuda.Stream(engine.device)):  # type: ignore[no-untyped-call]
            for _ in range(10):
                a @ a
        torch.cuda.synchronize()
        t0 = time.monotonic()
        streams = d.drive_engine(engine, load, t0 + WINDOW_S, 0)
        out["engine_after_a_side_stream_gemm"] = d.stream_stats(streams, t0 + 0.5, t0 + WINDOW_S)["tokens_per_s"]
        with torch.cuda.stream(torch.cuda.Stream(engine.device, priority=-1)):  # type: ignore[no-untyped-call]
            t0 = time.monotonic()
            streams = d.drive_engine(engine, load, t0 + WINDOW_S, 0)
        out["engine_on_a_side_stream"] = d.stream_stats(streams, t0 + 0.5, t0 + WINDOW_S)["tokens_per_s"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
