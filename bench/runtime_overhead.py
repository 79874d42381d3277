"""Measure the per-GPU runtime overhead the planner subtracts: memory a fresh process takes before any model
byte. Driver-level used memory (NVML) is read before CUDA is initialised, after context creation, after bf16/fp16/
fp32 GEMMs (cuBLAS/cuBLASLt handles and workspaces), after a Triton kernel and after SDPA; the tensors themselves
are freed and the caching allocator emptied before each reading, so only runtime state remains.

Usage (on the GPU machine): python bench/runtime_overhead.py [--repeats 3]
Writes bench/results/runtime_overhead-<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Any

from common import gpu_tag, write_result


def child() -> None:
    """Runs in a fresh process (`--child`): Triton needs the kernel's source in a file, not a `-c` string."""
    import pynvml
    import torch
    import triton
    import triton.language as tl

    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)

    def used() -> int:
        return int(pynvml.nvmlDeviceGetMemoryInfo(h).used)

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=m) + 1, mask=m)

    steps = [("before_cuda", used())]
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    steps.append(("context", used()))
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        a = torch.randn(4096, 4096, device="cuda", dtype=dt)
        c = a @ a
        x = torch.randn(8, 4096, device="cuda", dtype=dt)  # decode-shaped GEMMs pick other cuBLASLt kernels
        y = x @ a
        torch.cuda.synchronize()
        del a, c, x, y
        torch.cuda.empty_cache()
        steps.append((f"gemm_{str(dt).split('.')[-1]}", used()))
    t = torch.randn(1 << 20, device="cuda")
    add_one[(1 << 10,)](t, t.numel(), BLOCK=1024)
    torch.cuda.synchronize()
    del t
    torch.cuda.empty_cache()
    steps.append(("triton", used()))
    q = torch.randn(1, 32, 512, 128, device="cuda", dtype=torch.bfloat16)
    o = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.cuda.synchronize()
    del q, o
    torch.cuda.empty_cache()
    steps.append(("sdpa", used()))
    info = {
        "gpu": pynvml.nvmlDeviceGetName(h),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "driver": pynvml.nvmlSystemGetDriverVersion(),
        "total_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
        "steps": steps,
    }
    print(json.dumps(info, default=str))


def run_child() -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child"], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"child failed:\n{out.stderr}")
    doc: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return doc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child()
        return
    runs = [run_child() for _ in range(args.repeats)]
    overheads = []
    for r in runs:
        steps = dict(r["steps"])
        overheads.append(r["steps"][-1][1] - steps["before_cuda"])
    first = runs[0]
    doc = {
        "what": "driver-level memory a fresh process holds after CUDA context + cuBLAS/cuBLASLt (bf16, fp16, fp32 "
        "GEMMs) + a Triton kernel + SDPA, tensors freed and allocator emptied",
        "gpu": str(first["gpu"]),
        "torch": first["torch"],
        "cuda": first["cuda"],
        "triton": first["triton"],
        "driver": str(first["driver"]),
        "total_bytes": first["total_bytes"],
        "runtime_overhead_bytes": max(overheads),
        "runtime_overhead_bytes_median": int(statistics.median(overheads)),
        "runs": [
            {"overhead_bytes": o, "steps_delta_bytes": {k: v - r["steps"][0][1] for k, v in r["steps"]}}
            for o, r in zip(overheads, runs, strict=True)
        ],
        "command": "python bench/runtime_overhead.py --repeats 3",
    }
    write_result("runtime_overhead", gpu_tag(doc["gpu"]), doc)


if __name__ == "__main__":
    main()
