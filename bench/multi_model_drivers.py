"""What bench/multi_model.py drives: random-weight engines at real shapes, the host runtime that builds them, the
in-process host with asyncio clients, the engine.step() baselines (threads, processes), and the statistics of
token arrival times.

Every driver returns `Stream`s: one request's submission time and the arrival time of each of its tokens
(time.monotonic, comparable across processes). Statistics count the tokens that arrived inside a window that
starts after a warm-up, so prefill of the first requests, graph capture on demand and first-call kernels stay out.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import inspect
import json
import math
import multiprocessing as mp
import random
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmhost.config import Config, HostConfig, ModelConfig
from llmhost.engine.block_manager import blocks_for
from llmhost.engine.engine import MODEL_CLASSES, TORCH_DTYPES, Engine
from llmhost.engine.kv_cache import KVCache
from llmhost.engine.placement import LayerPlacement
from llmhost.engine.sampling_params import SamplingParams
from llmhost.host import parking
from llmhost.host.client import HostClient, HostRequestError
from llmhost.host.coordinator import Slot
from llmhost.host.core import HostCore
from llmhost.host.model_runtime import EngineRuntime
from llmhost.memory.estimate import ModelSpec, sliding_kv_blocks, uses_decode_graphs
from llmhost.memory.inventory import Inventory
from llmhost.model_files.shape import ModelShape

START_TIMEOUT_S = 300.0
WORKER_TIMEOUT_S = 200.0  # a baseline process's whole life


# -- engines with random weights ---------------------------------------------------------------------------------


def random_engine(config: ModelConfig, shape: ModelShape, device: str, kv_tokens: int, block_size: int) -> Engine:
    """The engine Engine.load would build for this config and plan, with N(0, 0.02) weights (norms 1) instead of a
    checkpoint: the same model class, KV pools sized by the same arithmetic (memory/estimate.py), the decode
    runner's scratch block and its CUDA graphs where Engine.load would capture them."""
    dev = torch.device(device)
    placement = LayerPlacement.single(dev, shape.num_layers)
    model = MODEL_CLASSES[shape.architecture](shape, TORCH_DTYPES[config.dtype], dev, config.max_seq_len, placement)
    for name, t in model.destinations().items():
        t.fill_(1.0) if "norm" in name else t.normal_(0.0, 0.02)
    spec = ModelSpec.from_shape(config, shape)
    graphs = uses_decode_graphs(spec, dev.type == "cuda")
    cache = KVCache(
        shape,
        blocks_for(kv_tokens, block_size) + (1 if graphs else 0),  # + the decode runner's scratch block
        block_size,
        TORCH_DTYPES[config.kv_dtype_resolved],
        dev,
        sliding_kv_blocks(spec, kv_tokens, block_size),
    )
    return Engine(model, [cache], config, (), decode_graphs=graphs)


class RandomRuntime(EngineRuntime):
    """The host's engine runtime with random weights at each model's shape (no checkpoint on disk): loading,
    measuring, parking and the driver readings are EngineRuntime's own. Records each swap-in's host-to-device copy
    time (parking.unpark's measurement; the coordinator's swap time also counts allocation and the runner)."""

    def __init__(self, inventory: Inventory, block_size: int, shapes: dict[str, ModelShape]) -> None:
        super().__init__(inventory, block_size)
        self.shapes = shapes
        self.copies: list[tuple[str, float, int]] = []  # (model, copy seconds, bytes)

    def build(self, slot: Slot) -> Engine:
        return random_engine(
            slot.config, self.shapes[slot.name], slot.device_names[0], slot.plan.kv_tokens, self.block_size
        )

    def unpark(self, slot: Slot) -> None:
        seconds = parking.unpark(slot.engine, slot.parked, self._kv_bytes[slot.name])
        self.copies.append((slot.name, seconds, int(slot.parked.nbytes)))


# -- token streams and their statistics ----------------------------------------------------------------------------


@dataclass
class Stream:
    model: str
    prompt_len: int
    submitted: float
    times: list[float] = field(default_factory=list)
    failed: str = ""


