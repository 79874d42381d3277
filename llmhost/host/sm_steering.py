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

The rule, per GPU, once per WINDOW_S (optionally SETTLE_WINDOW_S while it settles after a change): each held model's
hold is put down to the model it waited for (the one whose bound kept it back, GpuScheduler.blocker). A confined
model that held others at least MIN_HELD of the window is behind them: it moves back up, a level per MIN_HELD (at
most MAX_MOVE), and is never confined below its new level again (its floor: no cycling across the fair point). A
model held at least MIN_HELD of the window by models on the whole GPU is ahead: it moves down as many levels, to its
floor at most (a model that both holds and is held moves up). Two models: the one held moves down, unless the other
is confined, which then moves up instead. Four (1B, 3B, 8B, 8B shapes): both 8Bs, held by the smaller ones, move
down; one confined too far holds the other and gets SMs back (judged by the most held model alone, the confined 8B
got its SMs back whenever the other 8B was held most, and was on the whole GPU again within 3 s:
bench/results/host_trace_raw-h200/steered; the four models' throughput and p99s did not measurably change either
way, bench/results/multi_model_experiments-h200.json). A window in which the set of models with work changed decides
nothing (its holds are the newcomer's start). A change shows in the next window already (selecting a set of graphs
is instant). A model with work alone on the GPU for ALONE_WINDOWS windows gets the whole GPU back.

