"""Ledger: every byte the host placed on each device, by model and kind, reconciled with what the driver reports.

Per device the host may use `capacity = total - reserve`; of that, the CUDA runtime (plan's runtime term) and other
processes (NVML, re-read at each reconciliation) hold their share, and the ledger's entries are the rest:

    free = capacity - runtime - external - placed - drift

`drift` is what the driver says we hold beyond runtime + placed (allocator fragmentation, a library's workspace):
a positive drift shrinks what the coordinator believes is free, so an estimate that was low is corrected at the
next load instead of ending in an out-of-memory error. A negative drift (we hold less than the ledger says) is not
credited: the ledger's entries are reservations (a model's workspace peak may not have happened yet).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from llmhost.memory.plan import DeviceBudget
from llmhost.units import fmt_bytes

KINDS = ("weights", "kv", "workspace", "graphs")


@dataclass(frozen=True)
class Reading:
    """One driver-level observation of a device."""

    used: int  # bytes in use on the device, all processes (cudaMemGetInfo: total - free)
    external: int  # of those, bytes other processes hold (NVML per-process accounting)


@dataclass(frozen=True)
class Reconciliation:
    device: int
    placed: int  # the ledger's bytes for models
    runtime: int  # the plan's runtime term (CUDA context, library workspaces)
    external: int
    driver_used: int

    @property
    def predicted(self) -> int:
        return self.placed + self.runtime + self.external

    @property
    def unexplained(self) -> int:
        """Driver-used bytes the ledger does not account for; negative when we hold less than it says."""
        return self.driver_used - self.predicted

    @property
    def relative_error(self) -> float:
        """(measured - predicted) / measured: the memory-validation figure (target within 2%)."""
        return self.unexplained / self.driver_used if self.driver_used else 0.0


@dataclass
class DeviceLedger:
    index: int
    capacity: int  # total - reserve: bytes the host may see in use on this device, all processes together
    runtime: int
    external: int  # other processes' bytes, as last read
    entries: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> kind -> bytes
    drift: int = 0  # max(0, unexplained) of the last reconciliation
    last: Reconciliation | None = None

    @classmethod
    def from_budget(cls, index: int, budget: DeviceBudget) -> DeviceLedger:
        dev = budget.device
        return cls(index, dev.total - budget.reserve, budget.runtime, dev.external)

    @property
    def placed(self) -> int:
        return sum(sum(kinds.values()) for kinds in self.entries.values())

    @property
    def free(self) -> int:
        return self.capacity - self.runtime - self.external - self.placed - self.drift

    def held_by(self, model: str) -> int:
        return sum(self.entries.get(model, {}).values())

    def place(self, model: str, by_kind: Mapping[str, int]) -> None:
        """Record (or replace) a model's bytes here."""
        bad = set(by_kind) - set(KINDS)
        if bad:
            raise ValueError(f"unknown memory kinds {sorted(bad)}; expected some of {KINDS}")
        if any(b < 0 for b in by_kind.values()):
            raise ValueError(f"negative bytes for {model}: {dict(by_kind)}")
        self.entries[model] = dict(by_kind)

    def release(self, model: str) -> int:
        return sum(self.entries.pop(model, {}).values())

    def reconcile(self, reading: Reading) -> Reconciliation:
        self.external = reading.external
        rec = Reconciliation(self.index, self.placed, self.runtime, reading.external, reading.used)
        self.drift = max(0, rec.unexplained)
        self.last = rec
        return rec

    def describe(self) -> str:
        return (
            f"device {self.index}: {fmt_bytes(self.free)} free of {fmt_bytes(self.capacity)} "
            f"(runtime {fmt_bytes(self.runtime)}, other processes {fmt_bytes(self.external)}, "
            f"models {fmt_bytes(self.placed)}, unexplained {fmt_bytes(self.drift)})"
        )


class Ledger:
    """One DeviceLedger per device of the plan's inventory, plus the host RAM held by parked models."""

    def __init__(self, budgets: tuple[DeviceBudget, ...], park_budget: int) -> None:
        self.devices = [DeviceLedger.from_budget(i, b) for i, b in enumerate(budgets)]
        self.park_budget = park_budget  # bytes of pinned host RAM parked weights may hold
        self.parked: dict[str, int] = {}  # model -> pinned host bytes

    def place(self, model: str, by_device: Mapping[int, Mapping[str, int]]) -> None:
        for d, kinds in by_device.items():
            self.devices[d].place(model, kinds)

    def release(self, model: str) -> int:
        return sum(d.release(model) for d in self.devices)

    def free(self, device: int) -> int:
        return self.devices[device].free

    def held(self, model: str) -> dict[int, int]:
        return {d.index: d.held_by(model) for d in self.devices if model in d.entries}

    @property
    def parked_bytes(self) -> int:
        return sum(self.parked.values())

    @property
    def park_free(self) -> int:
        return self.park_budget - self.parked_bytes
