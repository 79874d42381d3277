"""Plain data the planner returns: per-device budgets, each model's stages, and why a plan is infeasible."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmhost.memory.estimate import StageNeed
from llmhost.memory.inventory import Device

FitLimit = Literal["memory", "model", "kv_tokens"]  # what bounds a model's largest max_seq_len


@dataclass(frozen=True)
class DeviceBudget:
    device: Device
    runtime: int  # CUDA context + library workspaces, measured per GPU kind (memory/runtime.py)
    reserve: int  # kept free by the user's choice ([host] reserve)

    @property
    def usable(self) -> int:
        """total - external (other processes) - runtime - reserve: what models may hold; never negative."""
        return max(0, self.device.total - self.device.external - self.runtime - self.reserve)


@dataclass(frozen=True)
class Stage:
    device: int  # device index
    start: int  # first decoder layer held here
    end: int  # one past the last
    need: StageNeed


@dataclass(frozen=True)
class ModelPlan:
    name: str
    stages: tuple[Stage, ...]  # one unless the model is split; in layer order
    kv_tokens: int  # tokens the paged pool holds (whole blocks)
    kv_blocks: int
    max_seq_len: int
    max_batch: int
    max_seq_len_fit: int  # largest max_seq_len with everything else unchanged
    fit_limited_by: FitLimit
    load_order: int

    @property
    def devices(self) -> tuple[int, ...]:
        return tuple(s.device for s in self.stages)

    @property
    def total(self) -> int:
        return sum(s.need.total for s in self.stages)


@dataclass(frozen=True)
class Plan:
    budgets: tuple[DeviceBudget, ...]
    models: tuple[ModelPlan, ...]  # in load order
    block_size: int

    def stages_on(self, device: int) -> list[tuple[ModelPlan, Stage]]:
        return [(m, s) for m in self.models for s in m.stages if s.device == device]

    def used_on(self, device: int) -> int:
        return sum(s.need.total for _, s in self.stages_on(device))

    def free_on(self, device: int) -> int:
        return self.budgets[device].usable - self.used_on(device)


@dataclass(frozen=True)
class Shortfall:
    """Why a model cannot be placed, and what would make it fit (computed, never guessed)."""

    model: str
    where: str  # "GPU 0", or "GPUs 0-3 together" for a split
    need: int
    available: int
    remedies: tuple[str, ...]

    @property
    def short_by(self) -> int:
        return self.need - self.available
