"""Coordinator: which models are resident, parked or unloaded, and every load, park and eviction, accounted in the
ledger. It decides; a `ModelRuntime` does the tensor work (real engines in host/model_runtime.py, fakes in tests).

Residency rules:
- A model is loaded where the plan put it. Before it loads, its planned bytes are placed in the ledger (a
  reservation); after, the ledger holds what was measured, and each device is reconciled with the driver.
- When a device is short, the coordinator frees the least valuable memory first: models whose keep_alive expired,
  then the lowest priority, then the least recently used. Pinned models (keep_alive = -1) and models with work in
  flight are never evicted; when only they could make room, the load waits (`Residency.BLOCKED`) rather than fail.
  A load never evicts anything unless the evictions together make it fit.
- An evicted model is parked (weights to pinned host RAM, within the park budget; the least recently used parked
  models are dropped first to make room) or, when it cannot be parked, unloaded.
- A failed load or unpark rolls back completely: the ledger returns to its entries before the attempt, the
  runtime releases whatever it had allocated, and every other model is untouched.
"""

from __future__ import annotations

import enum
import logging
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

from llmhost.config import ModelConfig
from llmhost.errors import LlmhostError
from llmhost.host.ledger import Ledger, Reading
from llmhost.host.messages import ModelState
from llmhost.memory.estimate import ModelSpec
from llmhost.memory.history import History
from llmhost.memory.inventory import Inventory
from llmhost.memory.plan import ModelPlan, Plan
from llmhost.memory.planner import PlanInfeasible, plan_models
from llmhost.units import fmt_bytes

log = logging.getLogger("llmhost.host")

ByDevice = dict[int, dict[str, int]]  # device index -> memory kind -> bytes
REFRESH_BLOCKED_S = 1.0  # a load that does not fit re-reads the devices at most this often


class Residency(enum.Enum):
    READY = "ready"  # resident now
    BLOCKED = "blocked"  # memory is held by busy or pinned models: try again when one goes idle


class LoadFailed(LlmhostError):
    """A model could not be loaded or swapped back; its slot says why."""


@dataclass
class Slot:
    """One configured model: where the plan puts it, its state, and what the runtime keeps for it."""

    config: ModelConfig
    plan: ModelPlan
    device_names: tuple[str, ...]  # torch device of each stage, e.g. ("cuda:0",) or ("cpu",)
    state: ModelState = "unloaded"
    since: float = 0.0  # wall-clock time the state began
    last_used: float = 0.0  # monotonic time of the last request or step
    error: str = ""
    engine: Any = None  # the runtime's resident model (an Engine), None unless loaded
    parked: Any = None  # the runtime's parked copy (pinned host tensors), None unless parked
    loads: int = 0
    swaps_in: int = 0
    last_swap_s: float | None = None  # seconds the last unpark took
    last_load_s: float | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def pinned(self) -> bool:
        return self.config.keep_alive_s < 0

    def planned(self) -> ByDevice:
        """The plan's bytes per device and kind: what a load reserves before it starts."""
        out: ByDevice = {}
        for s in self.plan.stages:
            kinds = out.setdefault(s.device, {"weights": 0, "kv": 0, "workspace": 0, "graphs": 0})
            kinds["weights"] += s.need.weights
            kinds["kv"] += s.need.kv
            kinds["workspace"] += s.need.workspace
            kinds["graphs"] += s.need.graphs
        return out

    def planned_weights(self) -> int:
        return sum(s.need.weights for s in self.plan.stages)


