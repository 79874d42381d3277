"""Place models on devices before loading a byte: spread, don't stack; split only what fits on no single GPU.

Everything is computed from the estimate; nothing is found by trial. Returns a `Plan` or raises
PlanInfeasibleError carrying a `Shortfall` with computed remedies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from llmhost.config import HostConfig
from llmhost.errors import ConfigError, InventoryError, PlanInfeasibleError
from llmhost.memory.estimate import ModelSpec, StageNeed, default_kv_tokens, kv_blocks, stage_need
from llmhost.memory.inventory import Inventory
from llmhost.memory.plan import DeviceBudget, FitLimit, ModelPlan, Plan, Shortfall, Stage
from llmhost.memory.runtime import runtime_overhead
from llmhost.units import GiB, MiB, fmt_bytes

# Decode reads every weight once per step, so weight bytes measure a model's GPU time per step; two models this
# large on one GPU would each slow the other, so the planner keeps them apart when another placement exists.
COMPUTE_HEAVY_BYTES = 4 * GiB
SEARCH_NODE_LIMIT = 50_000  # backtracking steps before the search gives up (10 models x 8 GPUs needs far fewer)
MAX_SEQ_SEARCH = 1 << 24  # tokens: the upper bound of the largest-context search


@dataclass(frozen=True)
class _Item:
    """A model being placed, with the KV tokens it starts with ("fill" models start with one sequence)."""

    spec: ModelSpec
    kv_tokens: int
    candidates: tuple[int, ...]  # device indices allowed (pinning)

    @property
    def heavy(self) -> bool:
        return self.spec.weight_bytes >= COMPUTE_HEAVY_BYTES


def make_budgets(inventory: Inventory, host: HostConfig) -> tuple[DeviceBudget, ...]:
    return tuple(
        DeviceBudget(device=d, runtime=runtime_overhead(d), reserve=host.reserve_for(d.index))
        for d in inventory.devices
    )


def plan_models(specs: Sequence[ModelSpec], inventory: Inventory, host: HostConfig) -> Plan:
    budgets = make_budgets(inventory, host)
    bs = host.block_size
    items = [_item(spec, budgets) for spec in specs]
    on_gpu = {b.device.index: b.device.kind == "cuda" for b in budgets}
    # Larger and higher-priority models first: they have the fewest places to go, and loading them first keeps
    # the allocator's large blocks contiguous.
    order = sorted(items, key=lambda it: (-it.spec.config.priority, -_whole(it, bs, True).total))
    free = {b.device.index: b.usable for b in budgets}
    count = {i: 0 for i in free}
    heavy = {i: 0 for i in free}
    stages: dict[str, tuple[Stage, ...]] = {}

    singles: list[_Item] = []
    for it in order:
        if all(_whole(it, bs, on_gpu[d]).total > budgets[d].usable for d in it.candidates) and len(it.candidates) > 1:
            split = _split(it, bs, {d: free[d] for d in it.candidates}, on_gpu)
            if split is None:
                raise PlanInfeasible(_split_shortfall(it, bs, free, budgets, on_gpu))
            stages[it.spec.name] = split
            for part in split:
                free[part.device] -= part.need.total
                count[part.device] += 1
                heavy[part.device] += int(it.heavy)
        else:
            singles.append(it)

    assignment = _search(singles, bs, free, count, heavy, on_gpu)
    if isinstance(assignment, _Failure):
        raise PlanInfeasible(_single_shortfall(assignment.item, bs, assignment.free, budgets, on_gpu))
    for it in singles:
        d = assignment[it.spec.name]
        need = _whole(it, bs, on_gpu[d])
        stages[it.spec.name] = (Stage(d, 0, it.spec.shape.num_layers, need),)
        free[d] -= need.total

    kv_final = _fill(order, stages, free, bs, on_gpu)
    models = []
    for n, it in enumerate(order):
        st = stages[it.spec.name]
        kv = kv_final[it.spec.name]
        fit, limited = _max_seq_len_fit(it, st, kv, bs, free, on_gpu)
        models.append(
            ModelPlan(
                name=it.spec.name,
                stages=st,
                kv_tokens=kv_blocks(kv, bs) * bs,
                kv_blocks=kv_blocks(kv, bs),
                max_seq_len=it.spec.config.max_seq_len,
                max_batch=it.spec.config.max_batch,
                max_seq_len_fit=fit,
                fit_limited_by=limited,
                load_order=n,
            )
        )
    return Plan(budgets=budgets, models=tuple(models), block_size=bs)


def _item(spec: ModelSpec, budgets: Sequence[DeviceBudget]) -> _Item:
    cfg = spec.config
    limit = spec.shape.max_position_embeddings
    if cfg.max_seq_len > limit:
        raise ConfigError(
            f"model '{cfg.name}': max_seq_len {cfg.max_seq_len} exceeds the model's context length {limit} "
            f"(max_position_embeddings); set max_seq_len <= {limit}"
        )
    if cfg.gpus is not None:
        bad = [g for g in cfg.gpus if g >= len(budgets)]
        if bad:
            have = f"GPUs 0-{len(budgets) - 1}" if len(budgets) > 1 else "GPU 0"
            raise InventoryError(
                f"model '{spec.name}' pins gpus = {list(cfg.gpus)} but GPU {bad[0]} does not exist (there is "
                f"{have}); change gpus or remove it"
            )
        candidates = tuple(dict.fromkeys(cfg.gpus))
    else:
        candidates = tuple(b.device.index for b in budgets)
    if cfg.kv_tokens == "fill":
        kv = cfg.max_seq_len  # at least one full-length sequence; what is left is shared out after placement
    elif cfg.kv_tokens is None:
        kv = default_kv_tokens(cfg)
    else:
        kv = cfg.kv_tokens
    return _Item(spec, kv, candidates)


def _whole(it: _Item, bs: int, on_gpu: bool) -> StageNeed:
    return stage_need(it.spec, it.kv_tokens, bs, 0, it.spec.shape.num_layers, on_gpu)


# -- single-device placement: greedy preference order, backtracking when greedy fails -------------------------


@dataclass(frozen=True)
class _Failure:
    item: _Item  # the first model that could not be placed by the greedy pass
    free: dict[int, int]  # free bytes per device at that moment


def _search(
    items: list[_Item],
    bs: int,
    free: dict[int, int],
    count: dict[int, int],
    heavy: dict[int, int],
    on_gpu: dict[int, bool],
) -> dict[str, int] | _Failure:
    needs = [{d: _whole(it, bs, on_gpu[d]).total for d in it.candidates} for it in items]
    free, count, heavy = dict(free), dict(count), dict(heavy)
    assignment: dict[str, int] = {}
    first_failure: list[_Failure] = []
    nodes = 0
    any_pins = any(it.spec.config.gpus is not None for it in items)

    def prefs(k: int) -> list[int]:
        it = items[k]
        fits = [d for d in it.candidates if needs[k][d] <= free[d]]
        # Spread first (fewest models), keep compute-heavy models apart, then most room left.
        fits.sort(key=lambda d: (it.heavy and heavy[d] > 0, count[d], -(free[d] - needs[k][d]), d))
        if not any_pins:
            # Devices in the same state are interchangeable: trying one of them is enough.
            seen: set[tuple[int, int, int]] = set()
            unique = []
            for d in fits:
                key = (free[d], count[d], heavy[d])
                if key not in seen:
                    seen.add(key)
                    unique.append(d)
            fits = unique
        return fits

    def place(k: int) -> bool:
        nonlocal nodes
        if k == len(items):
            return True
        nodes += 1
        if nodes > SEARCH_NODE_LIMIT:
            return False
        options = prefs(k)
        if not options and not first_failure:
            first_failure.append(_Failure(items[k], dict(free)))
        for d in options:
            it = items[k]
            free[d] -= needs[k][d]
            count[d] += 1
            heavy[d] += int(it.heavy)
            assignment[it.spec.name] = d
            if place(k + 1):
                return True
            free[d] += needs[k][d]
            count[d] -= 1
            heavy[d] -= int(it.heavy)
            del assignment[it.spec.name]
        return False

    if place(0):
        return assignment
    return first_failure[0] if first_failure else _Failure(items[0], dict(free))


# -- splitting across devices ----------------------------------------------------------------------------------


def _split(it: _Item, bs: int, free: dict[int, int], on_gpu: dict[int, bool]) -> tuple[Stage, ...] | None:
    """Fewest devices first (those with the most room); stages in device order."""
    by_room = sorted(free, key=lambda d: (-free[d], d))
    for k in range(2, len(by_room) + 1):
        chosen = sorted(by_room[:k])
        stages = _partition(it, bs, chosen, free, on_gpu, balanced=True)
        if stages is None:
            stages = _partition(it, bs, chosen, free, on_gpu, balanced=False)
        if stages is not None:
            return stages
    return None


def _partition(
    it: _Item, bs: int, devices: list[int], free: dict[int, int], on_gpu: dict[int, bool], balanced: bool
) -> tuple[Stage, ...] | None:
    """Contiguous layer ranges, one per device. Balanced: layers in proportion to each device's room once its
    fixed part (its ends, workspace, graphs) is taken. Otherwise: each stage takes as many layers as fit."""
    n = it.spec.shape.num_layers
    k = len(devices)
    if n < k:
        return None

    def need(i: int, start: int, end: int) -> StageNeed:
        return stage_need(it.spec, it.kv_tokens, bs, start, end, on_gpu[devices[i]])

    # An empty stage at a device's position costs exactly its fixed part: embedding first, head last.
    positions = [0] + [1] * (k - 2) + [n]
    rooms = [max(0, free[d] - need(i, positions[i], positions[i]).total) for i, d in enumerate(devices)]
    total_room = sum(rooms)
    if total_room == 0:
        return None
    stages: list[Stage] = []
    start = 0
    for i, d in enumerate(devices):
        later = k - i - 1  # stages after this one, each needing at least one layer
        if later == 0:
            end = n
        else:
            end = n - later
            if balanced:
                end = min(end, max(start + 1, start + round(n * rooms[i] / total_room)))
            while end > start + 1 and need(i, start, end).total > free[d]:
                end -= 1
        st = need(i, start, end)
        if st.total > free[d]:
            return None
        stages.append(Stage(d, start, end, st))
        start = end
    return tuple(stages)


# -- "fill" KV pools and the largest context -------------------------------------------------------------------


def _fill(
    order: list[_Item],
    stages: dict[str, tuple[Stage, ...]],
    free: dict[int, int],
    bs: int,
    on_gpu: dict[int, bool],
) -> dict[str, int]:
    """Share each device's leftover among its single-device "fill" models, in whole blocks."""
    kv = {it.spec.name: it.kv_tokens for it in order}
    fillers: dict[int, list[_Item]] = {}
    for it in order:
        st = stages[it.spec.name]
        if it.spec.config.kv_tokens == "fill" and len(st) == 1:
            fillers.setdefault(st[0].device, []).append(it)
    for d, group in fillers.items():
        share = free[d] // len(group)
        for it in group:
            (old,) = stages[it.spec.name]
            per_block = max(1, stage_need(it.spec, bs, bs, 0, it.spec.shape.num_layers, on_gpu[d]).kv)
            extra_blocks = max(0, share) // per_block
            new_kv = kv_blocks(it.kv_tokens, bs) * bs + extra_blocks * bs
            new = stage_need(it.spec, new_kv, bs, 0, it.spec.shape.num_layers, on_gpu[d])
            # Sliding-window layers stop growing, so a block can cost less than per_block; never more.
            if new.total - old.need.total <= share:
                kv[it.spec.name] = new_kv
                stages[it.spec.name] = (replace(old, need=new),)
                free[d] -= new.total - old.need.total
    return kv


