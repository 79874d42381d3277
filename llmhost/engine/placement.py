"""LayerPlacement: which device runs which decoder layers of one model (pipeline stages, in layer order).

The first stage also holds the embedding, the last the final norm and the LM head; a tied head gets its own copy
on the last stage whenever there is more than one stage (memory/estimate.py `stage_weights` counts it so).
Stages are distinct by position, not by device: two stages on the same device are still two stages (two KV pools,
a hand-off between them), which is what lets CPU tests run the split path with every stage on "cpu".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from llmhost.errors import ConfigError
from llmhost.memory.plan import Stage


@dataclass(frozen=True)
class StagePlacement:
    device: torch.device
    start: int  # first decoder layer on this stage
    end: int  # one past the last

    @property
    def layers(self) -> range:
        return range(self.start, self.end)


# What Engine.load accepts: (device, start, end) per stage.
StageSpec = tuple[str | torch.device, int, int]


@dataclass(frozen=True)
class LayerPlacement:
    stages: tuple[StagePlacement, ...]  # contiguous, covering layers [0, num_layers), in layer order

    @classmethod
    def single(cls, device: str | torch.device, num_layers: int) -> LayerPlacement:
        return cls((StagePlacement(torch.device(device), 0, num_layers),))

    @classmethod
    def of(cls, stages: Sequence[StageSpec | StagePlacement], num_layers: int) -> LayerPlacement:
        """Validated stages: non-empty, contiguous, in order, covering every layer. Raises ConfigError naming the
        first bad stage."""
        parts = tuple(
            s if isinstance(s, StagePlacement) else StagePlacement(torch.device(s[0]), int(s[1]), int(s[2]))
            for s in stages
        )
        if not parts:
            raise ConfigError("a layer placement needs at least one stage")
        expect = 0
        for k, s in enumerate(parts):
            if s.start != expect or s.end <= s.start:
                raise ConfigError(
                    f"stage {k} holds layers [{s.start}, {s.end}) but must start at layer {expect} and hold at least "
                    f"one layer: stages are contiguous ranges covering layers [0, {num_layers}) in order"
                )
            expect = s.end
        if expect != num_layers:
            raise ConfigError(f"the stages end at layer {expect} but the model has {num_layers} layers")
        return cls(parts)

    @classmethod
    def from_plan(
        cls, stages: Sequence[Stage], devices: Mapping[int, str | torch.device], num_layers: int
    ) -> LayerPlacement:
        """The planner's stages (device indices) on torch devices: `devices` maps a plan index to its device
        (e.g. {0: "cuda:0", 1: "cuda:1"}; tests map every index to "cpu")."""
        return cls.of([(devices[s.device], s.start, s.end) for s in stages], num_layers)

    @property
    def split(self) -> bool:
        return len(self.stages) > 1

    @property
    def first(self) -> torch.device:
        return self.stages[0].device

    @property
    def last(self) -> torch.device:
        return self.stages[-1].device

    @property
    def devices(self) -> tuple[torch.device, ...]:
        """Each device once, in stage order."""
        return tuple(dict.fromkeys(s.device for s in self.stages))

    def stage_of(self, layer: int) -> int:
        for k, s in enumerate(self.stages):
            if s.start <= layer < s.end:
                return k
        raise IndexError(f"layer {layer} is on no stage")

    def device_of(self, layer: int) -> torch.device:
        return self.stages[self.stage_of(layer)].device
