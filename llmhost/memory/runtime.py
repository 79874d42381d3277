"""Per-GPU runtime overhead: memory the process takes before any model byte (CUDA context, cuBLAS and
cuBLASLt workspaces, loaded Triton modules). Measured by bench/runtime_overhead.py per GPU kind and torch version;
the table below holds what bench/results/runtime_overhead-*.json recorded."""

from __future__ import annotations

from llmhost.memory.inventory import Device
from llmhost.units import MiB

# GPU name prefix -> bytes, as measured (see bench/results/runtime_overhead-<gpu>.json).
MEASURED: dict[str, int] = {
    # H100 80GB HBM3, torch 2.11.0+cu130, driver 580.159: context 621 MiB, cuBLAS/cuBLASLt +96 MiB, SDPA +8 MiB.
    "NVIDIA H100": 760_020_992,
    # H200 (141 GB HBM3e), the same torch, CUDA and driver: the same bytes at every step.
    "NVIDIA H200": 760_020_992,
}

# A GPU kind never measured: a CUDA context on recent drivers is 400-600 MiB, cuBLAS workspaces and kernel
# modules add up to ~200 MiB; round up so the plan errs towards fitting.
DEFAULT_GPU_OVERHEAD = 1024 * MiB


def runtime_overhead(device: Device) -> int:
    if device.kind == "cpu":
        return 0  # host RAM for the interpreter and torch is not part of the model budget
    for prefix, measured in MEASURED.items():
        if device.name.startswith(prefix):
            return measured
    return DEFAULT_GPU_OVERHEAD
