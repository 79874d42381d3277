"""GpuScheduler: which model steps next on each device, how long a prefill chunk may be, and whether two models'
steps may share the GPU on separate CUDA streams. Pure arithmetic over the GPU seconds the host measures; no torch.

Fair sharing is start-time fair queuing (stride scheduling): every model carries a virtual time, the measured GPU
seconds of its steps divided by its weight, and `pick` returns the ready model with the smallest. Over any window in
which a set of models stays ready, each one's share of GPU time tends to weight / (sum of their weights), whatever
its step costs, within one step's cost / weight. A model that was not ready, and becomes ready, has its virtual
time lifted to the smallest of the models that stayed ready (the WFQ rule): time it spent idle earns no credit, so
it takes no burst, and models with nothing to do take no share.

Two models' small decode steps may overlap on two CUDA streams (`concurrent_ok`). An overlapped step is charged
what it costs alone (its model's decode_step_s, measured on steps that ran alone), not its wall time: both steps
take about as long as the pair, so charging wall time would give each model one step per pair whatever its weight,
and the smaller model's speed would fall to its step time over the pair's (the report's starved small model). With
solo costs, virtual time counts each model's normalized progress (its speed together over its speed alone), which
is what fair sharing promises. `launch_ok` lets a model start beside the steps in flight only when its virtual
time is within every other active model's current step (start-time fair queuing's eligibility), so overlap never
lets it run ahead.

A prompt step's charge is spread over its model's next steps (`charge`'s `spread`), at most MAX_DEBT_STEPS of its
decode steps outstanding: the bound on a model's lead grows by that much, and its decoding requests keep going while
it is repaid instead of stopping until the others catch up.

Invariants: virtual times only grow; a lone ready model is always picked; devices are independent of each other.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field

# One KV block at the default block size: a prefill always advances by at least this many tokens per step, so a
# prompt finishes even beside the fastest decoder (a 16-token chunk costs about as much as a decode step).
MIN_PREFILL_TOKENS = 16
# Weight of the newest sample in the step-cost averages: about the last five steps count, so an estimate follows a
# batch-size change within a few steps, while one slow step (a Python hiccup) moves it by a fifth only.
EMA_ALPHA = 0.2
# Decode steps of up to this many rows may overlap on two streams. DESIGN.md measured overlapped decode at batch 1:
# two CUDA streams in one process reach ~1.10 normalized throughput (steps one after the other: 1.0), two threads
# 0.47 + 0.72 of solo against strict alternation's 0.21 + 0.79; there is room because one graph-replayed decode
# step alone reaches only 71-83% of copy bandwidth (bench/results/decode-h100.json). Up to 8 rows a decode step is
# still that weight-streaming step: its time is within 3% (prompt 128) to 12% (prompt 2048) of batch 1's. Larger
# batches were not measured overlapped; a prefill (compute-bound, 61-67% of GEMM peak) would only lengthen the
# other model's decode step.
CONCURRENT_MAX_ROWS = 8
# A prompt step's charge is spread over the model's next steps (charge's `spread`): each adds this fraction of its
# own cost from the debt, so its decoding requests run at 1 / (1 + DEBT_RATE) of the model's share meanwhile...
# At 0.5 with 4 steps outstanding at most, two 512-token prompts of an 8B beside three models (20-25 ms each)
# overflowed the debt and its decoding requests waited 40-47 ms for the others to catch up, its p99 inter-token
# latency (bench/probes/host_trace.py). Repaid at 15% of each step, they slow by that much for longer instead; the
# four-model bench's prompts (a 128-token prompt per 32 decode steps of each model) cost well under that per step.
DEBT_RATE = 0.15
# ...and at most this many of its decode steps' cost stays outstanding (a model of long prompts and short answers
# takes at most that much GPU time ahead of its share); beyond it the charge counts at once.
MAX_DEBT_STEPS = 16.0


@dataclass(frozen=True)
class StepShape:
    """The size of one model's next step, as the host reads it from the engine's StepPlan."""

    decode_rows: int  # sequences taking their one decode token
    prefill_tokens: int  # prompt tokens of the chunks still in prefill


def concurrent_ok(first: StepShape, second: StepShape, max_rows: int = CONCURRENT_MAX_ROWS) -> bool:
    """Whether two models' steps may run at once on separate CUDA streams of one GPU: decode-only steps of at most
    `max_rows` rows (the case measured to raise total throughput, see CONCURRENT_MAX_ROWS), and one step with
    prompt tokens beside them. Letting the GPU drain before every prompt step stalled every other model for that
    step's whole time (an early H100 run of bench/multi_model.py, four models: p99 inter-token latency 7-9x solo), so a
    prompt now runs beside the decodes and only lengthens them; two prompt steps never overlap."""
    if first.prefill_tokens and second.prefill_tokens:
        return False
    return all(s.prefill_tokens > 0 or 0 < s.decode_rows <= max_rows for s in (first, second))


@dataclass
class _Account:
    """One model's standing on its device."""

    device: str
    weight: float
    vtime: float = 0.0  # virtual seconds: GPU seconds / weight, plus lifts when it becomes ready
    gpu_s: float = 0.0  # measured GPU seconds charged since it was added
    debt: float = 0.0  # virtual seconds of prompt steps charged but not yet added to vtime (charge's `spread`)
    last_pick: int = -1  # the lane's pick count when it was last picked: ties go to the least recently picked
    decode_step_s: float | None = None  # EMA, seconds per decode-only step
    prefill_token_s: float | None = None  # EMA, seconds per prefill token beyond the step's decode cost
    smallest_prefill: tuple[int, float] | None = None  # (tokens, EMA seconds) of its smallest solo prefill step
    largest_prefill: tuple[int, float] | None = None  # (tokens, EMA seconds) of its largest prefill step
    cheapest_prefill: tuple[int, float] | None = None  # (tokens, EMA seconds) of its smallest prefill step, ever