def _max_seq_len_fit(
    it: _Item, stages: tuple[Stage, ...], kv: int, bs: int, free: dict[int, int], on_gpu: dict[int, bool]
) -> tuple[int, FitLimit]:
    """Largest max_seq_len with everything else unchanged: binary search on the exact estimate."""
    cfg = it.spec.config
    fixed_pool = cfg.kv_tokens is not None  # an explicit or filled pool keeps its size; a sequence fits inside it

    def fits(s: int) -> bool:
        spec = replace(it.spec, config=replace(cfg, max_seq_len=s))
        tokens = kv if fixed_pool else s * cfg.max_batch
        if fixed_pool and s > kv:
            return False
        for st in stages:
            new = stage_need(spec, tokens, bs, st.start, st.end, on_gpu[st.device])
            if new.total - st.need.total > free[st.device]:
                return False
        return True

    best = _largest(fits, 1, MAX_SEQ_SEARCH)
    limit = it.spec.shape.max_position_embeddings
    if best >= limit:
        return limit, "model"
    if fixed_pool and best == kv:
        return best, "kv_tokens"
    return best, "memory"


def _largest(ok: Callable[[int], bool], lo: int, hi: int) -> int:
    """Largest n in [lo, hi] with ok(n), assuming ok is monotone; lo - 1 when none."""
    if not ok(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


# -- infeasible: say by how much, and what would fit --------------------------------------------------------------


def _resized(it: _Item, max_seq_len: int | None = None, max_batch: int | None = None, kv: int | None = None) -> _Item:
    """The same model with other limits; its KV pool follows them as the config's kv_tokens mode says."""
    cfg = replace(
        it.spec.config,
        max_seq_len=max_seq_len or it.spec.config.max_seq_len,
        max_batch=max_batch or it.spec.config.max_batch,
    )
    if kv is None:
        if cfg.kv_tokens is None:
            kv = default_kv_tokens(cfg)
        elif cfg.kv_tokens == "fill":
            kv = cfg.max_seq_len
        else:
            kv = cfg.kv_tokens  # an explicit pool keeps its size whatever the other limits
    return replace(it, spec=replace(it.spec, config=cfg), kv_tokens=kv)


def _single_shortfall(
    it: _Item, bs: int, free: dict[int, int], budgets: Sequence[DeviceBudget], on_gpu: dict[int, bool]
) -> Shortfall:
    d = max(it.candidates, key=lambda c: (free[c], -c))
    label = budgets[d].device.label
    need = _whole(it, bs, on_gpu[d]).total
    avail = max(0, free[d])
    cfg = it.spec.config
    remedies: list[str] = []

    def fits(variant: _Item) -> bool:
        return _whole(variant, bs, on_gpu[d]).total <= avail

    s = _largest(lambda v: fits(_resized(it, max_seq_len=v)), 1, cfg.max_seq_len - 1)
    if s >= 1:
        remedies.append(f"max_seq_len = {s} fits on {label} (now {cfg.max_seq_len})")
    b = _largest(lambda v: fits(_resized(it, max_batch=v)), 1, cfg.max_batch - 1)
    if b >= 1:
        remedies.append(f"max_batch = {b} fits on {label} (now {cfg.max_batch})")
    if isinstance(cfg.kv_tokens, int):
        k = _largest(lambda v: fits(_resized(it, kv=v)), cfg.max_seq_len, cfg.kv_tokens - 1)
        if k >= cfg.max_seq_len:
            remedies.append(f"kv_tokens = {k} fits on {label} (now {cfg.kv_tokens})")
    if cfg.gpus is not None:
        others = [
            b.device.index
            for b in budgets
            if b.device.index not in it.candidates
            and _whole(it, bs, on_gpu[b.device.index]).total <= free[b.device.index]
        ]
        if others:
            remedies.append(f"GPU {others[0]} has room: pin gpus = [{others[0]}] or remove the pinning")
    reserve = budgets[d].reserve
    if reserve >= need - avail > 0:
        # Whole MiB, rounded down, so that the printed value itself fits.
        lowered = (reserve - (need - avail)) // MiB
        remedies.append(f"lower [host] reserve on {label} from {reserve // MiB} MiB to {lowered} MiB")
    if not remedies:
        remedies.append("use a smaller dtype or model, or a device with more memory")
    return Shortfall(cfg.name, label, need, avail, tuple(remedies))


def _split_shortfall(
    it: _Item, bs: int, free: dict[int, int], budgets: Sequence[DeviceBudget], on_gpu: dict[int, bool]
) -> Shortfall:
    devs = sorted(it.candidates)
    label = f"GPUs {devs[0]}-{devs[-1]} together" if len(devs) > 1 else budgets[devs[0]].device.label
    avail = sum(max(0, free[d]) for d in devs)
    short = _split_overflow(it, bs, devs, free, on_gpu)
    cfg = it.spec.config
    remedies: list[str] = []
    room = {d: free[d] for d in devs}
    s = _largest(lambda v: _split(_resized(it, max_seq_len=v), bs, room, on_gpu) is not None, 1, cfg.max_seq_len - 1)
    if s >= 1:
        remedies.append(f"max_seq_len = {s} fits when split across {label}")
    if not remedies:
        remedies.append("use a smaller dtype or model, or more GPUs")
    return Shortfall(cfg.name, label, avail + short, avail, tuple(remedies))


def _split_overflow(it: _Item, bs: int, devs: list[int], free: dict[int, int], on_gpu: dict[int, bool]) -> int:
    """Bytes missing for a split over all `devs`: each stage takes as many layers as fit (at least one), the last
    takes the rest; what overflows is the shortfall. Positive even when the sum of free memory would suffice but
    layers cannot be cut finer."""
    n = it.spec.shape.num_layers
    start, missing = 0, 0
    for i, d in enumerate(devs):
        later = len(devs) - i - 1
        end = n if later == 0 else max(start + 1, n - later)
        while (
            later and end > start + 1 and stage_need(it.spec, it.kv_tokens, bs, start, end, on_gpu[d]).total > free[d]
        ):
            end -= 1
        if start >= n:
            break
        missing += max(0, stage_need(it.spec, it.kv_tokens, bs, start, min(end, n), on_gpu[d]).total - free[d])
        start = end
    return max(missing, 1)


class PlanInfeasible(PlanInfeasibleError):
    """The plan does not fit; `shortfall` says which model, where, by how much and what would fit."""

    def __init__(self, shortfall: Shortfall) -> None:
        super().__init__(shortfall_message(shortfall))
        self.shortfall = shortfall


def shortfall_message(sf: Shortfall) -> str:
    return (
        f"model '{sf.model}' does not fit: it needs {fmt_bytes(sf.need)} and {sf.where} has {fmt_bytes(sf.available)} "
        f"free for it (short by {fmt_bytes(sf.short_by)}). Remedies: " + "; ".join(sf.remedies)
    )
