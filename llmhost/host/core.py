"""HostCore: the host-core loop. It owns the coordinator (which models are resident), the GPU scheduler (which
model steps next on each device) and every engine, and talks to its client over one pipe.

One loop iteration: bring in models that have requests waiting (loading or swapping them back, evicting others),
drain messages, then step: per device the scheduler picks the ready model with the least weighted GPU time (two
small decode steps of different models share the GPU on two CUDA streams when the second is not ahead of its
share); every device's step is launched before any is collected, so devices run in parallel; the tokens of the
whole iteration go out in one message.

One failing model never takes the others down: a failed load marks that model "failed" and fails its waiting
requests, a step that raises fails that engine's requests, and the loop goes on.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import sys
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Literal

import torch

from llmhost.config import Config
from llmhost.engine.engine import Engine
from llmhost.engine.scheduler import StepPlan
from llmhost.errors import LlmhostError, RequestError
from llmhost.host.coordinator import ByDevice, Coordinator, LoadFailed, ModelRuntime, Residency, Slot, plan_residencies
from llmhost.host.gpu_scheduler import GpuScheduler, StepShape, concurrent_ok
from llmhost.host.ledger import Ledger
from llmhost.host.messages import (
    Abort,
    AdminCommand,
    HostStopped,
    LoadRecord,
    ModelStatus,
    Query,
    RequestFailed,
    Shutdown,
    StatusReply,
    Submit,
    ToHost,
    TokenBatch,
    TokenEvent,
)
from llmhost.host.prompt_turns import PromptTurns
from llmhost.host.sm_confinement import SmConfinement
from llmhost.host.sm_steering import MIN_HELD, SETTLE_WINDOW_S, WINDOW_S, SmSteering
from llmhost.host.step_trace import StepTrace, ThreadUsage
from llmhost.memory.estimate import ModelSpec
from llmhost.memory.history import History, Measured, history_key
from llmhost.memory.inventory import Inventory, host_memory
from llmhost.model_files import open_checkpoint

if TYPE_CHECKING:  # both import Triton: a GPU-only dependency
    from llmhost.engine.decode_runner import DecodeRunner
    from llmhost.engine.stream_gate import StreamGate

log = logging.getLogger("llmhost.host")

IDLE_WAIT_S = 0.05  # how long the loop blocks on the pipe when no engine has work
# The interpreter's switch interval while the host runs (Python's default: 5 ms): in an in-process host (Host, the
# benches) the client threads share the GIL with the loop, which asks for it back to collect and relaunch steps.
GIL_SWITCH_S = 0.0005
# How long one loop pass queues an eager prompt step's layers (at least one) before it looks at the other steps in
# flight again: about a tenth of the shortest decode step (a 1B model at batch 8, 2.3 ms on the H100).
SLICE_S = 0.0003
SLOW_SEND_S = 0.001  # a token batch's send taking longer is traced (the client is not reading: a full pipe)
SLOW_PASS_S = 0.003  # a busy loop pass taking longer is traced, with where its time went
EXPIRE_EVERY_S = 1.0  # how often keep_alive deadlines are checked
# Models whose steps may run at once on one GPU, each on its own streams: small models do not saturate the GPU
# alone, and overlapping them is what threads and MPS gain over time slicing (bench/results/multi_model-h100.json
# baselines). A model counts once whether its decode step, its prompt step or both are in flight.
MAX_CONCURRENT_MODELS = 4
# CUDA stream priority of decode-only steps (lower is higher; steps with prompt tokens run at the default, 0).
DECODE_STREAM_PRIORITY = -1
# Experiment, off unless this names an SM count: a prompt step beside other models' steps runs on a stream of
# about that many SMs at the far end of the GPU, apart from the SMs confined decode graphs take (far_stream). H200,
# four models at 44 SMs: p99 inter-token latency 3.1-4.1x solo against the default's 3.7-4.1x in the same call,
# aggregate 1.03 of it (bench/results/multi_model_experiments_call2-h200.json, one run each: not a clear gain); a
# prompt confined to the first SMs, shared with the steered 8Bs' graphs, made the four models' p99s worse
# (bench/results/multi_model_experiments-h200.json).
FAR_PROMPT_ENV = "LLMHOST_FAR_PROMPT_SMS"
# GpuScheduler's lead_steps (a model may start that many of its own steps past another model's bound, less one):
# DEFAULT_LEAD_STEPS unless set ("1": start-time fair queuing's strict eligibility, the default before, for
# comparison). With DITHER_ALL_ENV's every model dithered, the default since both were ahead of the strict lead in
# five of six same-call comparisons on the H100, four models: worst p99 3.25x / 3.10x / 3.23x / 3.14x / 3.09x / 3.83x
# solo against 3.39x / 3.27x / 3.28x / 3.24x / 3.64x / 3.31x, aggregate 1.17-1.24 of the best baseline against
# 1.19-1.24 (bench/results/multi_model_lead_call1-h100.json and _call2, _call3, multi_model_deep_call1-h100.json,
# multi_model_minheld-h100.json, multi_model_lead_default-h100.json). The pair lost 7 and 23 GB/s to it in two calls
# (3,026 against 3,033, 3,029 against 3,052: one or two tokens a model in the window; multi_model_pair_deep-h100.json).
# Alone (H200, lead 2 without dithering): p99 3.2-4.1x against 3.7-4.1x (multi_model_experiments_call2-h200.json).
LEAD_STEPS_ENV = "LLMHOST_LEAD_STEPS"
DEFAULT_LEAD_STEPS = 2.0
# SM steering dithers each steered model's decode steps between its level and the one below by whether it is ahead
# of the others (SmSteering.step_sms); "0" turns that off, for comparison. H200, Mistral-7B + Yi-34B at 1:1: 4,227
# GB/s against 4,185 undithered and two threads' 4,215 (normalized 0.555 / 0.593 against 0.568 / 0.571); four
# models 4,261 tok/s against 4,130 (bench/results/multi_model_dither-h200.json, one run each). H100, Mistral-7B +
# Qwen2.5-14B, two full runs: 3,041 / 3,034 GB/s against 3,034 / 3,048 undithered; four models in three calls 2,805
# / 2,894 / 3,039 tok/s against 3,020 / 2,861 / 2,987 (multi_model_call1-h100.json,
# multi_model_before_b2b-h100.json, multi_model_four_rerun-h100.json): no gain there beyond the spread, and no loss.
SM_DITHER_ENV = "LLMHOST_SM_DITHER"
# Every model dithers (SmSteering's dither_all), not only those the steering moved, so a model ahead of the others
# replays its next decode step a level lower instead of waiting for them (fair sharing's holds make the 3B's largest
# token gaps beside three models: bench/probes/trace_holds.py). On unless "0" (the default before, for comparison);
# measured with LEAD_STEPS_ENV's lead of two steps, above.
DITHER_ALL_ENV = "LLMHOST_DITHER_ALL"
# "0" leaves SM steering's deep levels out (below 88 of 132 SMs: sm_steering.FRACTIONS), for comparison: with them
# models already at 88 SMs can be slowed further instead of waiting for the 1B.
DEEP_LEVELS_ENV = "LLMHOST_SM_DEEP_LEVELS"
# Experiment, unset: sm_steering.MIN_HELD (0.05). The share of a steering window a model must be held to move a
# level. In an H100 four-model trace the 3B was held by the 1B before 69-87 of its launches (2.4 ms on average,
# its p99 token gaps) yet never confined: about 4% of each window, just under 5% (bench/results/
# trace_holds_spread-h100.json, run "four"). Lower, a model held that often moves to fewer SMs and is held less.
SM_MIN_HELD_ENV = "LLMHOST_SM_MIN_HELD"
# Experiment, off unless "1": SM steering's windows are shorter while it settles (sm_steering.SETTLE_WINDOW_S, which
# gives its measurements: no gain in two H100 calls).
SM_SETTLE_ENV = "LLMHOST_SM_SETTLE"
# Experiment, off unless "1": SM steering's levels go down to 56 of 132 SMs (sm_steering.DEEPER_FRACTIONS says why,
# and what the H100 measured: no gain).
SM_DEEPER_ENV = "LLMHOST_SM_DEEPER"
# A decode step run ahead (_follow) with no other step beside it samples its model's solo step cost, when all its
# kernels were queued before the step ahead of it finished: its start event then completes as that step ends, and
# start -> done spans its own GPU work only ("0" turns this off, for comparison). The other samples are decode steps
# launched after a collection, whose start event is recorded before the host stages their inputs and launches the graph,
# so they count that host time as GPU time; and a model that runs ahead alone takes few of them (1-6 in a second's
# warm-up). In four step traces (`python bench/probes/solo_samples.py DIR`, bench/results/solo_samples-h100.json and
# -h200.json) the estimate each model was charged by beside the others was 1.20-1.32x its decode steps' GPU time run
# ahead alone (p50) for the 1B, 1.10-1.26x for the 3B and 1.03-1.09x for the 8Bs: overlapped steps are charged that
# estimate, so a small model paid most for it and fair sharing gave it less than its share. H100, four models, four runs
# against those samples alone: normalized speeds 6-11% apart against 13-17%, aggregate 1.01-1.04x, the 1B's p99 3.6-3.8x
# solo against 4.0-4.4x; the pair unchanged, 3,107 GB/s both (multi_model_b2b-h100.json,
# multi_model_b2b_reruns-h100.json).
SOLO_RUN_AHEAD_ENV = "LLMHOST_SOLO_RUN_AHEAD"
# A loop pass sends the tokens it collected before it launches the next steps, not after ("0" turns this off, for
# comparison). In an H100 four-model step trace (`python bench/probes/itl_tail.py
# bench/results/host_trace_raw-h100/dithered`, client_after_collect_ms) a token reached its client 0.4-1.2 ms after
# its step's collection at the median but 4-12 ms at the p99 (up to 18 ms): every 3B token 8+ ms late came from a pass
# that went on launching the next steps. Sending first delays the pass's launches by the send (pickling and a pipe
# write: 0.084 ms, p99 0.31 ms for 8-32 tokens in bench/probes/delivery.py). H100, four models, with short prompts
# in the decode graphs (ModelConfig.graph_prompt_tokens), two calls: worst p99 3.33x / 3.41x solo against 3.73x /
# 3.52x sending after, aggregate 1.23 / 1.22 of the best baseline against 1.20 / 1.19
# (bench/results/multi_model_graph_prompts_call1-h100.json, _call2). Alone (prompts eager) it was 4.04x against 4.74x
# in one call and 4.53x against 3.90x in the next: no clear gain without them.
SEND_EARLY_ENV = "LLMHOST_SEND_BEFORE_LAUNCH"
# Experiment, off unless "1" (with FAR_PROMPT_ENV naming the far SMs): while a prompt step runs on the far SMs, every
# decode step launched on its GPU replays its graphs confined to the near ones (the steering level that fits), so
# that no decode kernel waits for an SM a prompt's GEMM holds. In the committed step traces
# (`python bench/probes/step_company.py DIR`, bench/results/step_company-h100.json, -h200.json) the 3B's decode
# steps beside three decoding models have a GPU-time p99 under 3x its solo p99 (8.8-8.9 ms against 9.9 on the H200),
# those beside a prompt step 13.7-15.7 ms: its p99 is made there. Costs the decode steps a third of the SMs while a
# prompt runs. H100, one call (bench phase four/host-apart): worst p99 5.08x solo against the default's 4.74x, aggregate
# the same (bench/results/multi_model_experiments_call1_20261205-h100.json): no gain. Short prompts now ride the decode
# graphs (ModelConfig.graph_prompt_tokens), which leaves few prompt steps to keep apart from.
PROMPT_APART_ENV = "LLMHOST_PROMPT_APART"
# Experiment, off unless "1": one model's prompt work at a time on a GPU, taken in turns (host/prompt_turns.py,
# which says why and what the first form of it, without turns, did). Bench phases pair/host-oneprompt,
# four/host-oneprompt. Measured on the H100: no gain (prompt_turns.py's docstring).
ONE_PROMPT_ENV = "LLMHOST_ONE_PROMPT"
STEP_WALL_ALPHA = 0.2  # weight of the newest decode step in a model's wall-time average (_step_wall)
PENDING_PER_BATCH = 4  # requests that may wait for a model to come in: this many times its max_batch


def solo_run_ahead_on() -> bool:
    """Whether decode steps run ahead alone sample their model's solo step cost (SOLO_RUN_AHEAD_ENV; on unless "0")."""
    return os.environ.get(SOLO_RUN_AHEAD_ENV) != "0"


