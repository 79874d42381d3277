"""detect_inventory through a fake NVML: what counts as other processes' memory when this process already holds a
CUDA context (a Python API host started after the caller used the GPU)."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest
import torch

from llmhost.memory.inventory import detect_inventory
from llmhost.units import GiB, MiB


def fake_nvml(used: int, procs: list[tuple[int, int]]) -> SimpleNamespace:
    """One 80 GiB GPU with `used` bytes in use and `procs` (pid, bytes) running on it."""
    return SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: b"NVIDIA H100 80GB HBM3",
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=80 * GiB, used=used),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [SimpleNamespace(pid=p, usedGpuMemory=b) for p, b in procs],
    )


@pytest.fixture
def cuda_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch has initialized CUDA in this process, and its allocator holds 2 GiB."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * GiB)


def test_this_process_context_is_not_other_processes_memory(
    monkeypatch: pytest.MonkeyPatch,
    cuda_here: None,
) -> None:
    # another process holds 10 GiB; this one its 500 MiB context and 2 GiB of torch's allocator; the driver 480 MiB
    other, mine = 10 * GiB, 500 * MiB + 2 * GiB
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(480 * MiB + other + mine, [(1, other), (os.getpid(), mine)]))
    device = detect_inventory().devices[0]
    assert device.external == 480 * MiB + other + 2 * GiB  # the allocator's blocks stay planned around


def test_without_a_context_here_everything_used_is_external(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(11 * GiB, [(1, 10 * GiB)]))
    assert detect_inventory().devices[0].external == 11 * GiB


def test_a_process_nvml_does_not_show_keeps_the_whole_figure(
    monkeypatch: pytest.MonkeyPatch,
    cuda_here: None,
) -> None:
    """In a PID namespace NVML lists no process as this one: nothing can be attributed, so nothing is taken off."""
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(13 * GiB, [(1, 10 * GiB), (2, 2 * GiB)]))
    assert detect_inventory().devices[0].external == 13 * GiB


def test_without_per_process_accounting_keeps_the_whole_figure(
    monkeypatch: pytest.MonkeyPatch,
    cuda_here: None,
) -> None:
    nvml = fake_nvml(13 * GiB, [])

    def refuse(handle: object) -> list[object]:
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

    nvml.nvmlDeviceGetComputeRunningProcesses = refuse
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert detect_inventory().devices[0].external == 13 * GiB
