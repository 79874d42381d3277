"""Coordinator and ledger with a fake runtime on a simulated inventory: residency, eviction order, keep_alive,
pinning, parking budget, rollback after an injected load failure. The fake driver counts the bytes the fake
runtime holds, so reconciliation and rollback are checked against a "driver", not against the ledger itself."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from llmhost.config import HostConfig, ModelConfig
from llmhost.host.coordinator import (
    ByDevice,
    Coordinator,
    LoadFailed,
    Residency,
    Slot,
    plan_residencies,
)
from llmhost.host.ledger import DeviceLedger, Ledger, Reading
from llmhost.memory.estimate import ModelSpec
from llmhost.memory.inventory import Device, parse_gpu_spec
from llmhost.memory.plan import DeviceBudget
from llmhost.model_files.shape import ModelShape

GiB = 1024**3
# A 14B-like shape at a size that keeps the arithmetic readable: ~29.5 GB of bf16 weights.
BIG = ModelShape("qwen2", 48, 5120, 40, 8, 128, 13824, 152064, False, 32768, rope_theta=1e6, qkv_bias=True)
SMALL = ModelShape("llama", 16, 2048, 32, 8, 64, 8192, 128256, True, 8192, rope_theta=500000.0)
RUNTIME_EXTERNAL = 3 * GiB  # what the fake driver shows before any model: context + other processes


def cfg(name: str, **kw: object) -> ModelConfig:
    base = ModelConfig(name=name, path=Path("/fake") / name, dtype="bfloat16", max_seq_len=2048, max_batch=4)
    return replace(base, **kw)  # type: ignore[arg-type]


class FakeRuntime:
    """Holds byte counts instead of tensors; the fake driver sees RUNTIME_EXTERNAL plus what it holds."""

    def __init__(self, park_ok: bool = True) -> None:
        self.alloc: dict[str, dict[int, int]] = {}  # model -> device -> bytes held there
        self.fail_next: str | None = None
        self.park_ok = park_ok
        self.copies = 0  # device -> host copies actually made

    def _hold(self, slot: Slot, fraction: float = 1.0) -> None:
        # weights, KV and graphs are allocated at load; workspace only when the largest step runs
        self.alloc[slot.name] = {
            d: int((k["weights"] + k["kv"] + k["graphs"]) * fraction) for d, k in slot.planned().items()
        }

    def held(self, device: int) -> int:
        return sum(by.get(device, 0) for by in self.alloc.values())

    def load(self, slot: Slot) -> None:
        slot.engine = {"name": slot.name}
        if self.fail_next == "load":
            self.fail_next = None
            self._hold(slot, 0.5)  # half-loaded when it fails
            raise RuntimeError("CUDA out of memory (injected)")
        self._hold(slot)

    def park(self, slot: Slot) -> int:
        if slot.parked is None:
            self.copies += 1
            slot.parked = slot.planned_weights()
        self.alloc.pop(slot.name)
        return int(slot.parked)

    def unpark(self, slot: Slot) -> None:
        if self.fail_next == "unpark":
            self.fail_next = None
            self._hold(slot, 0.25)
            raise RuntimeError("CUDA out of memory (injected)")
        self._hold(slot)

    def release(self, slot: Slot) -> None:
        self.alloc.pop(slot.name, None)
        slot.engine = None

    def drop_parked(self, slot: Slot) -> None:
        slot.parked = None
        if slot.state == "parked":
            slot.engine = None

    def measure(self, slot: Slot) -> ByDevice:
        return {d: {**k, "workspace": 0} for d, k in slot.planned().items()}

    def reading(self, device: int) -> Reading | None:
        return Reading(used=RUNTIME_EXTERNAL + self.held(device), external=2 * GiB)

    def can_park(self) -> bool:
        return self.park_ok


def build(
    models: list[ModelConfig],
    gpus: str = "1x80GiB",
    park_budget: int = 200 * GiB,
    runtime: FakeRuntime | None = None,
    shapes: dict[str, ModelShape] | None = None,
) -> tuple[Coordinator, FakeRuntime, list[float]]:
    inventory = parse_gpu_spec(gpus)
    # The simulated GPU starts with 2 GiB used by other processes; runtime 1 GiB (the fake driver: 3 GiB).
    inventory = replace(inventory, devices=tuple(replace(d, external=2 * GiB) for d in inventory.devices))
    host = HostConfig(reserve=(0,))
    specs = [ModelSpec.from_shape(m, (shapes or {}).get(m.name, BIG)) for m in models]
    res = plan_residencies(specs, inventory, host)
    budgets = tuple(replace(b, runtime=1 * GiB) for b in res.resident.budgets)
    rt = runtime or FakeRuntime()
    now = [1000.0]
    busy: set[str] = set()
    slots = {m.name: Slot(m, res.model_plan(m.name), ("cuda:0",)) for m in models}
    coord = Coordinator(slots, Ledger(budgets, park_budget), rt, busy=lambda n: n in busy, clock=lambda: now[0])
    coord.busy_set = busy  # type: ignore[attr-defined]
    for m in res.resident.models:
        assert coord.ensure_resident(m.name) is Residency.READY
    return coord, rt, now


def workspace(dev: DeviceLedger) -> int:
    """The ledger reserves each model's planned workspace; the fake driver never sees it allocated."""
    return sum(k.get("workspace", 0) for k in dev.entries.values())