@dataclass
class _Running:
    """One launched step, in flight until its stream reaches `done`; then collected (on the same stream). An eager
    prompt step beside other models' steps is launched a layer at a time from the loop (Engine.launch_slices):
    `slices` holds the rest of its launch until its last slice queued its sampling and `done` is recorded."""

    name: str
    engine: Engine
    plan: StepPlan
    shape: StepShape
    t0: float
    stream: torch.cuda.Stream | None = None
    done: torch.cuda.Event | None = None  # recorded after the step's kernels; None on the CPU (ran synchronously)
    overlapped: bool = False  # another step (of any model, its own prompt step too) ran beside it on another stream
    beside_others: bool = False  # a step of another model ran beside it
    confined: bool = False  # a decode step whose graphs replayed on fewer than all SMs (SM steering's level)
    followed: bool = False  # the model's next step was launched behind it before it was collected (run ahead)
    slices: Iterator[None] | None = None  # the rest of a launch in slices; None once every kernel is queued
    slice_ms: list[float] = field(default_factory=list)  # how long each slice took to queue (the step trace's)
    start: torch.cuda.Event | None = None  # recorded before the step's kernels (timing events)
    gate: StreamGate | None = None  # holds a launch in slices' kernels until its last slice is queued
    began: float = field(init=False)  # when it could start: launched, or (queued behind its model's step) collected
    ticket: int = 0  # its hold's

    def __post_init__(self) -> None:
        self.began = self.t0

    def finished(self) -> bool:
        if self.slices is not None:
            return False
        return self.done is None or bool(self.done.query())  # type: ignore[no-untyped-call]

    def launch(self, until: float) -> bool:
        """Queue the next slices of a launch in slices: at least one, more while time.perf_counter() < until.
        Returns whether the launch is complete (then `done` is recorded). Raises what a slice raised."""
        assert self.slices is not None and self.stream is not None
        t = time.perf_counter()
        try:
            while True:
                try:
                    next(self.slices)
                finally:
                    t, took = time.perf_counter(), t
                    self.slice_ms.append(1e3 * (t - took))
                if t >= until:
                    break
        except StopIteration:
            self.slices = None
            self.done = _event(self.stream)
            self._open()
            return True
        except BaseException:
            self._open()  # what was queued runs (and is waited for) as it would have ungated
            raise
        return False

    def _open(self) -> None:
        if self.gate is not None:
            self.gate.release(self.ticket)
            self.gate = None

    def wait(self) -> None:
        """Block until the step's kernels ran (the rest of a launch in slices queued first)."""
        while self.slices is not None:
            self.launch(float("inf"))
        if self.done is not None:
            self.done.synchronize()

    def gpu_seconds(self) -> float | None:
        """GPU time from the step's first kernel's turn on its stream to its last's end (None on the CPU). It
        leaves out the host's delays in noticing the step done, which the latency t0 -> collection includes."""
        if self.start is None or self.done is None:
            return None
        return float(self.start.elapsed_time(self.done)) / 1e3


