"""SmConfinement: SM steering applied to real decode runners. SmSteering (sm_steering.py) decides, per GPU, how
many SMs each model's decode graphs may use; this captures each model's confined graph sets when it becomes
resident, feeds the steering what the host loop saw, and selects the set it decides on.

Steering only moves bandwidth between models: where green contexts are not available, or a capture fails, the
GPU goes back to unconfined graphs for good and its models keep serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import torch

from llmhost.host.gpu_scheduler import CONCURRENT_MAX_ROWS
from llmhost.host.sm_steering import SmSteering
from llmhost.host.step_trace import StepTrace

if TYPE_CHECKING:
    from llmhost.engine.decode_runner import DecodeRunner  # imports Triton: a GPU-only dependency

log = logging.getLogger("llmhost.host")


class SmConfinement:
    def __init__(
        self,
        runner_of: Callable[[str], DecodeRunner | None],
        trace: StepTrace | None = None,
        new_steering: Callable[[int], SmSteering] = SmSteering,
    ) -> None:
        """runner_of: a resident model's decode runner, None when it has none (a CPU, a split model, a fake).
        new_steering: a GPU's SmSteering from its SM count, with the host's options (host/core.py)."""
        self._runner_of = runner_of
        self._new_steering = new_steering
        self._trace = trace
        self._steering: dict[str, SmSteering] = {}  # per GPU: how many SMs each model's decode graphs may use
        self._observed_at: dict[str, float] = {}  # per GPU: when its steering last observed the ready models
        # (model, SMs) -> its confined stream, for the host's lifetime: a swap-in reuses it (green contexts are
        # never destroyed, engine/sm_partition.py).
        self._streams: dict[tuple[str, int], torch.cuda.Stream] = {}
        self._off: set[str] = set()  # GPUs left unsteered: no green contexts, or a capture failed
        self._resident: dict[str, list[str]] = {}  # per GPU: its models, in arrival order

    def steers(self, device: str) -> bool:
        return device in self._steering

    def add(self, name: str, device: str) -> None:
        """`name` became resident on `device`. Once the GPU holds two models or more, capture the graphs of every
        model there that has none yet, of the sizes that run beside other models' (concurrent_ok), on a stream
        confined to each of the GPU's steering levels, and steer them from now on.

        Not with a GPU's first model: green contexts and the graphs captured on them serve only models that share
        the GPU, and making them slows every later kernel of the process (a lone 7B model's decode by ~1.5%: the
        side-stream slowdown, host/core.py _default_stream_ok), besides the memory and capture time they take."""
        if device in self._off or not torch.cuda.is_available():
            return
        # A model without a runner (split over GPUs) is not steered, but a model beside it still shares the GPU.
        resident = self._resident.setdefault(device, [])
        resident.append(name)
        if len(resident) < 2:
            return
        steered = self._steering[device].models if device in self._steering else ()
        waiting = [n for n in resident if n not in steered and self._runner_of(n) is not None]
        if any(n != name for n in waiting):
            # A model resident before may have a step in flight that reads its runner's static buffers, which a
            # capture rewrites (padding inputs, logits): its sampling was queued behind it, so once the GPU is
            # idle nothing of that step reads them again.
            torch.cuda.synchronize(device)
        for n in waiting:
            try:
                self._add(n, device)
            except Exception as e:  # a driver refusing a context, memory short for the extra graphs
                log.warning("SM steering off on %s: capturing %s's confined graphs failed (%s)", device, n, e)
                self._turn_off(device, failed=(n,))
            if device in self._off:
                return

    def remove(self, name: str) -> None:
        for models in self._resident.values():
            if name in models:
                models.remove(name)
        for steering in self._steering.values():
            steering.remove(name)

    def observe(self, device: str, ready: Iterable[str], held: Mapping[str, str]) -> None:
        """Which models on `device` had work since the last call, and which of them had a decode step that fair
        sharing kept from starting -> the model it waited for; a model whose SM count the steering changes
        replays the graphs captured for that many SMs from its next decode step on."""
        steering = self._steering.get(device)
        if steering is None:
            return
        now = time.perf_counter()
        seconds = now - self._observed_at.get(device, now)
        self._observed_at[device] = now
        for name in ready:
            steering.observe(name, seconds, name in held, held.get(name))
        for name, sms in steering.decide(now).items():
            runner = self._runner_of(name)
            if runner is not None:
                runner.select(None if sms >= steering.total else sms)
            if self._trace is not None:
                self._trace.add("confine", name, 0, 0, sms=sms)

    def dither(self, name: str, device: str, ahead: bool) -> None:
        """Before `name`'s next decode step on a steered GPU: select the graphs of the SM count SmSteering.step_sms
        gives it, the level below its own while it is `ahead` of the others."""
        self._select_step(name, device, lambda steering: steering.step_sms(name, ahead))

    def keep_within(self, name: str, device: str, sms: int) -> None:
        """Before `name`'s next decode step on a steered GPU: its graphs on at most `sms` SMs (the deepest of its
        own level and the largest steering level that fits), whatever the steering gives it."""

        def within(steering: SmSteering) -> int:
            fitting = [n for n in steering.levels if n <= sms] or [steering.levels[-1]]
            return min(steering.sms(name), fitting[0])

        self._select_step(name, device, within, apart=True)

    def _select_step(self, name: str, device: str, choose: Callable[[SmSteering], int], **traced: bool) -> None:
        """Select the graphs of the SM count `choose` gives `name` from its GPU's steering, for its next decode step
        (traced as a "dither" where it changes); nothing for a model the GPU does not steer."""
        steering = self._steering.get(device)
        runner = self._runner_of(name)
        if steering is None or runner is None or name not in steering.models:
            return
        sms = choose(steering)
        want = None if sms >= steering.total else sms
        if runner.sms != want:
            runner.select(want)
            if self._trace is not None:
                self._trace.add("dither", name, 0, 0, sms=sms, **traced)

    def _add(self, name: str, device: str) -> None:
        from llmhost.engine.sm_partition import confined_stream, sm_count

        steering = self._steering.get(device)
        if steering is None:
            steering = self._new_steering(sm_count(device))
        streams: dict[int, torch.cuda.Stream] = {}
        for sms in steering.levels[1:]:
            stream = self._streams.get((name, sms)) or confined_stream(device, sms)
            if stream is None:  # no green contexts here
                self._turn_off(device)
                return
            self._streams[(name, sms)] = streams[sms] = stream
        runner = self._runner_of(name)
        assert runner is not None  # checked by add()
        t0 = time.perf_counter()
        runner.capture_confined(streams, CONCURRENT_MAX_ROWS)
        took = time.perf_counter() - t0
        how = "to be captured on first use" if runner.capture_on_demand else f"captured in {took:.2f} s"
        log.info("%s: decode graphs confined to %s SMs %s", name, sorted(streams), how)
        self._steering[device] = steering
        steering.add(name)

    def _turn_off(self, device: str, failed: tuple[str, ...] = ()) -> None:
        """Every model of the GPU back on its whole-GPU graphs, for good (`failed`: a model whose capture failed
        part way, not yet steered, whose confined sets are released too)."""
        self._off.add(device)
        steering = self._steering.pop(device, None)
        for name in {*(steering.models if steering is not None else ()), *failed}:
            runner = self._runner_of(name)
            if runner is not None:
                runner.drop_confined()