# -- ledger -------------------------------------------------------------------------------------------------------


def test_device_ledger_free_is_capacity_minus_every_term() -> None:
    budget = DeviceBudget(Device(0, "gpu", 80 * GiB, 2 * GiB), runtime=1 * GiB, reserve=1 * GiB)
    led = DeviceLedger.from_budget(0, budget)
    assert led.free == 80 * GiB - 1 * GiB - 1 * GiB - 2 * GiB
    led.place("a", {"weights": 10 * GiB, "kv": 2 * GiB})
    led.place("b", {"weights": 5 * GiB, "workspace": GiB})
    assert led.placed == 18 * GiB and led.held_by("a") == 12 * GiB
    assert led.free == 80 * GiB - 4 * GiB - 18 * GiB
    # the driver sees 1 GiB more than runtime + external + placed: that is drift, and it is not free
    rec = led.reconcile(Reading(used=1 * GiB + 2 * GiB + 18 * GiB + 1 * GiB, external=2 * GiB))
    assert rec.unexplained == GiB and led.drift == GiB
    assert led.free == 80 * GiB - 4 * GiB - 18 * GiB - GiB
    # a new process took 3 GiB more: external grows, drift stays what is ours
    rec = led.reconcile(Reading(used=1 * GiB + 5 * GiB + 18 * GiB, external=5 * GiB))
    assert rec.unexplained == 0 and led.drift == 0 and led.free == 80 * GiB - 7 * GiB - 18 * GiB
    # holding less than the ledger says is not credited
    led.reconcile(Reading(used=1 * GiB + 2 * GiB + 10 * GiB, external=2 * GiB))
    assert led.drift == 0 and led.free == 80 * GiB - 4 * GiB - 18 * GiB
    assert led.release("a") == 12 * GiB and led.placed == 6 * GiB
    with pytest.raises(ValueError, match="unknown memory kinds"):
        led.place("c", {"weight": 1})


def test_ledger_tracks_park_budget() -> None:
    budget = DeviceBudget(Device(0, "gpu", 80 * GiB, 0), runtime=0, reserve=0)
    led = Ledger((budget, budget), park_budget=10 * GiB)
    led.place("a", {0: {"weights": GiB}, 1: {"weights": 2 * GiB}})
    assert led.held("a") == {0: GiB, 1: 2 * GiB}
    led.parked["b"] = 4 * GiB
    assert led.park_free == 6 * GiB
    assert led.release("a") == 3 * GiB