def percentile(xs: Sequence[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def write_tokens(path: Path, streams: Sequence[Stream], t0: float, t1: float) -> None:
    """Every client stream's token times and the window, as the trace probes read them (trace_holds.read_trace)."""
    tokens = [{"model": s.model, "submitted": s.submitted, "times": s.times} for s in streams]
    path.write_text(json.dumps({"t0": t0, "t1": t1, "streams": tokens}))


def stream_stats(
    streams: Sequence[Stream], t0: float, t1: float, weight_bytes: int = 0, kv_per_token: int = 0, rows: int = 1
) -> dict[str, Any]:
    """Tokens that arrived in [t0, t1): tokens/s, inter-token latency (gaps to the previous token of the same
    request), and the effective bandwidth: each token's step read the weights once, shared by at most `rows`
    tokens (exact for batch-1 streams, a lower bound for batched ones), and the KV of every position before it.
    Also the time to first token of the requests submitted in the window (ttft_ms): a model whose new requests wait
    long for their prompt step decodes fewer rows at once, which its token gaps do not show (an 8B of the four-model
    bench at 0.6 of the other's tok/s, its gaps 10-14% longer).

    Counted whole, a window's tokens are exact to one token (a batch-1 14B's 231 in 4 s: 0.4%); the same figures
    by token times (*_by_times: the tokens after the first in the window over the time from the first to the last)
    do not depend on where the window's edges fall between two tokens."""
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    tokens = 0
    read = 0.0
    gaps: list[float] = []
    timed: list[tuple[float, float]] = []  # (time, bytes read) of each token in the window
    for s in streams:
        for i, t in enumerate(s.times):
            if not t0 <= t < t1:
                continue
            tokens += 1
            bytes_read = weight_bytes / rows + (s.prompt_len + i) * kv_per_token
            read += bytes_read
            timed.append((t, bytes_read))
            if i > 0:
                gaps.append(t - s.times[i - 1])
    firsts = [s.times[0] - s.submitted for s in streams if s.times and t0 <= s.submitted < t1 and s.times[0] < t1]
    # Submitted in the window, no first token by its end: a model whose clients' requests all turn over near the
    # window's end (an 8B's 256 tokens take about the whole window together) decodes fewer rows meanwhile.
    pending = sum(1 for s in streams if t0 <= s.submitted < t1 and not (s.times and s.times[0] < t1))
    span = t1 - t0
    out: dict[str, Any] = {"tokens": tokens, "tokens_per_s": round(tokens / span, 2)}
    if weight_bytes:
        out["effective_bandwidth_GBps"] = round(read / span / 1e9, 1)
        out["bytes_per_s"] = read / span
    timed.sort()
    if len(timed) > 1 and timed[-1][0] > timed[0][0]:
        covered = timed[-1][0] - timed[0][0]
        out["tokens_per_s_by_times"] = round((len(timed) - 1) / covered, 2)
        if weight_bytes:
            out["bytes_per_s_by_times"] = (read - timed[0][1]) / covered
    if gaps:
        out["itl_ms"] = latency_ms(gaps)
    if firsts:
        out["ttft_ms"] = {"n": len(firsts), **latency_ms(firsts)}
    out["first_token_pending"] = pending
    return out


class GcPauses:
    """The client process's own garbage-collection pauses while it is entered (gc.callbacks): a pause stops every
    client at once, so tokens that arrive meanwhile are timed late, and their gaps count it as the host's. Where
    the pauses in a window are as long as its token gaps' tail, the tail is the client's."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, int, float]] = []  # (start, generation, seconds)
        self._start = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.monotonic()
        else:
            self.pauses.append((self._start, info["generation"], time.monotonic() - self._start))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def stats(self, t0: float, t1: float) -> dict[str, Any]:
        """Pauses that began in [t0, t1): how many per generation, their total and the longest, in ms."""
        mine = [(g, s) for t, g, s in self.pauses if t0 <= t < t1]
        return {
            "n_by_generation": {str(g): sum(1 for x, _ in mine if x == g) for g in sorted({g for g, _ in mine})},
            "total_ms": round(1e3 * sum(s for _, s in mine), 3),
            "max_ms": round(1e3 * max((s for _, s in mine), default=0.0), 3),
        }


def latency_ms(xs: Sequence[float]) -> dict[str, float]:
    """Mean, p50, p99 and max of `xs` seconds, in milliseconds."""
    return {
        "mean": round(1e3 * sum(xs) / len(xs), 3),
        "p50": round(1e3 * percentile(xs, 0.5), 3),
        "p99": round(1e3 * percentile(xs, 0.99), 3),
        "max": round(1e3 * max(xs), 3),
    }


def prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [rng.randrange(1, vocab // 2) for _ in range(length)]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


# -- the engine.step() baselines -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """One engine's workload: `seqs` requests in flight at all times, each `prompt_len` + `max_tokens`."""

    model: str
    seqs: int
    prompt_len: int
    max_tokens: int
    vocab: int


def drive_engine(engine: Engine, load: Load, t_end: float, seed: int) -> list[Stream]:
    """engine.step() until t_end, keeping load.seqs requests running (a finished one is replaced at once)."""
    rng = random.Random(seed)
    live: dict[str, Stream] = {}
    done: list[Stream] = []

    def add() -> None:
        s = Stream(load.model, load.prompt_len, time.monotonic())
        live[engine.add_request(prompt(rng, load.prompt_len, load.vocab), greedy(load.max_tokens))] = s

    for _ in range(load.seqs):
        add()
    while time.monotonic() < t_end:
        outs = engine.step()
        now = time.monotonic()
        for o in outs:
            live[o.seq_id].times.append(now)
            if o.finished:
                done.append(live.pop(o.seq_id))
                add()
    for seq_id, s in live.items():
        engine.abort(seq_id)
        done.append(s)
    return done


def warm_engine(engine: Engine, load: Load) -> None:
    """A few steps of the same workload (first-call kernels, allocator growth), then nothing in flight."""
    drive_engine(engine, Load(load.model, load.seqs, load.prompt_len, 8, load.vocab), time.monotonic() + 0.3, 0)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def drive_threads(
    engines: Sequence[Engine],
    loads: Sequence[Load],
    t_start: float,
    t_end: float,
    priorities: Sequence[int] | None = None,
    streams: Sequence[torch.cuda.Stream] | None = None,
) -> list[Stream]:
    """One thread per engine, each on its own CUDA stream (the strongest form of the report's pattern: on the
    default stream two threads' kernels could not even overlap), all starting at t_start. `priorities`: each
    engine's stream priority (default 0 each; lower is higher); `streams`: each engine's stream, made by the
    caller (a green context's, say) instead."""
    results: list[list[Stream]] = [[] for _ in engines]
    errors: list[BaseException] = []

    def body(k: int) -> None:
        try:
            with torch.inference_mode():
                cuda = engines[k].device.type == "cuda"
                prio = priorities[k] if priorities is not None else 0
                stream = torch.cuda.Stream(engines[k].device, priority=prio) if cuda else None  # type: ignore[no-untyped-call]
                if streams is not None:
                    stream = streams[k]
                ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
                with ctx:
                    time.sleep(max(0.0, t_start - time.monotonic()))
                    results[k] = drive_engine(engines[k], loads[k], t_end, seed=k + 1)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=body, args=(k,)) for k in range(len(engines))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [s for r in results for s in r]


def process_worker(
    spec: tuple[ModelConfig, ModelShape, str, int, int],
    load: Load,
    seed: int,
    ready: Any,
    start: Any,
    results: Any,
) -> None:
    """One baseline process: build its engine, warm it, say ready, wait for the common start, drive, report."""
    faulthandler.dump_traceback_later(WORKER_TIMEOUT_S - 10, exit=True)  # a hang shows where, then ends
    try:
        torch.set_grad_enabled(False)
        config, shape, device, kv_tokens, block_size = spec
        if device == "cpu":
            torch.set_num_threads(1)  # the CPU smoke run's tiny models, as in the phase processes
        engine = random_engine(config, shape, device, kv_tokens, block_size)
        warm_engine(engine, load)
        ready.put(seed)
        t_start, t_end = start.get()
        time.sleep(max(0.0, t_start - time.monotonic()))
        streams = drive_engine(engine, load, t_end, seed)
        results.put((seed, [(s.model, s.prompt_len, s.submitted, s.times) for s in streams], ""))
    except BaseException as e:
        ready.put(seed)
        results.put((seed, [], f"{type(e).__name__}: {e}"))


def drive_processes(
    specs: Sequence[tuple[ModelConfig, ModelShape, str, int, int]],
    loads: Sequence[Load],
    warm_s: float,
    window_s: float,
    timeout_s: float = WORKER_TIMEOUT_S,
) -> tuple[list[Stream], float, float]:
    """One spawned process per engine (each its own CUDA context: the GPU time-slices them, or MPS runs them
    together when its daemon is up). Returns the streams and the measurement window."""
    ctx = mp.get_context("spawn")
    ready, start, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(target=process_worker, args=(spec, load, k + 1, ready, start, results), daemon=True)
        for k, (spec, load) in enumerate(zip(specs, loads, strict=True))
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for _ in procs:
        ready.get(timeout=max(1.0, deadline - time.monotonic()))
    t_start = time.monotonic() + 0.5
    t_end = t_start + warm_s + window_s
    for _ in procs:
        start.put((t_start, t_end))
    streams: list[Stream] = []
    errors = []
    for _ in procs:
        _, rows, err = results.get(timeout=max(1.0, deadline - time.monotonic()))
        if err:
            errors.append(err)
        streams += [Stream(m, n, sub, times) for m, n, sub, times in rows]
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError("; ".join(errors))
    return streams, t_start + warm_s, t_end


# -- the in-process host ------------------------------------------------------------------------------------------


@dataclass
class HostRun:
    """A started host and what the bench observed of its coordinator: every load and swap-in's reconciliation of
    the ledger with the driver (the coordinator reconciles right after each one)."""

    client: HostClient
    runtime: RandomRuntime
    label: str
    core: HostCore | None = None  # in-process only

    @property
    def reconciliations(self) -> list[dict[str, Any]]:
        return [
            {
                "phase": self.label,
                "model": load.model,
                "action": load.action,
                "device": rec.device,
                "seconds": round(load.seconds, 3),
                "predicted_bytes": rec.predicted,
                "driver_used_bytes": rec.driver_used,
                "relative_error": round(rec.relative_error, 5),
            }
            for load in self.client.loads
            for rec in load.reconciliations
        ]


def start_host(
    inventory: Inventory,
    host: HostConfig,
    models: Sequence[tuple[ModelConfig, ModelShape]],
    label: str,
    in_process: bool = True,
) -> HostRun:
    """The host with random weights, every model planned from its shape: in a thread of this process (the core
    observable, run.core), or in_process=False in its own process, as the server runs it (the bench's threads
    then take no GIL time from the host loop)."""
    config = Config(host, tuple(c for c, _ in models))
    specs = [ModelSpec.from_shape(c, s) for c, s in models]
    runtime = RandomRuntime(inventory, host.block_size, {c.name: s for c, s in models})
    run = HostRun(HostClient(config, inventory), runtime, label)

    def observe(core: HostCore) -> None:
        run.core = core

    run.client.start(in_process=in_process, runtime=runtime, specs=specs, on_start=observe if in_process else None)
    deadline = time.monotonic() + START_TIMEOUT_S
    names = [c.name for c, _ in models]  # those resident at start load first; the others stay "unloaded"
    while time.monotonic() < deadline:
        run.client.status_changed.wait(1.0)
        run.client.status_changed.clear()
        if run.client.stopped is not None:
            raise RuntimeError(f"the host stopped: {run.client.stopped.reason}")
        status = run.client.status
        settled = all(n in status and status[n].state not in ("loading", "failed") for n in names)
        if settled and any(status[n].state == "loaded" for n in names) and (run.core or not in_process):
            return run
        failed = [m for m in status.values() if m.state == "failed"]
        if failed:
            raise RuntimeError(f"model '{failed[0].name}' failed to load: {failed[0].error}")
    raise RuntimeError("the host's models did not load in time")


def stop_host(run: HostRun) -> None:
    run.client.stop()
    run.core = None


async def _client(
    client: HostClient, load: Load, seed: int, t_end: float, streams: list[Stream], stop_after: int | None
) -> None:
    """Requests one after the other until t_end (or stop_after requests); the last is abandoned at t_end."""
    rng = random.Random(seed)
    n = 0
    while time.monotonic() < t_end and (stop_after is None or n < stop_after):
        n += 1
        s = Stream(load.model, load.prompt_len, time.monotonic())
        streams.append(s)
        ids = prompt(rng, load.prompt_len, load.vocab)
        try:
            async with aclosing(client.generate_batches(load.model, ids, greedy(load.max_tokens))) as batches:
                while True:
                    # A host that stops answering must not hold the bench past t_end (a stalled request is left
                    # incomplete, which the swap phase counts as failed).
                    wait = max(0.0, t_end - time.monotonic()) + 0.05
                    try:
                        batch = await asyncio.wait_for(anext(batches), wait)
                    except (StopAsyncIteration, TimeoutError):
                        break
                    now = time.monotonic()
                    s.times.extend([now] * len(batch))
                    if now >= t_end:
                        break
        except HostRequestError as e:
            s.failed = f"{e.failure.kind}: {e.failure.message}"


def drive_host(
    run: HostRun,
    loads: Sequence[Load],
    t_end: float,
    seed: int = 0,
    stop_after: int | None = None,
    at: Sequence[tuple[float, Callable[[], Any]]] = (),
) -> list[Stream]:
    """load.seqs concurrent clients per model (asyncio, in this thread), each sending requests one after the
    other. `at`: (time, callback) pairs run from the event loop at those times (snapshots of the scheduler)."""

    async def main() -> list[Stream]:
        streams: list[Stream] = []

        async def call_at(t: float, fn: Callable[[], Any]) -> None:
            await asyncio.sleep(max(0.0, t - time.monotonic()))
            result = fn()
            if inspect.isawaitable(result):
                await result

        tasks = [
            _client(run.client, load, seed * 1000 + 100 * i + k, t_end, streams, stop_after)
            for i, load in enumerate(loads)
            for k in range(load.seqs)
        ]
        await asyncio.gather(*tasks, *(call_at(t, fn) for t, fn in at))
        return streams

    return asyncio.run(main())