class HostCore:
    def __init__(
        self,
        config: Config,
        inventory: Inventory,
        conn: Connection,
        runtime: ModelRuntime | None = None,
        specs: Sequence[ModelSpec] | None = None,
    ) -> None:
        """specs: the planner's view of each configured model, in config order; None reads them from the
        checkpoints. Benches that build random-weight engines at a real shape (a runtime of their own, no
        checkpoint on disk) pass ModelSpec.from_shape."""
        self.config = config
        self.conn = conn
        if specs is None:
            specs = [ModelSpec.from_checkpoint(m, open_checkpoint(m.path)) for m in config.models]
        elif [s.name for s in specs] != [m.name for m in config.models]:
            raise ValueError("specs must name the configured models, in config order")
        self.specs = {s.name: s for s in specs}
        self.inventory = inventory
        self.history = History()
        self.residencies = plan_residencies(specs, inventory, config.host, self.history)
        plan = self.residencies.resident
        if runtime is None:
            from llmhost.host.model_runtime import EngineRuntime

            runtime = EngineRuntime(inventory, plan.block_size)
        slots: dict[str, Slot] = {}
        names = [m.name for m in plan.models] + list(self.residencies.on_demand)
        for name in names:
            mp = self.residencies.model_plan(name)
            devices = tuple(inventory.devices[s.device].torch_name for s in mp.stages)
            slots[name] = Slot(config.model(name), mp, devices)
        park_ram = config.host.park_ram if config.host.park_ram is not None else host_memory()[0] // 2
        self.coordinator = Coordinator(
            slots, Ledger(plan.budgets, park_ram), runtime, busy=self._busy, on_loaded=self._record
        )
        self.gpu = GpuScheduler(lead_steps=float(os.environ.get(LEAD_STEPS_ENV) or DEFAULT_LEAD_STEPS))
        self.pending: dict[str, deque[Submit]] = {name: deque() for name in slots}
        self.resident_at_start = [m.name for m in plan.models]
        self.stopping = False
        self._step_wall: dict[str, float] = {}  # per model: EMA of its decode steps' wall time, began -> collected
        self._gates: dict[str, StreamGate] = {}  # per GPU: holds a prompt step's kernels until its launch is queued
        self._streams: dict[str, list[torch.cuda.Stream]] = {}  # per "device priority": the streams steps run on
        self._inflight: dict[str, list[_Running]] = {}  # per device, steps launched and not yet collected
        self._next_expiry = 0.0
        self._spinning = False  # the last pass had steps in flight and neither collected nor launched one
        self._loads: list[LoadRecord] = []  # loads and swap-ins not yet reported in a status reply
        self.trace = StepTrace.from_env()  # every launch and collection, when LLMHOST_STEP_TRACE asks for it
        # Per GPU, how many SMs each model's decode graphs may use ([host] sm_steering; None: off).
        self.confinement = (
            SmConfinement(self._runner, self.trace, _steering_from_env()) if config.host.sm_steering else None
        )
        self._gc_start = 0.0
        self._usage: ThreadUsage | None = None  # the loop thread's OS figures per slow pass, when tracing
        self._far_prompt_sms = int(os.environ.get(FAR_PROMPT_ENV) or 0)
        self._sm_dither = os.environ.get(SM_DITHER_ENV) != "0"
        self._solo_run_ahead = solo_run_ahead_on()
        self._send_early = os.environ.get(SEND_EARLY_ENV) != "0"
        self._prompt_apart = os.environ.get(PROMPT_APART_ENV) == "1"
        self._prompt_turns = PromptTurns() if os.environ.get(ONE_PROMPT_ENV) == "1" else None
        self._near_sms: dict[str, int] = {}  # per GPU with a far stream: the SMs left before it (PROMPT_APART_ENV)
        self._far_streams: dict[str, torch.cuda.Stream | None] = {}  # per GPU: prompt steps beside others
        self._draining: set[str] = set()  # admin unloads waiting for the requests in their model to finish
        self._holding: dict[str, str] = {}  # traced holds going on: held model -> the model it waits for

    @property
    def slots(self) -> dict[str, Slot]:
        return self.coordinator.slots

    def _busy(self, name: str) -> bool:
        """Not to be evicted: requests in its engine or waiting for it, or a step of it still on the GPU (one whose
        requests all ended meanwhile still writes into its memory until it is collected)."""
        return self._has_requests(name) or bool(self.pending[name])

    def _in_engine(self, name: str) -> bool:
        """Whether `name` is resident with requests in its engine."""
        eng: Engine | None = self.slots[name].engine
        return eng is not None and self.slots[name].state == "loaded" and bool(eng.seqs)

    def _record(self, slot: Slot, measured: ByDevice) -> None:
        """After a load or swap-in: keep its reconciliation with the driver for the next status reply (the client
        sees every one, e.g. the benches' memory check), and store what the load measured per stage, so later
        plans of the same model, config, GPU kind and torch use it (memory/history.py). History: GPUs only, the
        CPU's figures are exact arithmetic already."""
        event = self.coordinator.events[-1]
        recs = [self.coordinator.ledger.devices[d].last for d in sorted(set(slot.plan.devices))]
        action: Literal["load", "unpark"] = "unpark" if event.action == "unpark" else "load"
        reconciled = tuple(r for r in recs if r is not None)
        self._loads.append(LoadRecord(slot.name, action, event.seconds, reconciled, time.time()))
        spec = self.specs[slot.name]
        if spec.fingerprint is None or not self.history.enabled:
            return
        for st in slot.plan.stages:
            device = self.inventory.devices[st.device]
            if device.kind == "cpu" or st.device not in measured:
                continue
            m = measured[st.device]
            key = history_key(spec, spec.fingerprint, device, st.start, st.end, self.residencies.resident.block_size)
            self.history.record(key, Measured(m["weights"], m["kv"], m["workspace"], m["graphs"]))

    # -- life cycle ---------------------------------------------------------------------------------------------

    def run(self) -> None:
        # Process-wide: in an in-process host (Host, the benches) the caller's threads switch as often.
        sys.setswitchinterval(GIL_SWITCH_S)
        on_gpus = all(d.startswith("cuda") for s in self.slots.values() for d in s.device_names)
        if self.slots and on_gpus and torch.cuda.is_available():
            # The loop's CPU tensors are a step's metadata; a pool of intra-op threads spinning after each small
            # parallel copy took cores from the loop and the clients: with one thread, slow loop passes in the
            # four-model probe 15-21 instead of 43-45, launches 10-20% quicker (bench/probes/host_trace.py, run
            # with OMP_NUM_THREADS=1). Models on the CPU compute with the pool, so it is kept for them.
            torch.set_num_threads(1)
        try:
            self._run()
        finally:
            if self.trace is not None:
                with contextlib.suppress(ValueError):  # not registered when the host stopped while loading
                    gc.callbacks.remove(self._trace_gc)
                self.trace.write()
            if self._usage is not None:
                self._usage.close()

    def _run(self) -> None:
        for name in self.resident_at_start:
            self.slots[name].state = "loading"
        self._send_status(0)
        for name in self.resident_at_start:  # the plan's load order
            self._bring_in(name)
            self._drain(0.0)  # answer status queries between loads
            if self.stopping:
                break
        # Everything loaded so far (modules, weights' Python objects, graphs) lives as long as the host: out of the
        # collector's sight, a full collection walks only what the loop allocates since, instead of pausing every
        # model's steps for tens of milliseconds now and then.
        gc.freeze()
        if self.trace is not None:
            gc.callbacks.append(self._trace_gc)
        while not self.stopping:
            self.iterate()
        self.conn.send(HostStopped("shutdown"))

    def _trace_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self.trace is not None:
            ms = round(1e3 * (time.perf_counter() - self._gc_start), 3)
            self.trace.add("gc", "", 0, 0, generation=info["generation"], ms=ms)

    def iterate(self) -> None:
        t0 = time.perf_counter()
        if self.trace is not None:
            self.trace.passes += 1
            if self._usage is None:
                self._usage = ThreadUsage()  # made on the loop's thread, which it measures
        u0 = self._usage.read() if self._usage is not None else None
        if self._draining:
            self._unload_drained()
        self._admit_pending()
        busy = self._in_flight() or any(self._ready(s) for s in self.slots.values())
        t1 = time.perf_counter()
        if busy and self._spinning:
            self._yield()
        t2 = time.perf_counter()
        self._drain(0.0 if busy else IDLE_WAIT_S)
        t3 = time.perf_counter()
        self._spinning = False
        if busy:
            self._spinning = not self._step()
        if self.trace is not None and busy and time.perf_counter() - t0 > SLOW_PASS_S:
            t = (t0, t1, t2, t3, time.perf_counter())
            ms = [round(1e3 * (t[k + 1] - t[k]), 3) for k in range(4)]
            os_usage = ThreadUsage.since(u0, self._usage.read() if self._usage is not None else None)
            self.trace.add(
                "pass", "", 0, 0, admit_ms=ms[0], yield_ms=ms[1], drain_ms=ms[2], step_ms=ms[3],
                allocator=_allocator_counts(self._inflight), **os_usage,
            )  # fmt: skip
        now = time.monotonic()
        if now >= self._next_expiry:
            self._next_expiry = now + EXPIRE_EVERY_S
            for name in self.coordinator.expire():
                self._left(name)

    @staticmethod
    def _yield() -> None:
        """Nothing to collect or launch: let other threads have the GIL, which a spinning loop holds but for the
        switch interval (the client threads of an in-process host). time.sleep(0) releases it to a thread waiting
        for it and costs nothing when none waits. (Tried first: poll() on the pipe with a 0.1 ms timeout, which
        notices a finished step late; the batch-1 pair's bandwidth was 2-5% lower then.)"""
        time.sleep(0)

    @staticmethod
    def _ready(slot: Slot) -> bool:
        return slot.state == "loaded" and slot.engine is not None and slot.engine.has_work

    def _bring_in(self, name: str) -> Residency | None:
        """Make `name` resident; None when its load failed (its waiting requests are failed)."""
        was: dict[str, str] = {n: s.state for n, s in self.slots.items()}
        try:
            result = self.coordinator.ensure_resident(name)
        except LoadFailed as e:
            for sub in self.pending[name]:
                self.conn.send(RequestFailed(sub.request_id, "model_not_loaded", str(e)))
            self.pending[name].clear()
            self._sync_scheduler(was)
            self._send_status(0)
            return None
        if result is Residency.READY:
            self._sync_scheduler(was)
            if was[name] != "loaded":
                self._send_status(0)
        return result

    def _sync_scheduler(self, was: dict[str, str]) -> None:
        """Register models that became resident with the GPU scheduler; forget those that left."""
        for n, s in self.slots.items():
            if was[n] == "loaded" and s.state != "loaded":
                self._left(n)
            elif was[n] != "loaded" and s.state == "loaded":
                self.gpu.add(n, s.device_names[0], s.config.weight)
                device = s.device_names[0]
                if device.startswith("cuda") and device not in self._gates and torch.cuda.is_available():
                    # Built (its kernel compiled: 50 ms) with the GPU's first model, not at its first prompt step
                    # beside others, where it held every model's next step back that long.
                    from llmhost.engine.stream_gate import StreamGate

                    self._gates[device] = StreamGate(device)
                if self.confinement is not None and device.startswith("cuda"):
                    self.confinement.add(n, device)

    def _left(self, name: str) -> None:
        with contextlib.suppress(KeyError):
            self.gpu.remove(name)
        if self.confinement is not None:
            self.confinement.remove(name)
        if self._prompt_turns is not None:
            self._prompt_turns.forget(name)
        self._send_status(0)

    def _admit_pending(self) -> None:
        for name, queue in self.pending.items():
            if not queue or name in self._draining:  # an unload waits for the model's requests: none join them
                continue
            if self.slots[name].state != "loaded" and self._bring_in(name) is not Residency.READY:
                continue  # failed (requests answered) or blocked (they wait for a busy model to go idle)
            while queue:
                self._add(self.slots[name], queue.popleft())

    def _unload(self, name: str, force: bool = False) -> None:
        """An admin unload. Unforced, as Ollama does, the requests already in the model finish first (requests that
        arrive meanwhile wait, and load it again once it is unloaded); forced, they fail at once."""
        if not force and self._has_requests(name):
            self._draining.add(name)
            return
        self._draining.discard(name)
        self._unload_now(name, fail_waiting=force)

    def _has_requests(self, name: str) -> bool:
        """Whether `name` is resident with requests in its engine or a step in flight."""
        return self._in_engine(name) or any(r.name == name for runs in self._inflight.values() for r in runs)

    def _unload_drained(self) -> None:
        """The draining models whose last request finished: unloaded now."""
        for name in [n for n in self._draining if not self._has_requests(n)]:
            self._draining.discard(name)
            self._unload_now(name, fail_waiting=False)

    def _unload_now(self, name: str, fail_waiting: bool) -> None:
        """Unload `name`, failing the requests in its engine; those waiting to be admitted fail too (`fail_waiting`,
        a forced unload) or stay queued, to load it again on the next pass."""
        self._finish_in_flight(name)
        slot = self.slots[name]
        if slot.engine is not None and slot.state == "loaded":
            for seq_id in list(slot.engine.seqs):
                self.conn.send(RequestFailed(seq_id, "model_not_loaded", f"model '{name}' was unloaded"))
        if fail_waiting:
            for sub in self.pending[name]:
                self.conn.send(RequestFailed(sub.request_id, "model_not_loaded", f"model '{name}' was unloaded"))
            self.pending[name].clear()
        self.coordinator.unload(name, "admin request")
        self._left(name)

    # -- messages -----------------------------------------------------------------------------------------------

    def _drain(self, timeout: float) -> None:
        while self.conn.poll(timeout):
            self._handle(self.conn.recv())
            timeout = 0.0

    def _handle(self, msg: ToHost) -> None:
        if isinstance(msg, Submit):
            self._submit(msg)
        elif isinstance(msg, Abort):
            self._abort(msg.request_id)
        elif isinstance(msg, Query):
            self._send_status(msg.query_id)
        elif isinstance(msg, AdminCommand):
            if msg.model not in self.slots:
                self.conn.send(StatusReply(msg.query_id, (), ok=False, message=f"model '{msg.model}' not found"))
                return
            if msg.action == "load" and self.slots[msg.model].state != "loaded":
                self._bring_in(msg.model)
            elif msg.action == "unload":
                self._unload(msg.model, msg.force)
            self._send_status(msg.query_id)
        elif isinstance(msg, Shutdown):
            self.stopping = True

    def _abort(self, request_id: str) -> None:
        for name, slot in self.slots.items():
            queue = self.pending[name]
            for sub in queue:
                if sub.request_id == request_id:
                    queue.remove(sub)
                    return
            if slot.state == "loaded" and slot.engine is not None and slot.engine.abort(request_id):
                return

    def _submit(self, msg: Submit) -> None:
        slot = self.slots.get(msg.model)
        if slot is None:
            self.conn.send(RequestFailed(msg.request_id, "model_not_found", f"model '{msg.model}' does not exist"))
            return
        self.coordinator.touch(msg.model)
        if slot.state == "loaded" and msg.model not in self._draining:  # an unload waits: none join its requests
            self._add(slot, msg)
            return
        limit = PENDING_PER_BATCH * slot.config.max_batch
        if len(self.pending[msg.model]) >= limit:
            self.conn.send(
                RequestFailed(
                    msg.request_id,
                    "queue_full",
                    f"model '{msg.model}' is {slot.state} and {limit} requests already wait for it; retry later",
                )
            )
            return
        self.pending[msg.model].append(msg)  # brought in at the top of the next iteration

    def _add(self, slot: Slot, msg: Submit) -> None:
        try:
            slot.engine.add_request(msg.prompt_ids, msg.params, msg.request_id)
        except RequestError as e:
            self.conn.send(RequestFailed(msg.request_id, "invalid", str(e), e.param))

    def _send_status(self, query_id: int) -> None:
        loads, self._loads = tuple(self._loads), []
        self.conn.send(StatusReply(query_id, tuple(self.status(s) for s in self.slots.values()), loads=loads))

    def status(self, slot: Slot) -> ModelStatus:
        eng: Engine | None = slot.engine if slot.state == "loaded" else None
        memory: dict[str, int] = {}
        for kinds in self.coordinator.ledger.devices:
            for kind, b in kinds.entries.get(slot.name, {}).items():
                memory[kind] = memory.get(kind, 0) + b
        share = seconds = 0.0
        with contextlib.suppress(KeyError):
            share = self.gpu.shares(slot.device_names[0]).get(slot.name, 0.0)
            seconds = self.gpu.gpu_seconds(slot.name)
        return ModelStatus(
            name=slot.name,
            state=slot.state,
            device=",".join(slot.device_names) if slot.state in ("loaded", "parked") else "",
            max_seq_len=slot.config.max_seq_len,
            memory=memory,
            since=slot.since,
            keep_alive_s=slot.config.keep_alive_s,
            running=len(eng.scheduler.running) if eng else 0,
            waiting=(len(eng.scheduler.waiting) if eng else 0) + len(self.pending[slot.name]),
            kv_blocks_used=eng.blocks.used_count if eng else 0,
            kv_blocks_total=eng.blocks.num_blocks if eng else 0,
            error=slot.error,
            unloading=slot.name in self._draining,
            host_copy_bytes=self.coordinator.ledger.parked.get(slot.name, 0),
            gpu_share=share,
            gpu_seconds=seconds,
            swaps_in=slot.swaps_in,
            last_swap_s=slot.last_swap_s,
            prefix_queried_tokens=cache.queried_tokens if (cache := eng and eng.blocks.cache) else 0,
            prefix_hit_tokens=cache.hit_tokens if cache else 0,
        )

    # -- the loop's work ----------------------------------------------------------------------------------------

    def _step(self) -> bool:
        """Collect every step whose GPU work is done, then launch new ones: per device the scheduler's pick, and
        beside it (each on its own stream) further small decode steps of other models, up to
        MAX_CONCURRENT_MODELS with steps in flight. Steps run free: a model whose step finished steps again at
        once, while the others' are still in flight, as separate threads or processes would (no lockstep per
        iteration). On the CPU one step runs at a time, to completion. Returns whether any step was collected or
        launched."""
        events: list[TokenEvent] = []
        origin: Counter[str] = Counter()  # tokens per model in `events`, for the step trace
        moved = False
        for runs in self._inflight.values():
            for run in [r for r in runs if r.finished()]:
                runs.remove(run)
                moved = True
                got = self._collect(run)
                events.extend(got)
                origin[run.name] += len(got)
                decode = not run.shape.prefill_tokens
                behind = next((r for r in runs if r.name == run.name and not r.shape.prefill_tokens), None)
                if decode and behind is not None:  # its model's next decode step, queued behind it, starts now
                    behind.began = max(behind.began, time.perf_counter())
        if events and self._send_early:  # the tokens wait for no launch (SEND_EARLY_ENV)
            self._send(events, origin)
            events, origin = [], Counter()
        lanes: dict[str, list[str]] = {}
        for name, slot in self.slots.items():
            if self._ready(slot):
                lanes.setdefault(slot.device_names[0], []).append(name)
        for device, ready in lanes.items():
            if device.startswith("cuda"):
                moved |= self._launch_gpu(device, ready, self._inflight.setdefault(device, []))
                continue
            alone = self._launch(device, ready)  # on the CPU a step is collected as it is launched: none in flight
            if alone is not None:
                self._traced(alone, 0)
                moved = True
                got = self._collect(alone)
                events.extend(got)
                origin[alone.name] += len(got)
        for device, running in self._inflight.items():
            self._run_ahead(device, running)
            moved |= self._launch_slices(running)
        if events:
            self._send(events, origin)
        return moved

    def _send(self, events: list[TokenEvent], origin: Counter[str]) -> None:
        began = time.monotonic()
        self.conn.send(TokenBatch(tuple(events)))
        if self.trace is not None:  # every send: when each collected token left the loop (slow: over SLOW_SEND_S)
            ms = round(1e3 * (time.monotonic() - began), 3)
            self.trace.add("send", "", 0, 0, at=began, ms=ms, tokens=dict(origin))

    def _run_ahead(self, device: str, running: list[_Running]) -> None:
        """A model whose graph-replayed decode step is in flight launches its next decode step behind it, before
        collecting it, as Engine.step() does (engine.py, "running ahead"): collecting, scheduling and relaunching
        then overlap the GPU instead of leaving its stream idle between steps. Alone on its GPU always; beside
        other models when the GPU scheduler's `follow_ok` says the next step would not run ahead of its share
        (separate threads, each running ahead on its own stream, kept the GPU busier: bench/multi_model.py)."""
        # A prompt step's charge is spread over later steps (GpuScheduler.charge): not counted.
        in_flight = self._costs_in_flight(running, prompts=False)
        done = self._done_in_flight(running)
        alone = len({r.name for r in running}) == 1
        for name in list(in_flight):
            steps = [r for r in running if r.name == name and not r.shape.prefill_tokens]
            last = steps[-1]
            eng = last.engine
            # One step queued behind one running, as Engine.step() keeps it. A third would stage its inputs while
            # the first still runs: the decode runner waits for the copy of the second's (queued behind the
            # first), and the loop stood still for the rest of the first step, every other model's launches and
            # collections with it (5-6 ms per launch for the 3B and 8Bs beside others: bench/probes/host_trace.py).
            if len(steps) > 1 or last.stream is None or last.slices is not None or last.followed:
                continue
            # A step run ahead takes decodes only (prefill_limit 0 below); the model's prompts take prompt-only
            # steps of their own (_launch_gpu). Alone, any other model with work (ready now or not) takes its
            # turns through the scheduler.
            if not eng.can_run_ahead(last.plan):
                continue
            if alone and self._others_have_work(name, device):
                continue
            if not alone and not self.gpu.follow_ok(name, in_flight, done):
                continue
            self._dither(name, device, running)
            nxt = self._follow(last, running, self._may_take_prompt(name, device, running, eng))
            if nxt is not None:
                nxt.confined = self._confined(name)
                running.append(nxt)
                self._traced(nxt, len(running) - 1, follows=True)
                in_flight[name] += self.gpu.expected_step_s(name, nxt.shape)

    def _launch_slices(self, running: list[_Running]) -> bool:
        """Queue the next slices of the steps in `running` launched in slices, for about SLICE_S each (at least one
        slice: a decoder layer): then the loop looks at the other steps again. Returns whether any were queued."""
        moved = False
        for run in [r for r in running if r.slices is not None]:
            moved = True
            try:
                launched = run.launch(time.perf_counter() + SLICE_S)
            except Exception:
                running.remove(run)
                self._fail_engine(run.name, run.engine)
                continue
            if launched and self.trace is not None:
                self.trace.add(
                    "launched", run.name, run.shape.decode_rows, run.shape.prefill_tokens,
                    ms=round(1e3 * (time.perf_counter() - run.t0), 3),
                    slice_ms=[round(x, 3) for x in run.slice_ms],
                )  # fmt: skip
        return moved

    def _follow(self, last: _Running, running: list[_Running], carry: bool = True) -> _Running | None:
        """Queue `last`'s model's next decode step behind it on its stream (`running`: its GPU's steps in
        flight; `carry`: it may take prompt rows, _may_take_prompt)."""
        t0 = time.perf_counter()
        stream = last.stream
        assert stream is not None
        last.followed = True
        start = _event(stream)
        try:
            nxt = last.engine.run_ahead(last.plan, stream, prefill_limit=0, graph_prompts=carry)
        except Exception:
            self._fail_engine(last.name, last.engine)
            return None
        if nxt is None:
            return None
        # Its latency includes the step ahead of it: charged and observed like an overlapped step, unless it is a
        # sample of the solo cost (SOLO_RUN_AHEAD_ENV): every kernel queued while the step ahead still runs, and no
        # other step in flight (one launched beside it later marks it overlapped, _mark_beside).
        sample = self._solo_run_ahead and all(r is last for r in running) and not last.finished()
        run = _Running(last.name, last.engine, nxt, _shape(nxt), t0, stream, _event(stream), overlapped=not sample)
        run.start = start
        return run

    def _traced(self, run: _Running, beside: int, follows: bool = False) -> None:
        """Trace a launch: `beside` steps were in flight on its GPU; `follows`: queued behind its model's own."""
        if self.trace is not None:
            priority = None if run.stream is None else run.stream.priority
            default = run.stream is not None and run.stream == torch.cuda.default_stream(run.stream.device)
            self.trace.add(
                "launch", run.name, run.shape.decode_rows, run.shape.prefill_tokens, beside=beside,
                follows=follows, sliced=run.slices is not None, priority=priority, default_stream=default,
                ms=round(1e3 * (time.perf_counter() - run.t0), 3),
            )  # fmt: skip

    def _others_have_work(self, name: str, device: str) -> bool:
        """Whether a model other than `name` on `device` has work (ready now or with a step in flight)."""
        return any(
            n != name and slot.device_names[0] == device and slot.engine is not None and slot.engine.has_work
            for n, slot in self.slots.items()
        )

    def _in_flight(self) -> bool:
        return any(self._inflight.values())

    def _finish_in_flight(self, name: str) -> None:
        """Wait for and collect `name`'s step in flight (before its engine is unloaded)."""
        for runs in self._inflight.values():
            for run in [r for r in runs if r.name == name]:
                runs.remove(run)
                try:
                    run.wait()
                except Exception:  # a slice of its launch raised: nothing of it to collect
                    self._fail_engine(run.name, run.engine)
                    continue
                events = self._collect(run)
                if events:
                    self.conn.send(TokenBatch(tuple(events)))

    def _stream(self, name: str, device: str, running: list[_Running], shape: StepShape) -> torch.cuda.Stream:
        """The stream `name`'s step runs on. A model alone on its GPU (_default_stream_ok): the device's default
        stream, as the engine alone runs. Otherwise a stream of the device's pool that no step in flight uses: of
        high priority for a decode-only step, of the default priority for a step with prompt tokens. Where both
        have blocks waiting, the GPU starts the decode step's first (CUDA stream priorities), so a prompt's large
        GEMMs beside them take the SMs the decode steps leave, rather than holding every other model's next token
        back (p99 inter-token latency)."""
        if self._default_stream_ok(name, device, running, shape):
            return torch.cuda.default_stream(device)
        priority = 0 if shape.prefill_tokens else DECODE_STREAM_PRIORITY
        pool = self._streams.setdefault(f"{device} {priority}", [])
        used = {id(r.stream) for r in running}
        for st in pool:
            if id(st) not in used:
                return st
        st = torch.cuda.Stream(device, priority=priority)  # type: ignore[no-untyped-call]
        pool.append(st)
        return st

    def _default_stream_ok(self, name: str, device: str, running: list[_Running], shape: StepShape) -> bool:
        """Whether `name`'s step of `shape` takes the GPU's default stream: no other model there has work, every
        step in flight there is on the default stream too, and a prompt step would hold back no decoding request
        of its own (queued behind it there; beside such requests it takes a stream of its own, as beside others).

        Why: once more than a few kernels ran on a second stream (a hundred one-element adds; one large add does
        not), every later kernel boundary in the process costs about 0.18 us more on an H100 or H200, for good:
        2.4-3.2% of a 7B model's batch-1 decode graph, whatever stream replays it, a green context's alike
        (bench/probes/stream_gap.py, bench/results/stream_gap*.json; PyTorch issue 161104). Steps beside other
        models' steps cannot avoid it: overlapping needs a second stream (the threads and MPS baselines pay it
        too). With every one of a lone 7B model's launches on the default stream the host still decoded at 177.2
        tok/s against the engine's 181.2 (bench/results/host_alone_default_stream-h100.log): making green
        contexts and capturing graphs on them, which SM steering did with each model's load, sets it off too
        (1.18x on a graph of tiny kernels, stream_gap_capture-h100.json). With those made only once a second
        model arrives (sm_confinement.py), a lone 7B model decodes at 180.0 tok/s against the engine's 181.2,
        as with steering off (host_alone_deferred_green-h100.log)."""
        if self._others_have_work(name, device):
            return False
        default = torch.cuda.default_stream(device)
        if any(r.stream != default for r in running):
            return False
        if not shape.prefill_tokens:
            return True
        return all(s.in_prefill for s in self.slots[name].engine.scheduler.running)

    def _far_stream(self, name: str, device: str, running: list[_Running]) -> torch.cuda.Stream | None:
        """The FAR_PROMPT_ENV experiment's stream for `name`'s prompt step (made once per GPU), None to use the
        pool's: the experiment off, `name` alone with work, or no such stream on this GPU."""
        if not self._far_prompt_sms or not device.startswith("cuda") or not self._others_have_work(name, device):
            return None
        if device not in self._far_streams:
            from llmhost.engine.sm_partition import far_stream, sm_count
            from llmhost.host.sm_steering import near_sms

            near = near_sms(sm_count(device), self._far_prompt_sms)
            made = far_stream(device, near)
            self._far_streams[device] = made[0] if made is not None else None
            if made is not None:
                self._near_sms[device] = near
                log.info("%s: prompt steps beside other models on %d SMs at the far end", device, made[1])
        stream = self._far_streams[device]
        return stream if stream is not None and all(r.stream is not stream for r in running) else None

    def _launch_gpu(self, device: str, ready: list[str], running: list[_Running]) -> bool:
        """Launch on a GPU beside the steps in flight: decode-only steps of models whose decode step is not in
        flight (graph replays, high-priority streams), in the scheduler's order, while each is concurrent_ok with
        those in flight and not ahead of its share (launch_ok); then at most one prompt-only step on the GPU
        (eager, launched a layer at a time, default priority). A model's prompts never hold its decode rows back:
        in a mixed step they waited for the prompt chunk's eager launch and for any other model's prompt step (two
        never overlap), 60-120 ms gaps beside three models (bench/probes/host_trace.py). Returns whether any
        launched."""
        decoding = {r.name for r in running if not r.shape.prefill_tokens}
        prompting = {r.name for r in running if r.shape.prefill_tokens}
        engines: dict[str, Engine] = {n: self.slots[n].engine for n in ready}
        # Read once: a decode-only step leaves the prompt tokens waiting as they were (counted until collection).
        nexts = {n: _next_shape(eng) for n, eng in engines.items()}
        moved = False
        waiting = [n for n in ready if n not in decoding and nexts[n].decode_rows > 0]
        fresh = [n for n in waiting if self.gpu.solo_step_s(n) is None]
        if fresh:
            # A decode step whose solo cost was never measured has no cost to be charged beside others
            # (launch_ok), so it runs alone, which measures it. Launching the others' steps meanwhile kept it
            # waiting as long as they had work (a model loaded beside a busy one): let the GPU drain for it.
            if running:
                return False
            name = self.gpu.pick(device, fresh, busy=[n for n in ready if n not in fresh])
            # Decodes only: the step is the sample of its solo decode cost.
            if name is not None and self._launch_plan(name, device, engines[name].schedule(0), running):
                return True
        held: dict[str, str] = {}  # fair sharing kept these from starting -> the model each waits for
        while waiting:
            # A model whose prompt step is in flight is one of the models already running: its decode step may
            # join it. Counted as a step instead, the three other models' decode steps held a 1B model's decode
            # back for the whole of its prompt step's launch in slices (15-21 ms token gaps, its p99;
            # bench/probes/host_trace.py).
            full = len(decoding | prompting) >= MAX_CONCURRENT_MODELS
            candidates = [n for n in waiting if n in prompting] if full else waiting
            name = self.gpu.pick(device, candidates, busy=decoding | prompting) if candidates else None
            if name is None:
                break
            shape = StepShape(nexts[name].decode_rows, 0)
            if not self._fits_beside(running, name, shape):
                watched = self.confinement is not None or self.trace is not None
                if watched and all(concurrent_ok(r.shape, shape) for r in running):
                    held = self._held_by(running, waiting)
                break
            waiting.remove(name)
            carry = self._may_take_prompt(name, device, running, engines[name])
            plan = engines[name].schedule(0, graph_prompts=carry)
            run = self._launch_plan(name, device, plan, running)
            if run is not None:
                decoding.add(name)
                moved = True
        if self.confinement is not None:
            self.confinement.observe(device, ready, held)
        if self.trace is not None:
            self._trace_holds(ready, held)
        if prompting:
            return moved
        prompts = [n for n in ready if nexts[n].prefill_tokens > 0]
        name = self.gpu.pick(device, prompts, busy=decoding) if prompts else None
        if (
            name is not None
            and self._may_take_prompt(name, device, running, engines[name])
            and self._fits_beside(running, name, StepShape(0, 1))
        ):
            plan = engines[name].schedule(self.gpu.prefill_budget(name, device), decodes=False, graph_prompts=True)
            moved |= self._launch_plan(name, device, plan, running) is not None
        return moved

    def _may_take_prompt(self, name: str, device: str, running: list[_Running], eng: Engine) -> bool:
        """Whether `name`'s next step may take prompt tokens (rows of its decode graph, or an eager prompt step):
        always, unless ONE_PROMPT_ENV has the models of a GPU take turns (PromptTurns); only then are its pending
        prompt tokens (`eng`'s) and the other steps in flight looked at, off the decode launches' path otherwise."""
        if self._prompt_turns is None:
            return True
        pending = _next_shape(eng).prefill_tokens > 0
        others = any(r.name != name and (r.shape.prefill_tokens or _prompt_rows(r.plan)) for r in running)
        return self._prompt_turns.may_take(device, name, pending, others, time.perf_counter())

    def _fits_beside(self, running: list[_Running], name: str, shape: StepShape) -> bool:
        """Whether `name`'s step of `shape` may start beside the steps in flight: a small decode step
        (concurrent_ok) or the GPU's one prompt step (beside decode steps of any size: its own model's batch may
        be large, and its decode steps run ahead meanwhile), of a model not ahead of its share: its virtual time
        within the end of every other active model's current step (GpuScheduler.launch_ok, with the expected
        cost of each model's steps in flight: a prompt step's is its whole length)."""
        if not running:
            return True
        if shape.decode_rows and not all(concurrent_ok(r.shape, shape) for r in running):
            return False
        costs = self._costs_in_flight(running, prompts=True)
        return self.gpu.launch_ok(name, costs, prompt=not shape.decode_rows, done_s=self._done_in_flight(running))

    def _held_by(self, running: list[_Running], waiting: list[str]) -> dict[str, str]:
        """The models of `waiting` that fair sharing keeps from starting beside `running` -> the model each waits
        for (GpuScheduler.blocker): SM steering's evidence of who is ahead and who behind."""
        costs = self._costs_in_flight(running, prompts=True)
        done = self._done_in_flight(running)
        held = {n: self.gpu.blocker(n, costs, done) for n in waiting}
        return {n: by for n, by in held.items() if by is not None}

    def _trace_holds(self, ready: list[str], held: dict[str, str]) -> None:
        """Trace each hold as it begins, and again when the model it waits for changes: which model fair sharing
        keeps back (`ready` ones of one GPU; `held`: those held now -> the model each waits for). Which model's
        bound holds whom is what lead_steps and SM steering act on (bench/probes/trace_holds.py's
        hold_ms_by_blocker)."""
        assert self.trace is not None
        for name in ready:
            by = held.get(name)
            if by is not None and self._holding.get(name) != by:
                self.trace.add("hold", name, 0, 0, by=by)
            if by is None:
                self._holding.pop(name, None)
            else:
                self._holding[name] = by

    def _confined(self, name: str) -> bool:
        """Whether `name`'s next decode step replays graphs confined to fewer than all of its GPU's SMs."""
        runner = self._runner(name)
        return runner is not None and runner.sms is not None

    def _runner(self, name: str) -> DecodeRunner | None:
        """A resident model's decode runner: None for an engine without graphs (a CPU, a split model) and for the
        tests' fake engines, which have no such attribute."""
        runner: DecodeRunner | None = getattr(self.slots[name].engine, "runner", None)
        return runner

    def _done_in_flight(self, running: list[_Running]) -> dict[str, float]:
        """Each model with a decode step in `running` -> how much of its oldest decode step's solo cost has run by
        now: the fraction of its usual wall time (_step_wall, beside the others) since it began, at most all of
        it (GpuScheduler.launch_ok's `done_s`). Its bound then moves on while it runs."""
        now = time.perf_counter()
        done: dict[str, float] = {}
        seen: set[str] = set()
        for r in running:
            if r.name in seen or r.shape.prefill_tokens:
                continue
            seen.add(r.name)
            wall = self._step_wall.get(r.name)
            if wall is None:
                continue
            progress = min(1.0, max(0.0, now - r.began) / wall) if wall > 0.0 else 1.0
            done[r.name] = progress * self.gpu.expected_step_s(r.name, r.shape)
        return done

    def _costs_in_flight(self, running: list[_Running], prompts: bool) -> dict[str, float]:
        """Each model with steps in `running` -> their expected solo cost (GpuScheduler.expected_step_s), its
        prompt steps' included or (`prompts` False) left out."""
        costs: dict[str, float] = {}
        for r in running:
            if prompts or not r.shape.prefill_tokens:
                costs[r.name] = costs.get(r.name, 0.0) + self.gpu.expected_step_s(r.name, r.shape)
        return costs

    def _launch_plan(self, name: str, device: str, plan: StepPlan, running: list[_Running]) -> _Running | None:
        if plan.empty:
            return None
        shape = _shape(plan)
        far = self._far_stream(name, device, running) if shape.prefill_tokens else None
        if not shape.prefill_tokens:
            self._dither(name, device, running)
        run = self._execute(name, plan, shape, far or self._stream(name, device, running, shape))
        if run is None:
            return None
        run.confined = not shape.prefill_tokens and self._confined(name)
        _mark_beside(running, run)
        running.append(run)
        self._traced(run, len(running) - 1)
        return run

    def _dither(self, name: str, device: str, running: list[_Running]) -> None:
        """Before a decode step of `name` on a steered GPU: the SM count its graphs replay at, by whether it is ahead
        of the GPU's other active models (GpuScheduler.lead); not where SM_DITHER_ENV is "0" (its own level then).
        Under PROMPT_APART_ENV, while a prompt step runs on the far SMs: at most the SMs before them."""
        if self.confinement is None or not self.confinement.steers(device):
            return
        far = self._far_streams.get(device)
        if self._prompt_apart and far is not None and any(r.stream is far for r in running):
            self.confinement.keep_within(name, device, self._near_sms[device])
            return
        lead = self.gpu.lead(name, self._costs_in_flight(running, prompts=False)) if self._sm_dither else None
        if lead is not None:
            self.confinement.dither(name, device, ahead=lead > 0.0)
        elif self._prompt_apart:  # back to its own level, from the near SMs a prompt step kept it within
            self.confinement.dither(name, device, ahead=False)

    def _plan(self, name: str, device: str) -> tuple[StepPlan, StepShape]:
        eng: Engine = self.slots[name].engine
        plan = eng.schedule(self.gpu.prefill_budget(name, device))
        return plan, _shape(plan)

    def _launch(self, device: str, ready: list[str]) -> _Running | None:
        """The CPU: the scheduler's pick among `ready`, one step of any shape, run to completion."""
        while ready:
            name = self.gpu.pick(device, ready)
            if name is None:
                return None
            plan, shape = self._plan(name, device)
            if plan.empty:
                # work queued but nothing schedulable now (KV pool full): leave it out of this pick
                ready = [n for n in ready if n != name]
                continue
            run = self._execute(name, plan, shape, None)
            if run is None:
                ready = [n for n in ready if n != name]
                continue
            return run
        return None

    def _execute(
        self, name: str, plan: StepPlan, shape: StepShape, stream: torch.cuda.Stream | None
    ) -> _Running | None:
        eng: Engine = self.slots[name].engine
        t0 = time.perf_counter()
        eager = shape.prefill_tokens > 0 or eng.runner is None
        if stream is not None and eager and self._others_have_work(name, str(stream.device)):
            # An eager step's launch is milliseconds of Python (tens of ms for a prompt chunk on an 8B model,
            # bench/probes/launch_syncs.py): launched whole from the loop, it held every other model's next step
            # back that long. Launched by a thread of its own, it held the GIL instead: every loop pass over 6 ms
            # (collections and graph launches of 7-12 ms) fell while one was launching, and a 1B model's 128-token
            # prompt took 18-87 ms from its launch to its last kernel (bench/probes/host_trace.py). So the loop
            # queues it a layer at a time (_launch_slices), between its other launches and collections. A model
            # alone launches at once: nothing would run meanwhile.
            # Its kernels wait behind a hold until the last slice is queued (stream_gate.py): trickling out over
            # the launch, they slowed every other model's steps for all of it, and its GPU time (charged to its
            # model) was its launch time. The timing starts when the hold opens.
            gate = self._gates.get(str(stream.device))
            ticket = gate.hold(stream) if gate is not None else 0
            run = _Running(name, eng, plan, shape, t0, stream, slices=eng.launch_slices(plan, stream))
            run.start = _event(stream)
            run.gate, run.ticket = gate, ticket
            return run
        start = _event(stream) if stream is not None else None
        try:
            eng.execute(plan, stream)
        except Exception:
            self._fail_engine(name, eng)
            return None
        run = _Running(name, eng, plan, shape, t0, stream, _event(stream) if stream is not None else None)
        run.start = start
        return run

    def _collect(self, run: _Running) -> list[TokenEvent]:
        t_collect = time.perf_counter()
        ctx = torch.cuda.stream(run.stream) if run.stream is not None else contextlib.nullcontext()
        try:
            with ctx:  # sampling on the step's own stream: its sync waits for this step only
                outs = run.engine.collect(run.plan)  # returns after the step's tokens reached the host
        except Exception:
            self._fail_engine(run.name, run.engine)
            return []
        # Measured: the step's GPU time on a GPU (host delays in noticing it done left out; they made the solo
        # estimate, and so every overlapped step's charge, swing between runs), its latency on the CPU.
        gpu_s = run.gpu_seconds()
        seconds = gpu_s if gpu_s is not None else time.perf_counter() - run.t0
        # A step that shared the GPU is charged its solo cost (the pair's wall time would give both models the same
        # number of steps whatever their weights: gpu_scheduler.py), and its time is no sample of that cost. For a
        # decode step any step beside it counts; a prompt step beside only its own model's decode steps is how the
        # model prefills when alone, its solo cost. Charged their measured time beside three decoding models, the
        # prompt steps of the four-model bench (12-68 ms for what takes a few alone) put their model that far
        # ahead of its share, and its decoding requests waited it out: 30-130 ms token gaps, most of each model's
        # p99 inter-token latency (bench/probes/host_trace.py).
        if not run.shape.prefill_tokens:
            wall = t_collect - run.began
            old = self._step_wall.get(run.name)
            self._step_wall[run.name] = wall if old is None else old + STEP_WALL_ALPHA * (wall - old)
        shared, sample = _accounting(run, self.gpu.solo_step_s(run.name) is not None)
        solo = self.gpu.solo_step_s(run.name, run.shape) if shared else None
        if solo is not None and run.shape.prefill_tokens:
            solo = min(solo, seconds)  # a linear estimate from small launch-bound steps overshoots large ones
        charged = solo if solo is not None else seconds
        self.gpu.charge(run.name, charged, spread=run.shape.prefill_tokens > 0)
        self.gpu.observe(run.name, run.shape.decode_rows, run.shape.prefill_tokens, seconds, overlapped=not sample)
        if self.trace is not None:
            vtime, debt = self.gpu.standing(run.name)
            self.trace.add(
                "collect", run.name, run.shape.decode_rows, run.shape.prefill_tokens,
                gpu_ms=_ms(gpu_s),
                latency_ms=round(1e3 * (time.perf_counter() - run.t0), 3), overlapped=run.overlapped,
                ms=round(1e3 * (time.perf_counter() - t_collect), 3), vtime_ms=round(1e3 * vtime, 3),
                debt_ms=round(1e3 * debt, 3), charged_ms=round(1e3 * charged, 3),
                solo_ms=_ms(self.gpu.solo_step_s(run.name)),
                prompt_rows=_prompt_rows(run.plan),
            )  # fmt: skip
        self.coordinator.touch(run.name)
        return [
            TokenEvent(o.seq_id, o.token, o.logprob, o.top_logprobs, o.finish_reason, o.prompt_logprobs) for o in outs
        ]

    def _fail_engine(self, name: str, eng: Engine) -> None:
        """A failing step fails this engine's requests, not the host."""
        log.error("step of %s failed:\n%s", name, traceback.format_exc())
        for seq_id in list(eng.seqs):
            eng.abort(seq_id)
            self.conn.send(RequestFailed(seq_id, "internal", f"model '{name}' failed while generating"))
        eng.forget_failed_launches()  # else the blocks its failed step held back would never come back


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1e3 * seconds, 3)


