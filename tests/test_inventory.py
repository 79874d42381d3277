"""detect_inventory through a fake NVML: what counts as other processes' memory when this process already holds a
CUDA context (a Python API host started after the caller used the GPU); the GPUs CUDA_VISIBLE_DEVICES shows."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest
import torch

from llmhost.errors import InventoryError
from llmhost.memory.inventory import VISIBLE_ENV, detect_inventory
from llmhost.units import GiB, MiB


def fake_nvml(used: int, procs: list[tuple[int, int]], gpus: int = 1, names: tuple[str, ...] = ()) -> SimpleNamespace:
    """`gpus` GPUs of 80 GiB (NVML index n: UUID GPU-n..., `names[n]` or an H100), each with `used` bytes in use
    and `procs` (pid, bytes) running on it."""
    return SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: gpus,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: (names[h] if names else "NVIDIA H100 80GB HBM3").encode(),
        nvmlDeviceGetUUID=lambda h: f"GPU-{h}{h}{h}{h}abcd-0000",
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=(80 + h) * GiB, used=used),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [SimpleNamespace(pid=p, usedGpuMemory=b) for p, b in procs],
    )


@pytest.fixture(autouse=True)
def every_gpu_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VISIBLE_ENV, raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)


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


@pytest.mark.parametrize(
    ("visible", "nvml"),
    [
        ("2", [2]),
        ("2,0", [2, 0]),  # CUDA's order: cuda:0 is NVML's GPU 2
        ("GPU-1111", [1]),  # a UUID prefix
        ("1, GPU-3333abcd-0000", [1, 3]),
        ("1,7,0", [1]),  # CUDA reads no further than an entry that names no GPU
        ("0,0,1", [0]),  # nor past a duplicate
    ],
)
def test_cuda_visible_devices_renumbers_the_gpus(
    monkeypatch: pytest.MonkeyPatch, visible: str, nvml: list[int]
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(1 * GiB, [], gpus=4))
    monkeypatch.setenv(VISIBLE_ENV, visible)
    inv = detect_inventory()
    assert [(d.index, d.nvml, d.total) for d in inv.devices] == [(i, n, (80 + n) * GiB) for i, n in enumerate(nvml)]
    assert inv.source == "nvml" and inv.note == ""


@pytest.mark.parametrize("visible", ["", "-1", "4", "nonsense", "GPU-"])  # GPU-: a prefix of every UUID
def test_no_visible_gpu_plans_for_the_cpu_and_says_why(monkeypatch: pytest.MonkeyPatch, visible: str) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(1 * GiB, [], gpus=4))
    monkeypatch.setenv(VISIBLE_ENV, visible)
    inv = detect_inventory()
    assert not inv.has_gpus and VISIBLE_ENV in inv.note


def test_a_mig_instance_is_a_typed_error_naming_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(1 * GiB, [], gpus=1))
    monkeypatch.setenv(VISIBLE_ENV, "MIG-0123-4567")
    with pytest.raises(InventoryError, match=r"MIG instance.*--gpus"):
        detect_inventory()


def test_different_gpus_without_pci_order_get_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    names = ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB")
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(1 * GiB, [], gpus=2, names=names))
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in detect_inventory().note
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    assert detect_inventory().note == ""


def test_driver_readings_follow_the_renumbering(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ledger's reconciliations read the GPU the inventory planned (NVML's 2 for cuda:0), not NVML's 0."""
    from llmhost.host.model_runtime import DriverProbe

    nvml = fake_nvml(0, [], gpus=4)
    nvml.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(total=80 * GiB, used=(h + 1) * GiB)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setenv(VISIBLE_ENV, "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    inventory = detect_inventory()
    assert inventory.devices[0].external == 3 * GiB
    reading = DriverProbe(inventory).reading(0)
    assert reading is not None and reading.used == 3 * GiB
