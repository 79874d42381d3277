"""Place models on devices before loading a byte: spread, don't stack; split only what fits on no single GPU.

Everything is computed from the estimate (or, given a history, from what earlier loads of the same model on the
same GPU kind measured); nothing is found by trial. Returns a `Plan` or raises PlanInfeasibleError carrying a
`Shortfall` with computed remedies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from llmhost.config import HostConfig, ModelConfig
from llmhost.errors import ConfigError, InventoryError, PlanInfeasibleError
from llmhost.memory.estimate import ModelSpec, StageNeed, default_kv_tokens, kv_blocks, stage_need, steered_graphs
from llmhost.memory.history import History, Measured, history_key
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


class _Needs:
    """stage_need on one of the plan's devices. Given a history, a stage that was loaded before on a GPU of the
    same kind (same checkpoint, config, torch and layer range) takes its measured workspace and graphs figures.
    Weights and KV stay the estimate's: both are exact arithmetic (tensor headers x dtype; whole blocks x bytes
    per token), and KV follows this plan's pool size, which "fill" changes after placement."""

    def __init__(
        self, budgets: Sequence[DeviceBudget], block_size: int, history: History | None, steered: bool = False
    ) -> None:
        self.bs = block_size
        self.steered = steered  # [host] sm_steering: the confined decode graphs count too
        self.devices = {b.device.index: b.device for b in budgets}
        self.history = history
        # Planning asks for the same stage many times (trial placements, searches): one history lookup each.
        self._memo: dict[tuple[str, ModelConfig, str, int, int], Measured | None] = {}

    def on_gpu(self, d: int) -> bool:
        return self.devices[d].kind == "cuda"

    def estimate(self, spec: ModelSpec, kv_tokens: int, start: int, end: int, d: int) -> StageNeed:
        return stage_need(spec, kv_tokens, self.bs, start, end, self.on_gpu(d), self.steered)

    def __call__(self, spec: ModelSpec, kv_tokens: int, start: int, end: int, d: int) -> StageNeed:
        need = self.estimate(spec, kv_tokens, start, end, d)
        m = self._measured(spec, start, end, d)
        if m is None:
            return need
        # The measured graphs figure is the runner's tensors (model_runtime.py); executables are not tensors, so
        # the confined sets' are added as the estimate has them (none where the load had no decode runner).
        split = not (start == 0 and end == spec.shape.num_layers)
        confined = steered_graphs(spec, self.on_gpu(d), split) if self.steered and m.graphs else 0
        return replace(
            need,
            workspace=m.workspace,
            graphs=m.graphs + confined,
            measured=("workspace", "graphs"),
            measured_at=m.recorded_at,
        )

    def whole(self, it: _Item, d: int) -> StageNeed:
        return self(it.spec, it.kv_tokens, 0, it.spec.shape.num_layers, d)

    def whole_estimate(self, it: _Item, d: int) -> StageNeed:
        return self.estimate(it.spec, it.kv_tokens, 0, it.spec.shape.num_layers, d)

    def _measured(self, spec: ModelSpec, start: int, end: int, d: int) -> Measured | None:
        dev = self.devices[d]
        # GPUs only: on the CPU the engine cannot tell activations from the rest of the process's memory.
        if self.history is None or spec.fingerprint is None or dev.kind != "cuda":
            return None
        memo = (spec.fingerprint, spec.config, dev.name, start, end)
        if memo not in self._memo:
            self._memo[memo] = self.history.lookup(history_key(spec, spec.fingerprint, dev, start, end, self.bs))
        return self._memo[memo]


