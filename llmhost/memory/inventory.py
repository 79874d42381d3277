"""The devices a plan targets: real GPUs read through NVML, a simulated list (`2x24GiB,1x80GiB`), or the CPU."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmhost.errors import InventoryError
from llmhost.units import parse_size

DeviceKind = Literal["cuda", "cpu"]


@dataclass(frozen=True)
class Device:
    index: int
    name: str  # e.g. "NVIDIA H100 80GB HBM3"; keys the runtime-overhead table
    total: int  # bytes of device memory
    external: int = 0  # bytes others hold now (NVML; this process's allocator too): planned around, not ours
    kind: DeviceKind = "cuda"
    # NVML's index of this GPU where CUDA_VISIBLE_DEVICES renumbers them (`index` is CUDA's and torch's); None: the
    # same as `index`.
    nvml_index: int | None = None

    @property
    def nvml(self) -> int:
        return self.index if self.nvml_index is None else self.nvml_index

    @property
    def label(self) -> str:
        return "cpu" if self.kind == "cpu" else f"GPU {self.index}"

    @property
    def torch_name(self) -> str:
        """The torch device string engines on it use ("cpu", "cuda:1"), as ModelStatus.device reports it."""
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


@dataclass(frozen=True)
class Inventory:
    devices: tuple[Device, ...]
    source: Literal["nvml", "simulated", "cpu"]
    note: str = ""  # said to the user, e.g. why there are no GPUs

    @property
    def has_gpus(self) -> bool:
        return any(d.kind == "cuda" for d in self.devices)


VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"
_NO_GPU = "no NVIDIA GPU found: planning for the CPU (simulate GPUs with --gpus 2x24GiB,1x80GiB)"
_SPEC_RE = re.compile(r"^\s*(?:(\d+)\s*x\s*)?(\S+?)\s*$")


def parse_gpu_spec(spec: str) -> Inventory:
    """'2x24GiB,1x80GiB' -> three simulated GPUs 0, 1, 2 (a bare '80GiB' means one)."""
    devices: list[Device] = []
    for part in spec.split(","):
        m = _SPEC_RE.match(part)
        if not part.strip() or m is None:
            raise InventoryError(f"--gpus {spec!r}: expected 'auto' or a list like '2x24GiB,1x80GiB'")
        count = int(m.group(1) or 1)
        try:
            size = parse_size(m.group(2))
        except ValueError as e:
            raise InventoryError(f"--gpus {spec!r}: {e}") from None
        if count <= 0 or size <= 0:
            raise InventoryError(f"--gpus {spec!r}: counts and sizes must be positive")
        for _ in range(count):
            devices.append(Device(index=len(devices), name=f"simulated {m.group(2)}", total=size))
    return Inventory(tuple(devices), "simulated")


def detect_inventory() -> Inventory:
    """Real GPUs through NVML; on a machine without them, one CPU device sized from host RAM."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no library, no driver, or no GPU: all mean "plan for the CPU"
        return cpu_inventory(_NO_GPU)
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            return cpu_inventory(_NO_GPU)
        spec = os.environ.get(VISIBLE_ENV)
        visible = _visible(pynvml, count, spec)
        if not visible:
            return cpu_inventory(f"{VISIBLE_ENV}={spec!r} leaves no GPU visible: planning for the CPU")
        devices = []
        for i, n in enumerate(visible):
            h = pynvml.nvmlDeviceGetHandleByIndex(n)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            devices.append(
                Device(
                    index=i,
                    name=_text(pynvml.nvmlDeviceGetName(h)),
                    total=int(mem.total),
                    external=int(mem.used) - _own_context(pynvml, n, i),
                    nvml_index=n if n != i else None,
                )
            )
        note = ""
        if len({d.name for d in devices}) > 1 and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
            note = (
                "the GPUs differ and CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA may number them fastest first, "
                "not as NVML does; set CUDA_DEVICE_ORDER=PCI_BUS_ID so that GPU numbers mean the same GPUs"
            )
        return Inventory(tuple(devices), "nvml", note)
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _visible(pynvml: Any, count: int, spec: str | None) -> list[int]:
    """NVML indices of the GPUs CUDA shows this process, in CUDA's order: all of them without CUDA_VISIBLE_DEVICES;
    else its entries, GPU indices or (prefixes of) GPU UUIDs, up to the first that names no GPU, a duplicate
    included (where CUDA stops reading it too). Planning every GPU of the machine placed models on GPUs this process
    cannot use. MIG instances raise InventoryError: their memory is not the GPU's."""
    if spec is None:
        return list(range(count))
    entries = [e.strip() for e in spec.split(",")]
    uuids: dict[int, str] = {}
    if not all(e.isdigit() for e in entries):
        for n in range(count):
            try:
                uuids[n] = _text(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(n)))
            except Exception:  # a GPU NVML cannot name: no UUID entry matches it
                continue
    out: list[int] = []
    for entry in entries:
        if entry.startswith("MIG-"):
            raise InventoryError(
                f"{VISIBLE_ENV} names a MIG instance ({entry}); llmhost plans whole GPUs: list GPU indices or "
                "GPU- UUIDs, or describe the instance with --gpus (e.g. --gpus 1x40GiB)"
            )
        if entry.isdigit():
            found = [int(entry)] if int(entry) < count else []
        else:
            found = [n for n, u in uuids.items() if entry and u.startswith(entry)]
        if len(found) != 1 or found[0] in out:
            break
        out.append(found[0])
    return out