def _allocator_counts(devices: Collection[str]) -> dict[str, list[int]]:
    """Per GPU, the caching allocator's counts of cudaMalloc retries (after freeing its cache: cudaFree waits for
    the whole device), cudaMallocs and cudaFrees so far: for the step trace's slow passes."""
    keys = ("num_alloc_retries", "num_device_alloc", "num_device_free")
    out: dict[str, list[int]] = {}
    for d in devices:
        if d.startswith("cuda"):
            stats = torch.cuda.memory_stats(d)
            out[d] = [int(stats.get(k, 0)) for k in keys]
    return out


def _mark_beside(running: list[_Running], run: _Running) -> None:
    """`run` launches beside the steps in `running` (one GPU's): each overlaps the other."""
    for r in running:
        run.overlapped = r.overlapped = True
        if r.name != run.name:
            run.beside_others = r.beside_others = True


def _event(stream: torch.cuda.Stream) -> torch.cuda.Event:
    """A timing event recorded on `stream` now."""
    ev = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    ev.record(stream)
    return ev


def _shape(plan: StepPlan) -> StepShape:
    """A planned step's size as the GPU scheduler reads it: its decode rows and its prompt tokens. A step whose
    prompts ride its graph (StepPlan.graphed) is a decode step: replayed, not launched eagerly, and reading the same
    weights (its prompt rows make its matmuls wider: 128 of them cost it 1.25x alone, so its time is no sample of
    the solo decode step, _accounting)."""
    rows = sum(1 for c in plan.chunks if c.is_decode)
    return StepShape(rows, 0 if plan.graphed else plan.prompt_tokens)