def plan_models(
    specs: Sequence[ModelSpec], inventory: Inventory, host: HostConfig, history: History | None = None
) -> Plan:
    """history: measured workspace and graphs figures of earlier loads replace the estimate where they exist (the
    stages' `need.measured` says which); None plans from the estimate alone."""
    budgets = make_budgets(inventory, host)
    bs = host.block_size
    needs = _Needs(budgets, bs, history, host.sm_steering)
    items = [_item(spec, budgets) for spec in specs]
    # Larger and higher-priority models first: they have the fewest places to go, and loading them first keeps
    # the allocator's large blocks contiguous. (By the estimate: the order must not depend on a device.)
    order = sorted(
        items,
        key=lambda it: (
            -it.spec.config.priority,
            -stage_need(it.spec, it.kv_tokens, bs, 0, it.spec.shape.num_layers).total,
        ),
    )
    free = {b.device.index: b.usable for b in budgets}
    count = {i: 0 for i in free}
    heavy = {i: 0 for i in free}
    stages: dict[str, tuple[Stage, ...]] = {}

    singles: list[_Item] = []
    for it in order:
        if all(needs.whole(it, d).total > budgets[d].usable for d in it.candidates) and len(it.candidates) > 1:
            split = _split(it, needs, {d: free[d] for d in it.candidates})
            if split is None:
                raise PlanInfeasible(_split_shortfall(it, needs, free, budgets))
            stages[it.spec.name] = split
            for part in split:
                free[part.device] -= part.need.total
                count[part.device] += 1
                heavy[part.device] += int(it.heavy)
        else:
            singles.append(it)

    assignment = _search(singles, needs, free, count, heavy)
    if isinstance(assignment, _Failure):
        raise PlanInfeasible(_single_shortfall(assignment.item, needs, assignment.free, budgets))
    for it in singles:
        d = assignment[it.spec.name]
        need = needs.whole(it, d)
        stages[it.spec.name] = (Stage(d, 0, it.spec.shape.num_layers, need),)
        free[d] -= need.total

    kv_final = _fill(order, stages, free, needs)
    models = []
    for n, it in enumerate(order):
        st = stages[it.spec.name]
        kv = kv_final[it.spec.name]
        fit, limited = _max_seq_len_fit(it, st, kv, needs, free)
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


# -- single-device placement: greedy preference order, backtracking when greedy fails -------------------------


@dataclass(frozen=True)
class _Failure:
    item: _Item  # the first model that could not be placed by the greedy pass
    free: dict[int, int]  # free bytes per device at that moment


def _search(
    items: list[_Item],
    stage_needs: _Needs,
    free: dict[int, int],
    count: dict[int, int],
    heavy: dict[int, int],
) -> dict[str, int] | _Failure:
    needs = [{d: stage_needs.whole(it, d).total for d in it.candidates} for it in items]
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


def _split(it: _Item, needs: _Needs, free: dict[int, int]) -> tuple[Stage, ...] | None:
    """Fewest devices first (those with the most room); stages in device order."""
    by_room = sorted(free, key=lambda d: (-free[d], d))
    for k in range(2, len(by_room) + 1):
        chosen = sorted(by_room[:k])
        stages = _partition(it, needs, chosen, free, balanced=True)
        if stages is None:
            stages = _partition(it, needs, chosen, free, balanced=False)
        if stages is not None:
            return stages
    return None


def _partition(
    it: _Item, needs: _Needs, devices: list[int], free: dict[int, int], balanced: bool
) -> tuple[Stage, ...] | None:
    """Contiguous layer ranges, one per device. Balanced: layers in proportion to each device's room once its
    fixed part (its ends, workspace, graphs) is taken. Otherwise: each stage takes as many layers as fit."""
    n = it.spec.shape.num_layers
    k = len(devices)
    if n < k:
        return None

    def need(i: int, start: int, end: int) -> StageNeed:
        return needs(it.spec, it.kv_tokens, start, end, devices[i])

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
    order: list[_Item], stages: dict[str, tuple[Stage, ...]], free: dict[int, int], needs: _Needs
) -> dict[str, int]:
    """Share each device's leftover among its single-device "fill" models, in whole blocks."""
    bs = needs.bs
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
            per_block = max(1, needs.estimate(it.spec, bs, 0, it.spec.shape.num_layers, d).kv)
            extra_blocks = max(0, share) // per_block
            new_kv = kv_blocks(it.kv_tokens, bs) * bs + extra_blocks * bs
            # The same history record as the placed stage: it is keyed by the config's "fill", not the token count.
            new = needs(it.spec, new_kv, 0, it.spec.shape.num_layers, d)
            # Sliding-window layers stop growing, so a block can cost less than per_block; never more.
            if new.total - old.need.total <= share:
                kv[it.spec.name] = new_kv
                stages[it.spec.name] = (replace(old, need=new),)
                free[d] -= new.total - old.need.total
    return kv