@dataclass
class _Lane:
    """One device: its models in the order they were added and who was ready at the last pick."""

    models: dict[str, _Account] = field(default_factory=dict)
    active: set[str] = field(default_factory=set)  # ready or busy at the last pick
    clock: float = 0.0  # smallest virtual time among the active models at the last pick
    picks: int = 0


class GpuScheduler:
    """Weighted fair sharing of measured GPU time between the models of each device (one lane per device name,
    e.g. "cuda:0" or "cpu"). The host's loop: `pick` a model, run its step, `charge` the step's GPU seconds and
    `observe` its size; before a prefill step it caps the chunk at `prefill_budget`."""

    def __init__(
        self, min_prefill_tokens: int = MIN_PREFILL_TOKENS, ema_alpha: float = EMA_ALPHA, lead_steps: float = 1.0
    ) -> None:
        """lead_steps: how far past another model's bound a model may start, in its own decode steps beyond the
        first (1: start-time fair queuing's eligibility, the default). An experiment (the host's LLMHOST_LEAD_STEPS):
        an 8B was held 0-7 ms before 67-86% of its steps beside three models, its p99 inter-token latency
        (bench/results/trace_holds-h200.json); a lead of two of its steps holds it less often, fair on average
        still, each model's lead bounded by one more of its own steps."""
        if min_prefill_tokens < 1 or not 0.0 < ema_alpha <= 1.0 or not 1.0 <= lead_steps < math.inf:
            raise ValueError("min_prefill_tokens must be >= 1, ema_alpha in (0, 1] and lead_steps >= 1")
        self.min_prefill_tokens = min_prefill_tokens
        self.ema_alpha = ema_alpha
        self.lead_steps = lead_steps
        self._lanes: dict[str, _Lane] = {}
        self._accounts: dict[str, _Account] = {}

    # -- membership ---------------------------------------------------------------------------------------------

    def add(self, model: str, device: str, weight: float = 1.0) -> None:
        """Register a resident model on `device` with its share `weight` (> 0, ModelConfig.weight). It starts with
        no credit: at its first pick it is lifted to the device's current virtual time."""
        if model in self._accounts:
            raise ValueError(f"model '{model}' is already in the GPU scheduler (on {self._accounts[model].device})")
        if not weight > 0.0 or math.isinf(weight):
            raise ValueError(f"model '{model}': weight must be a positive number, got {weight}")
        acct = _Account(device, weight)
        self._accounts[model] = acct
        self._lanes.setdefault(device, _Lane()).models[model] = acct

    def remove(self, model: str) -> None:
        """Forget a model (unloaded, parked or failed); the others' shares are then computed without it."""
        acct = self._account(model)
        del self._accounts[model]
        lane = self._lanes[acct.device]
        del lane.models[model]
        lane.active.discard(model)
        if not lane.models:
            del self._lanes[acct.device]

    # -- fair sharing -------------------------------------------------------------------------------------------

    def pick(self, device: str, ready: Collection[str], busy: Collection[str] = ()) -> str | None:
        """The ready model of `device` that steps next: the smallest virtual time (ties: the least recently picked,
        then the earliest added, so a model lifted level with others is not passed over forever); None when none
        is ready. `ready`: models whose next step would do work (a model whose engine has work but
        schedules an empty step must be left out, or it would be picked again and again for free). `busy`: models
        whose step is still in flight on another stream; they are not candidates but count as active, so they are
        not lifted at the next pick. Names on other devices are ignored; unknown names raise KeyError."""
        for name in (*ready, *busy):
            self._account(name)
        lane = self._lanes.get(device)
        if lane is None:
            return None
        wanted = set(ready)
        candidates = [m for m in lane.models if m in wanted]
        active = {m for m in lane.models if m in wanted or m in busy}
        staying = active & lane.active
        # The WFQ rule: a newcomer starts at the smallest virtual time of those that stayed active (or, when all
        # are new, where the device's clock stopped), so idle time is never banked as credit.
        floor = min((lane.models[m].vtime for m in staying), default=lane.clock)
        for m in active - lane.active:
            acct = lane.models[m]
            acct.vtime = max(acct.vtime, floor)
        lane.active = active
        if active:
            lane.clock = max(lane.clock, min(lane.models[m].vtime for m in active))
        if not candidates:
            return None
        chosen = min(candidates, key=lambda m: (lane.models[m].vtime, lane.models[m].last_pick))
        lane.models[chosen].last_pick = lane.picks
        lane.picks += 1
        return chosen

    def charge(self, model: str, seconds: float, spread: bool = False) -> None:
        """Account `seconds` of GPU time to `model` (its step's CUDA-event or wall time). When two steps overlapped
        on separate streams, charge each what it costs alone (`solo_step_s`; see the module's docstring).

        `spread` (a prompt step): the virtual time is deferred, up to MAX_DEBT_STEPS of the model's decode steps
        outstanding, and added by its next steps at DEBT_RATE of their own cost each. Added at once, a prompt of a
        few decode steps' cost put the model that far ahead of the others, and all its decoding requests stopped
        until they caught up: in the four-model bench an 8B's 512-token prompt (14 ms alone) stopped its other
        requests for 40-60 ms, its p99 inter-token latency. Spread, they slow to 1 / (1 + DEBT_RATE) of their
        share for a few steps. Its GPU seconds (`shares`) count in full at once."""
        if not seconds >= 0.0 or math.isinf(seconds):
            raise ValueError(f"model '{model}': GPU time must be a finite number of seconds >= 0, got {seconds}")
        acct = self._account(model)
        acct.gpu_s += seconds
        virtual = seconds / acct.weight
        if spread:
            room = max(0.0, MAX_DEBT_STEPS * (acct.decode_step_s or 0.0) / acct.weight - acct.debt)
            deferred = min(virtual, room)
            acct.debt += deferred
            virtual -= deferred
        else:
            repaid = min(acct.debt, DEBT_RATE * virtual)
            acct.debt -= repaid
            virtual += repaid
        acct.vtime += virtual

    def shares(self, device: str) -> dict[str, float]:
        """Each model's fraction of the GPU seconds charged on `device` since it was added (all 0.0 before any
        charge; models removed since do not count)."""
        lane = self._lanes.get(device)
        if lane is None:
            return {}
        total = sum(a.gpu_s for a in lane.models.values())
        return {m: (a.gpu_s / total if total > 0.0 else 0.0) for m, a in lane.models.items()}

    def gpu_seconds(self, model: str) -> float:
        """GPU seconds charged to `model` since it was added."""
        return self._account(model).gpu_s

    def standing(self, model: str) -> tuple[float, float]:
        """(virtual time, debt not yet added to it) of `model`, in virtual seconds: for the host's step trace."""
        acct = self._account(model)
        return acct.vtime, acct.debt

    def solo_step_s(self, model: str, shape: StepShape | None = None) -> float | None:
        """What the model's step costs when it runs alone: its decode step (EMA; `shape` None or decode-only), plus
        its prompt tokens at prefill_token_s for a step with prompt tokens. Both are sampled on steps that ran
        without another model's beside them (`observe`); None before they were measured."""
        acct = self._account(model)
        if acct.decode_step_s is None or shape is None or not shape.prefill_tokens:
            return acct.decode_step_s
        if acct.prefill_token_s is None:
            return None
        return acct.decode_step_s + shape.prefill_tokens * acct.prefill_token_s

    def launch_ok(
        self, model: str, in_flight_s: Mapping[str, float], prompt: bool = False, done_s: Mapping[str, float] = {}
    ) -> bool:
        """Whether `model` (just picked, with no step in flight) may start a step now on another stream beside the
        steps in flight without running ahead of its share: its virtual time must not pass the end of any other
        active model's current step, vtime + (its steps in flight, or the decode step it would take next) /
        weight: start-time fair queuing's eligibility, judged against every active model. `in_flight_s`: every
        model of the device with steps in flight -> their expected solo cost (a prompt step's counts in full:
        judged by a decode step's, every other model waited beside a 20-50 ms prompt step of a 1B model while the
        GPU ran it alone, bench/probes/host_trace.py). Judged against any one step in flight instead, two models
        of about the same virtual time let each other start again and again, drifting ahead of a third that
        lagged, until both were collected at once and stopped for 100 ms while it caught up (the four-model bench:
        the 8Bs' p99 inter-token latency 75-100 ms).

        The model needs a measured solo decode step, the cost an overlapped decode step is charged; until then it
        steps alone (which measures it). A `prompt` step (prompt-only) needs none: it is charged its measured time
        where its solo cost is unknown, and a model's first step is its prompt. Nothing starts beside a step of a
        model without a measured decode step (its step is that measurement); such a model with no step in flight
        bounds nothing.

        `done_s`: models with a decode step in flight -> how much of its solo cost has run by now, as the host
        estimates from the wall time it has been running (the host's `_done_in_flight`). Such a model's bound
        moves on with its step: it is the later of the end of its steps in flight and one decode step past where
        it is now, so a model held back waits until the others have got far enough, not until one of them is
        collected (waits as long as an 8B's whole step, 15 ms, beside four models: bench/probes/host_trace.py).
        The lead it allows stays within two of each other model's steps."""
        acct = self._account(model)
        if acct.decode_step_s is None and not prompt:
            return False
        if any(self._account(m).decode_step_s is None for m in in_flight_s if m != model):
            return False
        return self._within_steps(acct, acct.vtime, in_flight_s, done_s, unmeasured_blocks=False)

    def follow_ok(self, model: str, in_flight_s: Mapping[str, float], done_s: Mapping[str, float] = {}) -> bool:
        """Whether `model`, whose step is in flight and not yet charged, may queue its next decode step behind it
        on its stream now (running ahead, as a model alone does), although other models share the GPU.
        `in_flight_s`: every model of the device with a step in flight -> the seconds it will be charged for it
        (its solo cost). The next step's start (model's virtual time once its step in flight is charged) must
        not pass the end of any other active model's current step, as in launch_ok; an active model without a
        measured decode step blocks it (it waits for the GPU to drain, to be measured alone). Without running
        ahead the host relaunched each model only after collecting its step, and the GPU idled on that stream
        meanwhile (the batch-1 pair reached 0.95 of two threads that each run ahead). `done_s` as in launch_ok."""
        acct = self._account(model)
        if acct.decode_step_s is None or model not in in_flight_s:
            return False
        start = acct.vtime + in_flight_s[model] / acct.weight
        return self._within_steps(acct, start, in_flight_s, done_s, unmeasured_blocks=True)

    def lead(self, model: str, in_flight_s: Mapping[str, float]) -> float | None:
        """How far `model` is ahead of the other active models of its device, in virtual seconds: its virtual time
        less the mean of theirs, each with its steps in flight (`in_flight_s`: model -> their expected solo cost,
        not yet charged) added; negative when behind; None when no other model is active. SM steering's dithering
        (SmSteering.step_sms) reads its sign."""
        acct = self._account(model)
        lane = self._lanes[acct.device]

        def at(name: str, a: _Account) -> float:
            return a.vtime + in_flight_s.get(name, 0.0) / a.weight

        others = [at(n, a) for n, a in lane.models.items() if a is not acct and n in lane.active]
        return at(model, acct) - sum(others) / len(others) if others else None

    def blocker(self, model: str, in_flight_s: Mapping[str, float], done_s: Mapping[str, float] = {}) -> str | None:
        """The other active model whose bound keeps `model` (with no step in flight) from starting a step now, as
        launch_ok judges it: of the bounds its virtual time passes, the smallest, the one it waits for longest.
        None when no measured bound holds it. SM steering gives SMs back to a confined model that holds others."""
        acct = self._account(model)
        bounds = self._bounds(acct, in_flight_s, done_s)
        start = acct.vtime - self._slack(acct)
        held = [(bound, other) for other, bound in bounds if bound is not None and start > bound]
        return min(held)[1] if held else None

    def _slack(self, acct: _Account) -> float:
        """Virtual seconds a model may start past another's bound: lead_steps - 1 of its own decode steps."""
        return (self.lead_steps - 1.0) * (acct.decode_step_s or 0.0) / acct.weight

    def _within_steps(
        self,
        acct: _Account,
        start: float,
        in_flight_s: Mapping[str, float],
        done_s: Mapping[str, float],
        unmeasured_blocks: bool,
    ) -> bool:
        """Whether virtual time `start` is within every other active model's bound (_bounds), past it by at most
        the model's slack (lead_steps)."""
        start -= self._slack(acct)
        for _, bound in self._bounds(acct, in_flight_s, done_s):
            if bound is None:
                if unmeasured_blocks:
                    return False
                continue
            if start > bound:
                return False
        return True

    def _bounds(
        self, acct: _Account, in_flight_s: Mapping[str, float], done_s: Mapping[str, float]
    ) -> Iterator[tuple[str, float | None]]:
        """Each other active model of `acct`'s device -> its bound in virtual time: the end of its steps in flight
        (or of the decode step it would take next), or one decode step past where it is now (`done_s`), whichever
        is later; None for a model without a measured decode step."""
        lane = self._lanes[acct.device]
        for other, o in lane.models.items():
            if o is acct or other not in lane.active:
                continue
            step_s = in_flight_s.get(other, o.decode_step_s)
            if step_s is None:
                yield other, None
                continue
            if other in done_s and o.decode_step_s is not None:
                step_s = max(step_s, done_s[other] + o.decode_step_s)
            yield other, o.vtime + step_s / o.weight

    def expected_step_s(self, model: str, shape: StepShape) -> float:
        """What a step of `shape` is expected to cost the GPU alone: its decode step (decode_step_s) plus its
        prompt tokens at prefill_token_s, or proportionally from the largest prefill step measured; a model not
        measured yet: 0.0 (its first steps run one after the other, which measures them)."""
        acct = self._account(model)
        base = acct.decode_step_s or 0.0
        if not shape.prefill_tokens:
            return base
        if acct.prefill_token_s is not None:
            return base + shape.prefill_tokens * acct.prefill_token_s
        if acct.largest_prefill is not None:
            n_max, t_max = acct.largest_prefill
            return t_max * shape.prefill_tokens / n_max
        return base

    # -- step costs and prefill chunking ------------------------------------------------------------------------

    def observe(
        self, model: str, decode_rows: int, prefill_tokens: int, seconds: float, overlapped: bool = False
    ) -> None:
        """Feed the step-cost estimates with one executed step: `decode_rows` decode tokens, `prefill_tokens`
        prompt tokens, `seconds` from launch to completion on the GPU (its latency, even if it overlapped).

        - A decode-only step that ran alone samples decode_step_s, the model's base step time (nearly flat in
          the row count at small batches; the average follows the batch). An `overlapped` one (another step ran
          beside it on another stream, its own model's prompt step too) does not: its latency is the pair's.
        - A step with prefill samples prefill_token_s, the seconds each prefill token adds, as the slope of a
          secant from a reference step: (seconds - ref_s) / (prefill_tokens - ref_tokens). The reference is the
          decode step (0 tokens, decode_step_s) once one was measured; before that (a model whose first steps are
          a prompt), its smallest prefill step so far, whose size gives no slope by itself. An `overlapped` one
          (another model's step beside it; its own model's decode steps may run beside it, as they do when it is
          alone) does not: beside three decoding models a prompt step took 5-10x its time alone.
        - The largest and the cheapest prefill steps are kept too (tokens, seconds), overlapped or not:
          prefill_budget extrapolates only proportionally from them, and where the slope was never measured alone
          an overlapped step's time is the only bound there is."""
        if decode_rows < 0 or prefill_tokens < 0 or not seconds >= 0.0 or math.isinf(seconds):
            raise ValueError(f"model '{model}': step sizes must be >= 0 and seconds finite >= 0")
        acct = self._account(model)
        if prefill_tokens == 0:
            if decode_rows > 0 and not overlapped:
                acct.decode_step_s = self._ema(acct.decode_step_s, seconds)
            return
        acct.largest_prefill = self._extreme(acct.largest_prefill, prefill_tokens, seconds, larger=True)
        acct.cheapest_prefill = self._extreme(acct.cheapest_prefill, prefill_tokens, seconds, larger=False)
        if overlapped:
            return
        if acct.decode_step_s is not None:
            ref_tokens, ref_s = 0, acct.decode_step_s
        else:
            ref = acct.smallest_prefill
            acct.smallest_prefill = self._extreme(ref, prefill_tokens, seconds, larger=False)
            if ref is None or prefill_tokens <= ref[0]:
                return
            ref_tokens, ref_s = ref
        per_token_s = max(0.0, seconds - ref_s) / (prefill_tokens - ref_tokens)
        acct.prefill_token_s = self._ema(acct.prefill_token_s, per_token_s)

    def prefill_budget(self, model: str, device: str) -> int | None:
        """The most prefill tokens `model`'s next step may take so that it delays each other model active on
        `device` (ready or busy at the last pick) by at most one of that model's decode steps. None: no limit,
        because no other model is active there or none of them has a measured decode step yet.

            stall_s   [s]        = shortest decode_step_s among the other active models: the delay allowed
            base_s    [s]        = this model's decode_step_s (before one is measured: its smallest prefill
                                   step, at most one floor chunk's tokens above it)
            by_slope  [tokens]   = stall_s / prefill_token_s: the prefill adds <= stall_s to the step
            by_size   [tokens]   = n_max x (base_s + stall_s) / t_max, from the largest prefill step measured
                                   (n_max tokens in t_max seconds): the step stays <= base_s + stall_s if the time
                                   per token does not grow with the chunk (true of GEMMs; a chunk's attention
                                   grows with its position, which the averages follow). This bounds the step
                                   where the slope has not been measured yet, e.g. across the point where a
                                   memory-bound chunk becomes compute-bound and the slope jumps.
            budget    [tokens]   = min(by_slope, by_size), never below min_prefill_tokens (prompts progress);
                                   a model that never prefilled gets min_prefill_tokens, a cheap measurement.
                                   None when a floor-sized prefill step already costs more than decode_step_s +
                                   stall_s (launch-bound): then chunking cannot keep the bound, only multiply it.

        When step time is linear in the tokens, by_slope is exact. When it is rather max(memory time, compute
        time) (convex), the secant lies above the curve up to the chunk it was measured at, and by_size covers
        larger chunks; so chunks grow by about (base_s + stall_s) / base_s per step while memory-bound and stop
        where the step is base_s + stall_s long."""
        acct = self._account(model)
        if acct.device != device:
            raise ValueError(f"model '{model}' is on {acct.device}, not {device}")
        lane = self._lanes[device]
        others = [lane.models[m].decode_step_s for m in lane.active if m != model]
        measured = [s for s in others if s is not None]
        if not measured:
            return None
        stall_s = min(measured)
        floor = self.min_prefill_tokens
        if acct.largest_prefill is None:
            return floor
        n_max, t_max = acct.largest_prefill
        base_s = acct.decode_step_s
        if base_s is None:
            assert acct.cheapest_prefill is not None  # observed together with largest_prefill
            base_s = acct.cheapest_prefill[1]
        if acct.decode_step_s is not None and acct.cheapest_prefill is not None:
            n_min, t_min = acct.cheapest_prefill
            if n_min <= 2 * floor and t_min - acct.decode_step_s > stall_s:
                # Launch-bound prefill (the eager path's fixed cost per step, ~10 us per kernel): even a floor-sized
                # chunk stalls the others by more than one of their decode steps, so no chunk size keeps the bound;
                # small chunks would only multiply the stalls (and the prompt's time). Take the whole chunk.
                # Judged on overlapped steps too: beside three decoding models, the 3B's and 8Bs' first 16-token
                # steps (9-11 ms) lift their budgets for good and their prompts go in 512-token steps. Judged on
                # steps run alone instead, they went in 60-141-token steps: four-model aggregate 3,558 tok/s
                # against 3,793 in an earlier call, no p99 better (H200; the prompts' time grew more than the
                # steps beside them shrank).
                return None
        # A step measured at zero seconds (a broken timer) gives no ground to grow beyond it.
        budget = n_max * (base_s + stall_s) / t_max if t_max > 0.0 else float(n_max)
        if acct.prefill_token_s is not None and acct.prefill_token_s > 0.0:
            budget = min(budget, stall_s / acct.prefill_token_s)
        return max(floor, math.floor(budget))

    # -- helpers ------------------------------------------------------------------------------------------------

    def _account(self, model: str) -> _Account:
        acct = self._accounts.get(model)
        if acct is None:
            raise KeyError(f"model '{model}' is not in the GPU scheduler (add it when its engine is loaded)")
        return acct

    def _ema(self, old: float | None, sample: float) -> float:
        return sample if old is None else old + self.ema_alpha * (sample - old)

    def _extreme(self, old: tuple[int, float] | None, tokens: int, seconds: float, larger: bool) -> tuple[int, float]:
        """Keep the smallest (or largest) step size seen, averaging the seconds of repeated steps of that size."""
        if old is None or (tokens > old[0] if larger else tokens < old[0]):
            return tokens, seconds
        if tokens == old[0]:
            return tokens, self._ema(old[1], seconds)
        return old