def _steering_from_env() -> Callable[[int], SmSteering]:
    """A GPU's SmSteering from its SM count, with the options the environment sets (DITHER_ALL_ENV, DEEP_LEVELS_ENV,
    SM_MIN_HELD_ENV, SM_SETTLE_ENV, SM_DEEPER_ENV)."""
    return functools.partial(
        SmSteering,
        dither_all=os.environ.get(DITHER_ALL_ENV) != "0",
        deep=os.environ.get(DEEP_LEVELS_ENV) != "0",
        min_held=float(os.environ.get(SM_MIN_HELD_ENV) or MIN_HELD),
        settle_window_s=SETTLE_WINDOW_S if os.environ.get(SM_SETTLE_ENV) == "1" else WINDOW_S,
        deeper=os.environ.get(SM_DEEPER_ENV) == "1",
    )


def _accounting(run: _Running, solo_known: bool) -> tuple[bool, bool]:
    """How a collected step counts for fair sharing: (shared: charged its model's solo cost rather than its
    measured time; sample: its time samples that cost). `solo_known`: the model's solo decode step is measured.

    - A prompt step (eager) beside another model's steps is shared; beside only its own model's decode steps it is
      how the model prefills alone, a sample of the prefill cost.
    - A decode step that overlapped any other step is shared; so is one confined to fewer SMs by SM steering once
      the solo cost is known (alone on fewer SMs it runs slower than its solo cost: that is what confining does).
    - A decode step whose graph carried prompt rows is no sample: alone it took 1.25-1.27x a plain one (8B 7.6
      against 6.1 ms, 3B 4.1 against 3.2, 1B 1.84 against 1.45), and with those in the average (the clients' first
      prompts come in a burst) one 8B's solo cost was frozen at 6.6-7.0 ms for the four-model window against the
      other's 6.1, so it was charged 8-14% more per step and ran at 0.32-0.33 of its solo speed against the
      other's 0.36; the 3B's at 3.35-3.42 against 3.20 (bench/results/multi_model_settle-h100.json's trace,
      bench/results/host_trace_raw-h100/settle/)."""
    if run.shape.prefill_tokens:
        return run.beside_others, not run.beside_others
    shared = run.overlapped or (run.confined and solo_known)
    return shared, not shared and not _prompt_rows(run.plan)