# -- placement ----------------------------------------------------------------------------------------------------


def test_three_big_models_on_one_gpu_two_resident_one_on_demand() -> None:
    coord, _rt, _ = build([cfg("a"), cfg("b"), cfg("c")])
    assert [s.state for s in coord.slots.values()] == ["loaded", "loaded", "unloaded"]
    dev = coord.ledger.devices[0]
    assert dev.placed == coord.slots["a"].plan.total + coord.slots["b"].plan.total
    assert dev.last is not None and dev.last.unexplained == -workspace(dev)  # the fake driver agrees with the ledger


def test_fill_model_that_must_wait_for_room_is_refused() -> None:
    with pytest.raises(Exception, match="kv_tokens = 'fill'"):
        build([cfg("a"), cfg("b"), cfg("c", kv_tokens="fill")])


# -- on-demand loading and eviction order -------------------------------------------------------------------------


def test_on_demand_load_parks_the_least_recently_used() -> None:
    coord, rt, now = build([cfg("a"), cfg("b"), cfg("c")])
    now[0] += 10
    coord.touch("a")  # b is now the least recently used
    assert coord.ensure_resident("c") is Residency.READY
    states = {n: s.state for n, s in coord.slots.items()}
    assert states == {"a": "loaded", "b": "parked", "c": "loaded"}
    assert coord.ledger.parked == {"b": coord.slots["b"].planned_weights()}
    dev = coord.ledger.devices[0]
    assert dev.placed == coord.slots["a"].plan.total + coord.slots["c"].plan.total
    assert dev.free >= 0 and dev.last is not None and dev.last.unexplained == -workspace(dev)
    # b comes back by swapping (no load from disk), evicting a (now the least recently used)
    now[0] += 10
    coord.touch("c")
    assert coord.ensure_resident("b") is Residency.READY
    assert coord.slots["b"].swaps_in == 1 and coord.slots["b"].loads == 1
    assert coord.slots["a"].state == "parked"
    # parking b again reuses its host copy: two host copies made in all (b's, then a's)
    now[0] += 10
    coord.touch("b")
    coord.ensure_resident("a")
    assert coord.slots["c"].state == "parked" and rt.copies == 3
    coord.touch("a")
    coord.ensure_resident("c")
    assert rt.copies == 3, "b and c already had host copies"


def test_eviction_order_expired_then_priority_then_lru() -> None:
    models = [cfg("x", priority=5, keep_alive_s=60.0), cfg("y", priority=0), cfg("z", priority=0), cfg("new")]
    shapes = {"x": SMALL, "y": SMALL, "z": SMALL, "new": BIG}
    # 36 GiB: the three small ones fit together, BIG beside them does not
    coord, _, now = build(models, gpus="1x36GiB", shapes=shapes)
    assert [s.state for s in coord.slots.values()] == ["loaded", "loaded", "loaded", "unloaded"]
    coord.touch("y")
    now[0] += 30
    coord.touch("z")
    coord.touch("x")
    # nothing expired: lowest priority first (y, z), and among them the least recently used (y)
    victims = coord._victims(coord.slots["new"], coord.slots["new"].planned())
    assert victims is not None and [v.name for v in victims][:2] == ["y", "z"]
    now[0] += 61  # x's keep_alive (60 s) expired; y and z keep the 300 s default
    victims = coord._victims(coord.slots["new"], coord.slots["new"].planned())
    assert victims is not None and victims[0].name == "x"


