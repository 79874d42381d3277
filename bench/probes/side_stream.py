"""Probe: what makes one model's decode ~2% slower for the rest of a process once a GEMM ran on a side stream
(bench/probes/host_alone.py found it on the H100: why a model alone on the host is slower than engine.step(), and
the host's pair bandwidth the ~2% short of the threads baseline on the H200, bench/results/multi_model-h200.json).

Each variant is a fresh process: Mistral-7B-shaped random weights at batch 1 driven by engine.step() for WINDOW_S
(before), then the variant's action, then WINDOW_S again (after); after / before is the variant's effect, the
"nothing" variant the drift of two windows. The SM clock (NVML) is read with each window, to tell a clock drop
from a slower kernel path.

Usage: python bench/probes/side_stream.py [--quick]; writes bench/results/side_stream-<gpu>.json."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WINDOW_S = 2.5
# variant -> (environment it runs with, the action between the windows)
VARIANTS: dict[str, tuple[dict[str, str], str]] = {
    "nothing": ({}, "none"),
    "10 GEMMs on the default stream": ({}, "gemm-default"),
    "10 GEMMs on a side stream": ({}, "gemm-side"),
    "10 GEMMs on a high-priority side stream": ({}, "gemm-side-high"),
    "a large elementwise op on a side stream (no cuBLAS)": ({}, "add-side"),
    "10 GEMMs on a side stream, cuBLAS workspace 0": ({"CUBLAS_WORKSPACE_CONFIG": ":0:0"}, "gemm-side"),
    "10 GEMMs on a side stream, cuBLASLt's own workspace": ({"TORCH_CUBLASLT_UNIFIED_WORKSPACE": "0"}, "gemm-side"),
    "10 GEMMs on a side stream, preferred BLAS cublaslt": ({}, "gemm-side-lt"),
    "decode itself moved to a side stream (nothing else)": ({}, "decode-side"),
}


def sm_clock_mhz() -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return int(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
    except Exception:
        return None


def worker(action: str, quick: bool) -> dict[str, Any]:
    import multi_model as mm
    import torch

    if action == "gemm-side-lt":
        torch.backends.cuda.preferred_blas_library("cublaslt")
    mode = mm.MODES["quick" if quick else "full"]
    d = mm.drivers()
    model = mode.pair[:1]
    load = mm._loads(mode, model, 1, mode.pair_tokens)[0]
    engine = d.random_engine(*mm._engine_specs(mode, model, mode.pair_tokens, 1)[0])
    d.warm_engine(engine, load)
    stream: torch.cuda.Stream | None = None

    def window() -> dict[str, Any]:
        with torch.cuda.stream(stream or torch.cuda.current_stream()):
            t0 = time.monotonic()
            streams = d.drive_engine(engine, load, t0 + WINDOW_S, 0)
        stats = d.stream_stats(streams, t0 + 0.5, t0 + WINDOW_S)
        return {"tokens_per_s": stats["tokens_per_s"], "sm_clock_mhz": sm_clock_mhz()}

    before = window()
    dev = engine.device
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    if action.startswith("gemm"):
        side = action != "gemm-default"
        priority = -1 if action == "gemm-side-high" else 0
        st = torch.cuda.Stream(dev, priority=priority) if side else torch.cuda.current_stream()  # type: ignore[no-untyped-call]
        with torch.cuda.stream(st):
            for _ in range(10):
                a @ a
    elif action == "add-side":
        big = torch.randn(256 * 2**20, device=dev, dtype=torch.bfloat16)
        with torch.cuda.stream(torch.cuda.Stream(dev)):  # type: ignore[no-untyped-call]
            for _ in range(10):
                big.add_(1.0)
    elif action == "decode-side":
        stream = torch.cuda.Stream(dev, priority=-1)  # type: ignore[no-untyped-call]
    torch.cuda.synchronize()
    after = window()
    ratio = after["tokens_per_s"] / before["tokens_per_s"] if before["tokens_per_s"] else None
    return {"before": before, "after": after, "after_over_before": round(ratio, 4) if ratio else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", help="run one variant's action in this process (internal)")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.quick)))
        return
    import torch
    from common import gpu_tag, write_result

    doc: dict[str, Any] = {"bench": "bench/probes/side_stream.py", "gpu": torch.cuda.get_device_name(),
                           "window_s": WINDOW_S, "variants": {}}  # fmt: skip
    for label, (env, action) in VARIANTS.items():
        cmd = [sys.executable, __file__, "--worker", action] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
        lines = proc.stdout.strip().splitlines()
        try:
            doc["variants"][label] = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            doc["variants"][label] = {"failed": proc.returncode, "stderr": proc.stderr[-800:]}
        print(label, doc["variants"][label], file=sys.stderr, flush=True)
    write_result("side_stream", gpu_tag(torch.cuda.get_device_name()), doc)


if __name__ == "__main__":
    main()