class ModelRuntime(Protocol):
    """The tensor work behind the coordinator's decisions. Every method either succeeds or raises having released
    what it allocated (the coordinator then rolls the ledger back)."""

    def load(self, slot: Slot) -> None:
        """Read the checkpoint onto the slot's devices; set slot.engine."""

    def park(self, slot: Slot) -> int:
        """Free the resident model's device memory, first copying its weights to pinned host RAM unless
        slot.parked already holds them; set slot.parked; return the host bytes it holds."""

    def unpark(self, slot: Slot) -> None:
        """Copy a parked model back to its devices (slot.parked stays valid for the next park)."""

    def release(self, slot: Slot) -> None:
        """Free the device memory of a resident model (slot.engine = None)."""

    def drop_parked(self, slot: Slot) -> None:
        """Free the pinned host copy (slot.parked = None); a parked slot's engine goes with it."""

    def measure(self, slot: Slot) -> ByDevice:
        """Bytes the resident model holds, per device and kind (workspace: reserved, not yet seen, may be 0)."""

    def reading(self, device: int) -> Reading | None:
        """The driver's view of a device; None where there is none (the CPU, a simulated GPU)."""

    def can_park(self) -> bool:
        """Whether parking frees anything (not on the CPU, where the device is host RAM)."""


@dataclass
class Event:
    """Something the coordinator did, for logs, /admin/ps and the benches."""

    when: float
    model: str
    action: str  # load, unpark, park, unload, drop_host_copy, failed
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Coordinator:
    slots: dict[str, Slot]  # in the plan's load order
    ledger: Ledger
    runtime: ModelRuntime
    busy: Callable[[str], bool]  # work in flight or queued for this model: never evict it
    on_loaded: Callable[[Slot, ByDevice], None] = lambda slot, measured: None  # e.g. record in history
    clock: Callable[[], float] = time.monotonic
    events: list[Event] = field(default_factory=list)
    next_refresh: float = 0.0  # clock time from which a blocked load may re-read the devices again

    # -- residency ----------------------------------------------------------------------------------------------

    def touch(self, name: str) -> None:
        self.slots[name].last_used = self.clock()

    def ensure_resident(self, name: str) -> Residency:
        """Make `name` resident (load or unpark it, evicting others if needed), or say it must wait.
        Raises LoadFailed when the load itself fails; the slot is then "failed" (unparked: back to "parked")."""
        slot = self.slots[name]
        if slot.state == "loaded":
            return Residency.READY
        need = slot.planned()
        victims = self._victims(slot, need)
        if victims is None and self.clock() >= self.next_refresh:
            # Fixed: the drift (driver-used bytes the ledger cannot explain, e.g. another process still freeing its
            # memory at the last reconciliation) was re-read only at a load, park or unload, so a load it blocked
            # waited forever (seen on the lent H100). Re-read the devices, at most once a second, and decide again.
            self.next_refresh = self.clock() + REFRESH_BLOCKED_S
            self._reconcile(list(need))
            victims = self._victims(slot, need)
        if victims is None:
            return Residency.BLOCKED
        for v in victims:
            self.evict(v.name, "to make room for " + name)
        return self._bring_in(slot, need)

    def _victims(self, slot: Slot, need: ByDevice) -> list[Slot] | None:
        """The fewest, least valuable resident models whose eviction makes `need` fit on every device; [] when it
        fits already; None when even evicting every evictable model would not be enough."""
        short = {d: sum(k.values()) - self.ledger.free(d) for d, k in need.items()}
        if all(s <= 0 for s in short.values()):
            return []
        now = self.clock()
        candidates = sorted(
            (
                s
                for s in self.slots.values()
                if s is not slot and s.state == "loaded" and not s.pinned and not self.busy(s.name)
            ),
            key=lambda s: (not self._expired(s, now), s.config.priority, s.last_used),
        )
        chosen: list[Slot] = []
        for c in candidates:
            if all(s <= 0 for s in short.values()):
                break
            held = self.ledger.held(c.name)
            if not any(held.get(d, 0) > 0 and s > 0 for d, s in short.items()):
                continue  # frees nothing where memory is short
            chosen.append(c)
            for d, b in held.items():
                if d in short:
                    short[d] -= b
        return chosen if all(s <= 0 for s in short.values()) else None

    def _expired(self, slot: Slot, now: float) -> bool:
        return not slot.pinned and now - slot.last_used > slot.config.keep_alive_s

    def _bring_in(self, slot: Slot, need: ByDevice) -> Residency:
        swap = slot.state == "parked"
        before = {d.index: dict(d.entries) for d in self.ledger.devices}
        self.ledger.place(slot.name, need)  # the reservation: nothing else can claim this memory meanwhile
        slot.state, slot.since, slot.error = "loading", time.time(), ""
        t0 = time.perf_counter()
        failure: Exception | None = None
        try:
            if swap:
                self.runtime.unpark(slot)
            else:
                self.runtime.load(slot)
        except Exception as e:  # an OOM or a corrupt file: roll back and keep every other model serving
            failure = e
        if failure is not None:
            # Outside the except clause, with the traceback's frames cleared: their locals (a half-built model,
            # its KV pools) would otherwise stay alive through the rollback, and the reconciliation below would
            # count them as drift (tests/test_host_stress.py found it).
            traceback.clear_frames(failure.__traceback__)
            self._roll_back(slot, swap, before, failure, time.perf_counter() - t0)
        seconds = time.perf_counter() - t0
        measured = self.runtime.measure(slot)
        # The ledger holds the measured workspace where the runtime measured one (it ran the largest step at the
        # deepest position at load); elsewhere the plan's figure stays reserved.
        entries = {
            dev: {**kinds, "workspace": kinds.get("workspace", 0) or need.get(dev, {}).get("workspace", 0)}
            for dev, kinds in measured.items()
        }
        self.ledger.release(slot.name)
        self.ledger.place(slot.name, entries)
        if swap:  # the host copy stays (and stays counted): parking again needs no copy
            slot.swaps_in += 1
            slot.last_swap_s = seconds
        else:
            slot.loads += 1
            slot.last_load_s = seconds
        slot.state, slot.since = "loaded", time.time()
        slot.last_used = self.clock()
        self._reconcile(slot.plan.devices)
        self.events.append(Event(time.time(), slot.name, "unpark" if swap else "load", seconds))
        self.on_loaded(slot, measured)
        return Residency.READY

    def _roll_back(
        self, slot: Slot, swap: bool, before: dict[int, dict[str, dict[str, int]]], e: Exception, seconds: float
    ) -> NoReturn:
        """Undo a failed load or swap-in: the engine released, the host copy of a failed swap-in dropped, the
        ledger as it was before, reconciled with the driver; raises LoadFailed."""
        # str(e), not e: a log handler keeping records would keep the exception, and through it the model.
        log.error("%s %s failed: %s", "swapping in" if swap else "loading", slot.name, str(e))
        self.runtime.release(slot)
        if slot.parked is not None:
            self.runtime.drop_parked(slot)
        self.ledger.parked.pop(slot.name, None)
        for d in self.ledger.devices:
            d.entries = before[d.index]
        self._reconcile(slot.plan.devices)
        slot.state, slot.error, slot.since = "failed", str(e), time.time()
        self.events.append(Event(time.time(), slot.name, "failed", seconds, str(e)))
        raise LoadFailed(f"model '{slot.name}' could not be {'swapped in' if swap else 'loaded'}: {e}") from e

    def evict(self, name: str, why: str = "") -> None:
        """Free a resident model's device memory: park it when parking helps and the budget allows, else unload."""
        slot = self.slots[name]
        if slot.state != "loaded":
            return
        if self.runtime.can_park() and self._make_park_room(slot):
            t0 = time.perf_counter()
            host_bytes = self.runtime.park(slot)
            self.ledger.parked[name] = host_bytes
            self.ledger.release(name)
            slot.state, slot.since = "parked", time.time()
            self.events.append(Event(time.time(), name, "park", time.perf_counter() - t0, why))
        else:
            self.unload(name, why)
            return
        self._reconcile(slot.plan.devices)

    def _make_park_room(self, slot: Slot) -> bool:
        """Drop the least recently used other host copies until `slot`'s fits the park budget (a copy it already
        has needs no room)."""
        if slot.parked is not None:
            return True
        need = slot.planned_weights()
        if need > self.ledger.park_budget:
            return False
        others = sorted((s for s in self.slots.values() if s.parked is not None and s is not slot), key=_lru)
        for other in others:
            if self.ledger.park_free >= need:
                break
            self._drop_host_copy(other, "to park " + slot.name)
        return self.ledger.park_free >= need

    def _drop_host_copy(self, slot: Slot, why: str) -> None:
        """Free a model's pinned host copy; a parked model is then unloaded (it has nothing to come back from)."""
        was_parked = slot.state == "parked"
        self.runtime.drop_parked(slot)
        self.ledger.parked.pop(slot.name, None)
        if was_parked:
            slot.state, slot.since = "unloaded", time.time()
        self.events.append(Event(time.time(), slot.name, "drop_host_copy", 0.0, why))

    def unload(self, name: str, why: str = "") -> None:
        """Free everything the model holds, device and host."""
        slot = self.slots[name]
        if slot.engine is not None:
            self.runtime.release(slot)
        if slot.parked is not None:
            self.runtime.drop_parked(slot)
        self.ledger.release(name)
        self.ledger.parked.pop(name, None)
        slot.state, slot.since, slot.error = "unloaded", time.time(), ""
        self.events.append(Event(time.time(), name, "unload", 0.0, why))
        self._reconcile(slot.plan.devices)

    def expire(self) -> list[str]:
        """Park (or unload) idle resident models whose keep_alive ran out; returns their names."""
        now = self.clock()
        gone = [
            s.name
            for s in self.slots.values()
            if s.state == "loaded" and self._expired(s, now) and not self.busy(s.name)
        ]
        for name in gone:
            self.evict(name, "keep_alive expired")
        return gone

    def _reconcile(self, devices: Sequence[int]) -> None:
        for d in set(devices):
            reading = self.runtime.reading(d)
            if reading is not None:
                rec = self.ledger.devices[d].reconcile(reading)
                if abs(rec.relative_error) > 0.02:
                    log.warning(
                        "device %d: driver reports %s used, the ledger predicts %s (%+.1f%%)",
                        d,
                        fmt_bytes(rec.driver_used),
                        fmt_bytes(rec.predicted),
                        100 * rec.relative_error,
                    )