def test_pinned_and_busy_models_are_never_evicted() -> None:
    coord, _, now = build([cfg("a", keep_alive_s=-1.0), cfg("b"), cfg("c")])
    coord.busy_set.add("b")  # type: ignore[attr-defined]
    assert coord.ensure_resident("c") is Residency.BLOCKED
    assert [s.state for s in coord.slots.values()] == ["loaded", "loaded", "unloaded"], "nothing evicted"
    coord.busy_set.clear()  # type: ignore[attr-defined]
    assert coord.ensure_resident("c") is Residency.READY
    assert coord.slots["a"].state == "loaded" and coord.slots["b"].state == "parked"
    now[0] += 10_000
    assert coord.expire() == ["c"], "pinned a never expires; b is already parked"


def test_pinned_model_that_does_not_fit_at_start_is_refused() -> None:
    with pytest.raises(Exception, match="pinned"):
        build([cfg("a"), cfg("b"), cfg("c", keep_alive_s=-1.0)])


def test_keep_alive_expiry_parks_idle_models() -> None:
    coord, _, now = build([cfg("a", keep_alive_s=5.0), cfg("b", keep_alive_s=50.0)])
    now[0] += 6
    assert coord.expire() == ["a"]
    assert coord.slots["a"].state == "parked" and coord.slots["b"].state == "loaded"
    coord.busy_set.add("b")  # type: ignore[attr-defined]
    now[0] += 100
    assert coord.expire() == [], "a busy model does not expire"


# -- parking budget and the CPU -----------------------------------------------------------------------------------


def test_park_budget_drops_the_oldest_host_copy() -> None:
    coord, _rt, now = build([cfg("a"), cfg("b"), cfg("c")], park_budget=40 * GiB)  # one ~29.5 GB copy at a time
    now[0] += 1
    coord.touch("a")
    coord.ensure_resident("c")  # parks b
    assert coord.slots["b"].state == "parked"
    now[0] += 1
    coord.touch("c")
    coord.ensure_resident("b")  # parks a: b's host copy must go first (budget), though b is resident again
    assert coord.slots["a"].state == "parked" and coord.slots["b"].parked is None
    assert set(coord.ledger.parked) == {"a"}
    now[0] += 1
    coord.touch("b")
    coord.ensure_resident("a")  # parks c: a's copy (the only one) is dropped
    assert coord.slots["c"].state == "parked" and set(coord.ledger.parked) == {"c"}


def test_model_larger_than_the_park_budget_is_unloaded() -> None:
    coord, _, now = build([cfg("a"), cfg("b"), cfg("c")], park_budget=10 * GiB)
    now[0] += 1
    coord.touch("a")
    coord.ensure_resident("c")
    assert coord.slots["b"].state == "unloaded" and coord.ledger.parked == {}


def test_without_parking_evicted_models_are_unloaded() -> None:
    coord, _, _ = build([cfg("a"), cfg("b"), cfg("c")], runtime=FakeRuntime(park_ok=False))
    coord.ensure_resident("c")
    assert sorted(s.state for s in coord.slots.values()) == ["loaded", "loaded", "unloaded"]


# -- rollback -----------------------------------------------------------------------------------------------------


def test_failed_load_rolls_back_ledger_and_driver() -> None:
    coord, rt, _now = build([cfg("a"), cfg("b", keep_alive_s=-1.0), cfg("c")], gpus="1x80GiB")
    # c needs a's room: a is parked first, then c's load fails half-way
    entries_before = {k: dict(v) for k, v in coord.ledger.devices[0].entries.items()}
    rt.fail_next = "load"
    with pytest.raises(LoadFailed, match="could not be loaded: CUDA out of memory"):
        coord.ensure_resident("c")
    dev = coord.ledger.devices[0]
    assert coord.slots["c"].state == "failed" and "out of memory" in coord.slots["c"].error
    assert "c" not in dev.entries and coord.slots["c"].engine is None
    # a was parked to make room (that stays done); everything else is as before the load
    assert coord.slots["a"].state == "parked" and coord.slots["b"].state == "loaded"
    assert dev.entries == {"b": entries_before["b"]}
    assert rt.held(0) == coord.slots["b"].plan.total - coord.slots["b"].plan.stages[0].need.workspace
    assert dev.last is not None and dev.last.unexplained == -workspace(dev)
    # the next attempt succeeds
    assert coord.ensure_resident("c") is Residency.READY and coord.slots["c"].state == "loaded"