def _max_seq_len_fit(
    it: _Item, stages: tuple[Stage, ...], kv: int, needs: _Needs, free: dict[int, int]
) -> tuple[int, FitLimit]:
    """Largest max_seq_len with everything else unchanged: binary search on the exact estimate."""
    cfg = it.spec.config
    fixed_pool = cfg.kv_tokens is not None  # an explicit or filled pool keeps its size; a sequence fits inside it
    # Growth is estimated against the estimate of the placed size, never against a measured figure: another
    # max_seq_len was never measured, and comparing an estimate with a measurement would make the search
    # non-monotone. What the measurement corrected stays corrected by the same amount.
    base = [needs.estimate(it.spec, kv, st.start, st.end, st.device).total for st in stages]

    def fits(s: int) -> bool:
        spec = replace(it.spec, config=replace(cfg, max_seq_len=s))
        tokens = kv if fixed_pool else s * cfg.max_batch
        if fixed_pool and s > kv:
            return False
        for st, placed in zip(stages, base, strict=True):
            new = needs.estimate(spec, tokens, st.start, st.end, st.device)
            if new.total - placed > free[st.device]:
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


def _single_shortfall(it: _Item, needs: _Needs, free: dict[int, int], budgets: Sequence[DeviceBudget]) -> Shortfall:
    d = max(it.candidates, key=lambda c: (free[c], -c))
    label = budgets[d].device.label
    need = needs.whole(it, d).total
    base = needs.whole_estimate(it, d).total
    avail = max(0, free[d])
    cfg = it.spec.config
    remedies: list[str] = []

    def fits(variant: _Item) -> bool:
        # As in _max_seq_len_fit: a variant's change is estimated, on top of the (possibly measured) need.
        return need + needs.whole_estimate(variant, d).total - base <= avail

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
            if b.device.index not in it.candidates and needs.whole(it, b.device.index).total <= free[b.device.index]
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


def _split_shortfall(it: _Item, needs: _Needs, free: dict[int, int], budgets: Sequence[DeviceBudget]) -> Shortfall:
    devs = sorted(it.candidates)
    label = f"GPUs {devs[0]}-{devs[-1]} together" if len(devs) > 1 else budgets[devs[0]].device.label
    avail = sum(max(0, free[d]) for d in devs)
    short = _split_overflow(it, needs, devs, free)
    cfg = it.spec.config
    remedies: list[str] = []
    room = {d: free[d] for d in devs}
    s = _largest(lambda v: _split(_resized(it, max_seq_len=v), needs, room) is not None, 1, cfg.max_seq_len - 1)
    if s >= 1:
        remedies.append(f"max_seq_len = {s} fits when split across {label}")
    if not remedies:
        remedies.append("use a smaller dtype or model, or more GPUs")
    return Shortfall(cfg.name, label, avail + short, avail, tuple(remedies))


def _split_overflow(it: _Item, needs: _Needs, devs: list[int], free: dict[int, int]) -> int:
    """Bytes missing for a split over all `devs`: each stage takes as many layers as fit (at least one), the last
    takes the rest; what overflows is the shortfall. Positive even when the sum of free memory would suffice but
    layers cannot be cut finer."""
    n = it.spec.shape.num_layers
    start, missing = 0, 0
    for i, d in enumerate(devs):
        later = len(devs) - i - 1
        end = n if later == 0 else max(start + 1, n - later)
        while later and end > start + 1 and needs(it.spec, it.kv_tokens, start, end, d).total > free[d]:
            end -= 1
        if start >= n:
            break
        missing += max(0, needs(it.spec, it.kv_tokens, start, min(end, n), d).total - free[d])
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