def nvml_processes(pynvml: Any, nvml_index: int) -> list[tuple[int, int]] | None:
    """(pid, bytes) of each compute process NVML lists on its GPU `nvml_index`; None where it keeps no
    per-process accounting."""
    try:
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(nvml_index))
    except Exception:
        return None
    return [(int(p.pid), int(p.usedGpuMemory or 0)) for p in procs]


def _own_context(pynvml: Any, nvml_index: int, index: int) -> int:
    """Of device `index`'s (NVML's `nvml_index`) used bytes, those of this process that are neither another
    process's nor held by torch's allocator: its CUDA context, which the plan's runtime term already counts. 0
    unless torch initialized CUDA in this process (a Python API host started after the caller used the GPU) and
    NVML shows this process.

    Why: counted in `external` as well, the context was planned twice: after every load of bench/host_correctness.py
    on the H200 the ledger read ~0.9 GiB above the driver ("driver reports 1.63 GiB used, the ledger predicts 2.57
    GiB"): the context (621 MiB on the H100) is most of it, the rest the 1 GiB default runtime term of a GPU
    without a measured one. With this, the same run read 1.63 GiB against 1.80 (the H200 had no measured runtime
    term yet; bench/results/host_correctness-h200.json's run of 2026-12-05). The allocator's bytes stay external
    (conservative: its cached blocks are reused by the host's loads only where they fit). Not covered: another
    library's allocations in this process, which NVML cannot tell from the context, are taken for it (start the
    host before them)."""
    torch = sys.modules.get("torch")  # not imported: then CUDA was not initialized through it
    if torch is None or not torch.cuda.is_initialized() or index >= torch.cuda.device_count():
        return 0
    procs = nvml_processes(pynvml, nvml_index)
    if procs is None:  # no per-process accounting: keep the whole figure
        return 0
    me = os.getpid()
    mine = [used for pid, used in procs if pid == me]
    if not mine:  # this process invisible to NVML (a PID namespace): nothing can be attributed
        return 0
    return max(0, sum(mine) - int(torch.cuda.memory_reserved(index)))


def cpu_inventory(note: str = "") -> Inventory:
    total, available = host_memory()
    cpu = Device(index=0, name="cpu", total=total, external=total - available, kind="cpu")
    return Inventory((cpu,), "cpu", note)


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of host RAM: MemTotal and MemAvailable (Linux); elsewhere a conservative 8 GiB of
    which all is free."""
    try:
        fields = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0]) * 1024  # the file counts kB (KiB)
        return fields["MemTotal"], fields["MemAvailable"]
    except (OSError, KeyError, ValueError, IndexError):
        return 8 * 1024**3, 8 * 1024**3