def _prompt_rows(plan: StepPlan) -> int:
    """The prompt tokens a graphed step carried as rows of its decode graph (traced: its shape counts none)."""
    return plan.prompt_tokens if plan.graphed else 0


def _next_shape(engine: Engine) -> StepShape:
    """The size the engine's next step would have: decode rows, and a nonzero prefill when any prompt is pending."""
    sched = engine.scheduler
    rows = sum(1 for s in sched.running if s.num_tokens - s.num_computed == 1)
    prefill = sum(s.num_tokens - s.num_computed for s in sched.running) - rows + len(sched.waiting)
    return StepShape(rows, prefill)


def host_main(
    config: Config,
    inventory: Inventory,
    conn: Connection,
    runtime: Any = None,
    specs: Sequence[ModelSpec] | None = None,
    on_start: Callable[[HostCore], None] | None = None,
) -> None:
    """Entry point of the host-core process (or thread, in-process). on_start: called with the core before its
    loop starts (in-process hosts: benches and tests reach the coordinator and the GPU scheduler through it)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s host %(levelname)s %(message)s")
    torch.set_grad_enabled(False)
    try:
        core = HostCore(config, inventory, conn, runtime, specs)
    except LlmhostError as e:
        conn.send(HostStopped(str(e)))
        return
    if on_start is not None:
        on_start(core)
    # The API process going away (a closed pipe) or Ctrl-C reaching the process group both mean: stop quietly.
    with contextlib.suppress(EOFError, BrokenPipeError, KeyboardInterrupt):
        core.run()