def test_failed_unpark_leaves_the_model_failed_and_frees_its_host_copy() -> None:
    coord, rt, now = build([cfg("a"), cfg("b"), cfg("c")])
    now[0] += 1
    coord.touch("a")
    coord.ensure_resident("c")  # b parked
    now[0] += 1
    coord.touch("c")
    rt.fail_next = "unpark"
    with pytest.raises(LoadFailed, match="swapped in"):
        coord.ensure_resident("b")
    assert coord.slots["b"].state == "failed" and "b" not in coord.ledger.parked
    assert coord.slots["b"].parked is None
    dev = coord.ledger.devices[0]
    assert "b" not in dev.entries and dev.last is not None and dev.last.unexplained == -workspace(dev)


# -- split models: one ledger per device ----------------------------------------------------------------------------


def test_split_model_is_placed_and_freed_on_every_device_ledger() -> None:
    # BIG (~29.5 GB of weights) fits on no 24 GiB GPU: the planner splits it over both; SMALL goes beside it
    smalls = {f"s{i}": SMALL for i in range(1, 6)}
    coord, rt, now = build([cfg("big")] + [cfg(n) for n in smalls], gpus="2x24GiB", shapes=smalls)
    big = coord.slots["big"]
    assert big.plan.devices == (0, 1) and big.state == "loaded"
    for stage in big.plan.stages:
        dev = coord.ledger.devices[stage.device]
        assert dev.held_by("big") == stage.need.total
        assert rt.alloc["big"][stage.device] == stage.need.weights + stage.need.kv + stage.need.graphs
        assert dev.last is not None and dev.last.unexplained == -workspace(dev)
    states = {n: s.state for n, s in coord.slots.items()}
    on_demand = [n for n, st in states.items() if st == "unloaded"]
    assert on_demand, "five small models beside the split one do not all fit at once"
    # whichever small model had to wait, bringing it in evicts what it must, on the devices where it is short
    for name in on_demand:
        now[0] += 1
        coord.touch("big")  # the split model is the most recently used: small ones are evicted first
        assert coord.ensure_resident(name) is Residency.READY
        assert coord.slots["big"].state == "loaded"
    for dev in coord.ledger.devices:
        assert dev.free >= 0
        assert dev.last is not None and dev.last.unexplained == -workspace(dev)
    coord.unload("big")
    assert all("big" not in d.entries for d in coord.ledger.devices) and "big" not in rt.alloc


def test_blocked_load_rereads_the_driver_when_the_drift_was_transient() -> None:
    """Another process still held 47 GiB at the last reconciliation (it was exiting): the drift made a load wait.
    Once that memory is gone, the next attempt re-reads the driver and loads it (nothing is evictable: only the
    stale drift stood in the way)."""
    rt = FakeRuntime()
    ghost = [0]
    real = rt.reading

    def reading(device: int) -> Reading | None:
        r = real(device)
        assert r is not None
        return Reading(used=r.used + ghost[0], external=r.external)

    rt.reading = reading  # type: ignore[method-assign]
    coord, _, now = build([cfg("a", keep_alive_s=-1), cfg("b")], runtime=rt, shapes={"b": SMALL})
    ghost[0] = 47 * GiB
    coord.unload("b")  # reconciles while the other process still holds its memory
    assert coord.ledger.devices[0].drift > 40 * GiB
    assert coord.ensure_resident("b") is Residency.BLOCKED
    ghost[0] = 0
    assert coord.ensure_resident("b") is Residency.BLOCKED, "re-read at most once a second"
    now[0] += 1.0
    assert coord.ensure_resident("b") is Residency.READY
    assert coord.ledger.devices[0].drift == 0
