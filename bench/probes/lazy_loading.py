"""Probe: does a matmul of a shape the process has not run before make the host wait for the GPU? Stream A is
kept busy with ~40 ms of large matmuls; on stream B, F.linear at prompt-step shapes (M tokens x an 8B model's
hidden -> its qkv width) is launched for M values seen for the first time, then again. With CUDA's lazy module
loading (the default) a kernel's first launch loads its module, which may wait for the device.

Usage: CUDA_MODULE_LOADING=LAZY|EAGER python bench/probes/lazy_loading.py"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F


def main() -> None:
    dev = torch.device("cuda")
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    w = torch.randn(6144, 4096, device=dev, dtype=torch.bfloat16)
    x = torch.randn(600, 4096, device=dev, dtype=torch.bfloat16)
    sa, sb = torch.cuda.Stream(), torch.cuda.Stream()
    F.linear(x[:512], w)  # cuBLAS initialized, one shape loaded
    torch.cuda.synchronize()
    rows = []
    for m in (25, 50, 77, 131, 203, 333, 25, 50, 77, 131, 203, 333):
        with torch.cuda.stream(sa):
            for _ in range(30):
                a @ a  # ~40 ms queued
        t = time.perf_counter()
        with torch.cuda.stream(sb):
            F.linear(x[:m], w)
        took = time.perf_counter() - t
        rows.append({"m": m, "launch_ms": round(1e3 * took, 3)})
        torch.cuda.synchronize()
    doc = {"CUDA_MODULE_LOADING": os.environ.get("CUDA_MODULE_LOADING", "(unset: LAZY)"), "launches": rows}
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