Dithering (`step_sms`; the host's LLMHOST_SM_DITHER=0 turns it off): the levels are coarse (8 SMs apart), and the
fair point of a pair lies between two of them, so at either one model runs ahead and fair sharing holds it back,
leaving the other's stream alone on the GPU meanwhile (the H100 pair: 3,041 GB/s held fair, 3,068 with the 14B at
104 SMs run free, 0.548 / 0.600 of solo; green_context-h100.json). A steered model replays each decode step at the
level below its own while its virtual time is ahead of the others', at its own level while behind: the mix of the
two settles where both progress alike, with fewer holds (H200, Mistral-7B + Yi-34B: 4,227 GB/s against 4,185
without, multi_model_dither-h200.json; on the H100 no gain beyond the run-to-run spread, host/core.py SM_DITHER_ENV).
With `dither_all` (the host's default since 2026-12-06, host/core.py DITHER_ALL_ENV) every model dithers so; without
it only a model the steering moved does (confined, or given SMs back after holding others), and one that fair
sharing never held on the whole GPU keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass

WINDOW_S = 0.5  # how long held time is summed before a decision
# Experiment (the host's LLMHOST_SM_SETTLE=1): while the steering settles (after a model came or left, or the set of
# models with work changed, until SETTLE_QUIET_WINDOWS windows in a row moved nothing) a window is this long
# instead. At WINDOW_S, four models started together took three decisions, 1.0-1.5 s, to reach their levels (the 8Bs
# 132 -> 104 -> 88 -> 72 SMs), a quarter to a third of the four-model bench's 4 s window (bench/probes/sm_levels.py
# over its traces), held more meanwhile. At the start the held shares are large (the 8Bs 10-17% of a window), so a
# short window tells them apart as well; once settled the longer one keeps a model near its fair point from moving
# on a few holds. Measured against half-second windows in two H100 calls (bench phases four/host,
# four/host-slowsettle when it was the default; bench/results/multi_model_settle-h100.json, multi_model-h100.json):
# worst p99 over solo 3.81x / 3.78x against 3.75x / 3.42x, aggregate 1.23 / 1.20 of the best baseline against 1.23 /
# 1.20: no gain, so it is off.
SETTLE_WINDOW_S = 0.15
SETTLE_QUIET_WINDOWS = 2
MIN_HELD = 0.05  # a model held back less than this fraction of a window is near enough its share
GRANULE = 8  # SM counts a green context may be given: Hopper partitions SMs in groups of 8 (40-112 all held)
FRACTIONS = (0.85, 0.79, 0.73, 0.67, 0.61, 0.55)  # the confined levels' shares of the GPU (132 SMs: 112 ... 72)
# The last two (80, 72 of 132 SMs) are the deep levels (the host's LLMHOST_SM_DEEP_LEVELS=0 leaves them out, for
# comparison). Without them both 8Bs of the four-model bench sat at the deepest level, 88 SMs, within a second and
# still waited for the 1B before most of their steps (bench/probes/trace_holds.py, hold_ms_by_blocker). With them,
# in two same-call comparisons on an H100 (bench/results/multi_model_deep_call1-h100.json, _call2): the 8Bs'
# launches that waited for the 1B 88-107 a run against 160-176, the worst p99 token gap over solo 3.24x / 3.17x
# against 3.33x / 3.20x, four-model throughput 1.236 of the best baseline against 1.223, the pair 3,037 GB/s
# against 3,030.
SHALLOW_LEVELS = 4  # how many of FRACTIONS' levels are kept with the deep ones left out
# Experiment (the host's LLMHOST_SM_DEEPER=1): two levels more, 64 and 56 of 132 SMs. In the record's four-model
# trace both 8Bs sat at 72 SMs, the deepest, for 78% and 92% of the window (bench/probes/sm_levels.py,
# bench/results/sm_levels_record_20261206b-h100.json) and still waited for the 1B. Simulated with the bench's
# clients, the split at which no model is held (bench/probes/hold_sim.py --clients --fair-grabs) gives the worst p99
# over solo 2.76-2.87x over four seeds against 2.98-3.04x with the split the traces show. Measured on the H100
# (bench phase four/host-deeper, bench/results/multi_model_experiments_20261206c-h100.json): worst p99 over solo
# 3.87x (the 3B) against the default's 3.37x in the same call, aggregate 1.185 of threads against 1.208: no gain, so
# it stays off (the call after it, _20261206d, had slow gaps in its solo windows and compares in ms only: the 1B's
# and 3B's p99 together 7.38 / 14.27 ms against 7.04 / 14.89). The plan counts STEERED_SETS (6) sets of graph
# executables, so these two add up to 32 MiB a model beyond it.
DEEPER_FRACTIONS = (0.49, 0.43)
MAX_MOVE = 2  # the most levels one decision moves
ALONE_WINDOWS = 10  # windows of decoding alone after which a confined model gets the whole GPU back


def confined_levels(total_sms: int, deep: bool = True, deeper: bool = False) -> tuple[int, ...]:
    """The SM counts below the whole GPU that a model's graphs are captured for, largest first (`deep`: the deep
    levels too; `deeper`, with deep: DEEPER_FRACTIONS' too)."""
    fractions = (FRACTIONS + DEEPER_FRACTIONS if deeper else FRACTIONS) if deep else FRACTIONS[:SHALLOW_LEVELS]
    levels = sorted({int(total_sms * f) // GRANULE * GRANULE for f in fractions}, reverse=True)
    return tuple(n for n in levels if 0 < n < total_sms)


def near_sms(total_sms: int, far_sms: int) -> int:
    """How many SMs to split off the start of a GPU so that at least `far_sms` are left at its far end
    (engine/sm_partition.far_stream): a multiple of GRANULE, 0 where no such split exists."""
    near = (total_sms - far_sms) // GRANULE * GRANULE
    return near if near >= GRANULE and far_sms > 0 else 0


@dataclass
class _Model:
    level: int = 0  # index into SmSteering.levels: 0 is the whole GPU
    floor: int = 0  # the deepest level it may be confined to (raised when it is given SMs back)
    held_s: float = 0.0  # held back by models on the whole GPU (or by one not named)
    holding_s: float = 0.0  # others held back waiting for it while it was confined
    ready_s: float = 0.0


class SmSteering:
    def __init__(
        self,
        total_sms: int,
        window_s: float = WINDOW_S,
        min_held: float = MIN_HELD,
        dither_all: bool = False,
        deep: bool = True,
        settle_window_s: float = WINDOW_S,
        deeper: bool = False,
    ) -> None:
        """dither_all: every model dithers, also one the steering never moved (the host's default,
        LLMHOST_DITHER_ALL=0 turns it off; a model ahead then replays its next step on fewer SMs instead of only
        being held).
        deep: the levels below 88 of 132 SMs too (False: the host's LLMHOST_SM_DEEP_LEVELS=0, for comparison).
        settle_window_s: a window's length while settling (SETTLE_WINDOW_S: the host's LLMHOST_SM_SETTLE=1).
        deeper: DEEPER_FRACTIONS' levels too (the host's LLMHOST_SM_DEEPER=1)."""
        if total_sms <= 0:
            raise ValueError("total_sms must be positive")
        self.total = total_sms
        self.dither_all = dither_all
        self.levels = (total_sms, *confined_levels(total_sms, deep, deeper))
        self.window_s = window_s
        self.settle_window_s = min(settle_window_s, window_s)
        self.min_held = min_held
        self._models: dict[str, _Model] = {}
        self._window_start: float | None = None
        self._last_ready: frozenset[str] = frozenset()
        self._alone_windows = 0
        self._quiet_windows = 0  # decisions in a row that moved nothing, with the same models ready

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

    def step_sms(self, model: str, ahead: bool) -> int:
        """The SM count of `model`'s next decode step, dithered (see the module's docstring): the level below its
        own while it is `ahead` of the others, its own otherwise; a model the steering never moved keeps its own."""
        m = self._models[model]
        moved = self.dither_all or m.level > 0 or m.floor < self.deepest
        return self.levels[min(m.level + 1, self.deepest)] if ahead and moved else self.levels[m.level]

    def observe(self, model: str, seconds: float, held: bool, by: str | None = None) -> None:
        """`model` had work for `seconds`, and (held) a decode step that fair sharing kept from starting, waiting
        for model `by` (None: not known, counted as held by a model on the whole GPU)."""
        m = self._models.get(model)
        if m is None:
            return
        m.ready_s += seconds
        if not held:
            return
        blocker = self._models.get(by) if by is not None else None
        if blocker is not None and blocker.level > 0:
            blocker.holding_s += seconds
        else:
            m.held_s += seconds

    def decide(self, now: float) -> dict[str, int]:
        """Once per window: the models whose SM count changes -> their new count (empty most of the time)."""
        if self._window_start is None:
            self._window_start = now
            return {}
        window = now - self._window_start
        if window < (self.window_s if self.settled else self.settle_window_s):
            return {}
        held = {name: m.held_s / window for name, m in self._models.items()}
        holding = {name: m.holding_s / window for name, m in self._models.items()}
        ready = frozenset(name for name, m in self._models.items() if m.ready_s > 0.0)
        for m in self._models.values():
            m.held_s = m.holding_s = m.ready_s = 0.0
        self._window_start = now
        changed = ready != self._last_ready
        self._last_ready = ready
        changes = self._alone(ready, changed)
        if not changes and not changed:
            changes = self._rebalance(held, holding)
        self._quiet_windows = 0 if changes or changed else self._quiet_windows + 1
        return {name: self.levels[self._models[name].level] for name in changes}

    def _rebalance(self, held: dict[str, float], holding: dict[str, float]) -> list[str]:
        """Confined models that held others move up (and raise their floor); models held by the others move down."""
        changes = []
        for name, m in self._models.items():
            up = self._move(holding[name])
            down = self._move(held[name])
            if up and m.level > 0:
                m.level = max(0, m.level - up)
                m.floor = min(m.floor, m.level)
            elif down and min(m.level + down, m.floor) > m.level:
                m.level = min(m.level + down, m.floor)
            else:
                continue
            changes.append(name)
        return changes

    @property
    def settled(self) -> bool:
        """Whether the last SETTLE_QUIET_WINDOWS windows moved nothing (windows are window_s long then)."""
        return self._quiet_windows >= SETTLE_QUIET_WINDOWS

    def _move(self, fraction: float) -> int:
        """Levels to move for `fraction` of a window held: one per min_held, at most MAX_MOVE."""
        return min(MAX_MOVE, int(fraction / self.min_held)) if fraction >= self.min_held else 0

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
        self._quiet_windows = 0
        for m in self._models.values():
            m.floor = self.deepest
