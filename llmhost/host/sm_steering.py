"""SmSteering: how many of a GPU's SMs each model's decode graphs may use, so that models decoding at once split
the GPU near their fair shares by themselves, and fair sharing has to hold them back less. Pure arithmetic over
the time the host saw each model held back; no torch.

Why: the GPU scheduler is fair by holding back the model ahead of its share (GpuScheduler.launch_ok), which leaves
the others' streams alone on the GPU for that time. Two batch-1 models free on two streams split the bandwidth
unevenly (Qwen2.5-14B 0.62 of its solo speed, Mistral-7B 0.52: the larger kernels take more SMs), and stream
priorities do not move that (bench/probes/stream_priority.py); holding the 14B back made the pair fair at 2,989
GB/s against free threads' 3,047. Its graphs captured on 104 of the H100's 132 SMs instead: 3,068 GB/s beside the
free 7B, normalized 0.548 / 0.600 (bench/probes/green_context.py, bench/results/green_context-h100.json).

A model's graphs are captured ahead for each of a few SM counts (`levels`: the whole GPU, then FRACTIONS of it in
multiples of GRANULE, as green contexts partition SMs in groups of 8 on Hopper), so a change only picks another set.

The rule, per GPU, once per WINDOW_S: each model's held fraction is the share of the window in which it had a
decode step ready and fair sharing kept it from starting. If the most-held model was held at least MIN_HELD of
the window, levels move by one per MIN_HELD held (at most MAX_MOVE): when another model is confined, that one
moves back up (it is behind: more SMs help it catch up) and is never confined below its new level again (its
floor: no cycling across the fair point); otherwise the most-held model moves down, to its floor at most. A window
in which the set of models with work changed decides nothing (its holds are the newcomer's start). A change shows
in the next window already (selecting a set of graphs is instant). A model with work alone on the GPU for
ALONE_WINDOWS windows gets the whole GPU back.
"""

from __future__ import annotations

from dataclasses import dataclass

WINDOW_S = 0.5  # how long held time is summed before a decision
MIN_HELD = 0.05  # a model held back less than this fraction of a window is near enough its share
GRANULE = 8  # SM counts a green context may be given: Hopper partitions SMs in groups of 8 (40-112 all held)
FRACTIONS = (0.85, 0.79, 0.73, 0.67)  # the confined levels' shares of the GPU (132 SMs: 112, 104, 96, 88)
MAX_MOVE = 2  # the most levels one decision moves
ALONE_WINDOWS = 10  # windows of decoding alone after which a confined model gets the whole GPU back


def confined_levels(total_sms: int) -> tuple[int, ...]:
    """The SM counts below the whole GPU that a model's graphs are captured for, largest first."""
    levels = sorted({int(total_sms * f) // GRANULE * GRANULE for f in FRACTIONS}, reverse=True)
    return tuple(n for n in levels if 0 < n < total_sms)


@dataclass
class _Model:
    level: int = 0  # index into SmSteering.levels: 0 is the whole GPU
    floor: int = 0  # the deepest level it may be confined to (raised when it is given SMs back)
    held_s: float = 0.0
    ready_s: float = 0.0


class SmSteering:
    def __init__(self, total_sms: int, window_s: float = WINDOW_S, min_held: float = MIN_HELD) -> None:
        if total_sms <= 0:
            raise ValueError("total_sms must be positive")
        self.total = total_sms
        self.levels = (total_sms, *confined_levels(total_sms))
        self.window_s = window_s
        self.min_held = min_held
        self._models: dict[str, _Model] = {}
        self._window_start: float | None = None
        self._last_ready: frozenset[str] = frozenset()
        self._alone_windows = 0

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self._models)

    @property
    def deepest(self) -> int:
        return len(self.levels) - 1

    def add(self, model: str) -> None:
        """A model now resident on the GPU, on the whole GPU."""
        self._models[model] = _Model(floor=self.deepest)
        self._reset_floors()

    def remove(self, model: str) -> None:
        self._models.pop(model, None)
        self._reset_floors()

    def sms(self, model: str) -> int:
        return self.levels[self._models[model].level]

    def observe(self, model: str, seconds: float, held: bool) -> None:
        """`model` had work for `seconds`, and (held) a decode step that fair sharing kept from starting."""
        m = self._models.get(model)
        if m is None:
            return
        m.ready_s += seconds
        if held:
            m.held_s += seconds

    def decide(self, now: float) -> dict[str, int]:
        """Once per window: the models whose SM count changes -> their new count (empty most of the time)."""
        if self._window_start is None:
            self._window_start = now
            return {}
        window = now - self._window_start
        if window < self.window_s:
            return {}
        held = {name: m.held_s / window for name, m in self._models.items()}
        ready = frozenset(name for name, m in self._models.items() if m.ready_s > 0.0)
        for m in self._models.values():
            m.held_s = m.ready_s = 0.0
        self._window_start = now
        changed = ready != self._last_ready
        self._last_ready = ready
        changes = self._alone(ready, changed)
        if not changes and not changed and held:
            top = max(held, key=lambda n: held[n])
            if held[top] >= self.min_held:
                changes = self._rebalance(top, min(MAX_MOVE, int(held[top] / self.min_held)))
        return {name: self.levels[self._models[name].level] for name in changes}

    def _rebalance(self, top: str, move: int) -> list[str]:
        """`top` was held the most: the most confined other model `move` levels up, or else `top` down."""
        confined = [n for n, m in self._models.items() if n != top and m.level > 0]
        if confined:
            name = max(confined, key=lambda n: self._models[n].level)
            m = self._models[name]
            m.level = max(0, m.level - move)
            m.floor = min(m.floor, m.level)
            return [name]
        m = self._models[top]
        deeper = min(m.level + move, m.floor)
        if deeper == m.level:
            return []
        m.level = deeper
        return [top]

    def _alone(self, ready: frozenset[str], changed: bool) -> list[str]:
        """A confined model alone with work for ALONE_WINDOWS windows gets the whole GPU back."""
        if len(ready) != 1 or changed:
            self._alone_windows = 0
        if len(ready) != 1:
            return []
        name = next(iter(ready))
        if self._models[name].level == 0:
            return []
        self._alone_windows += 1
        if self._alone_windows < ALONE_WINDOWS:
            return []
        self._alone_windows = 0
        self._models[name].level = 0
        self._reset_floors()
        return [name]

    def _reset_floors(self) -> None:
        """Another set of models: where the fair point lies is to be found again."""
        for m in self._models.values():
            m.floor = self.deepest