# -- the initial placement ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Residencies:
    """Where every model goes: `resident` is the plan loaded at start (all of it fits at once); each model in
    `on_demand` fits alone where its own plan puts it and is loaded when a request asks for it, evicting others."""

    resident: Plan
    on_demand: Mapping[str, ModelPlan]

    def model_plan(self, name: str) -> ModelPlan:
        for m in self.resident.models:
            if m.name == name:
                return m
        return self.on_demand[name]


def _lru(slot: Slot) -> float:
    return slot.last_used


def plan_residencies(
    specs: Sequence[ModelSpec], inventory: Inventory, host_config: Any, history: History | None = None
) -> Residencies:
    """All models at once when they fit (the normal plan). Otherwise the longest prefix in config order that fits
    at once is loaded at start, and every other model is planned alone (it must fit by itself, pinned models'
    memory aside) and swapped in on demand. A model that fits nowhere even alone raises the planner's
    PlanInfeasible with its remedies, as `llmhost plan` does."""
    try:
        return Residencies(plan_models(specs, inventory, host_config, history), {})
    except PlanInfeasible:
        pass
    k = len(specs) - 1
    while k > 0:
        try:
            resident = plan_models(specs[:k], inventory, host_config, history)
            break
        except PlanInfeasible:
            k -= 1
    else:
        resident = plan_models(specs[:1], inventory, host_config, history)
        k = 1
    pinned = [s for s in specs[:k] if s.config.keep_alive_s < 0]
    on_demand: dict[str, ModelPlan] = {}
    for spec in specs[k:]:
        if spec.config.kv_tokens == "fill":
            raise LlmhostError(
                f"model '{spec.name}': kv_tokens = 'fill' needs the model loaded at start, but the models before it "
                "fill the GPUs; give it a fixed kv_tokens or list it earlier in the config"
            )
        if spec.config.keep_alive_s < 0:
            raise LlmhostError(
                f"model '{spec.name}' is pinned (keep_alive = -1) but does not fit beside the models before it; "
                "list pinned models first or give it a keep_alive"
            )
        alone = plan_models([*pinned, spec], inventory, host_config, history)
        on_demand[spec.name] = next(m for m in alone.models if m.name == spec.name)
    return Residencies(resident, on_demand)
