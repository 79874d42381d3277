"""Probe: does launching a step make the host wait for the GPU? A mixed step (running decodes plus prompt chunks),
a pure prompt step and a decode step are launched (Engine.execute) on a side stream while another stream keeps the
GPU busy; each launch's host time, and the CUDA runtime calls that wait (stream/event/device synchronize, blocking
copies) as torch's sync debug mode reports them, with the Python stack that made them.

Usage: python bench/probes/launch_syncs.py [model ...]   (bench/shapes.py names; default llama-3.2-3b)"""

from __future__ import annotations

import json
import random
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from multi_model_drivers import greedy, prompt, random_engine
from shapes import SHAPES

from llmhost.config import ModelConfig
from llmhost.memory.estimate import default_kv_tokens


def busy(other: torch.cuda.Stream, a: torch.Tensor, n: int) -> None:
    """Queue about n large matmuls on `other`: the GPU stays busy for tens of milliseconds."""
    with torch.cuda.stream(other):
        for _ in range(n):
            a @ a


def launch(engine, plan, stream, other, a):  # type: ignore[no-untyped-def]
    busy(other, a, 40)
    t0 = time.perf_counter()
    engine.execute(plan, stream)
    host_ms = 1e3 * (time.perf_counter() - t0)
    engine.collect(plan)
    torch.cuda.synchronize()
    return host_ms


def waits_during(fn) -> list[dict]:  # type: ignore[no-untyped-def]
    """Run fn with torch's sync debug mode on: every synchronizing call it makes, with the stack that made it."""
    seen: dict[str, dict] = {}

    def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        stack = [ln.strip() for ln in traceback.format_stack()[:-2] if "llmhost/" in ln]
        key = str(message)[:120] + "|" + "|".join(stack[-3:])
        seen.setdefault(key, {"message": str(message)[:200], "count": 0, "stack": stack[-6:]})["count"] += 1

    previous = warnings.showwarning
    warnings.showwarning = show
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = previous
    return list(seen.values())


def probe(name: str, rng: random.Random, stream, other, a) -> dict:  # type: ignore[no-untyped-def]
    shape = SHAPES[name]
    cfg = ModelConfig(name, Path("random"), dtype="bfloat16", max_seq_len=512, max_batch=8)
    eng = random_engine(cfg, shape, "cuda", default_kv_tokens(cfg), 16)

    def add(n: int) -> None:
        for _ in range(n):
            eng.add_request(prompt(rng, 128, shape.vocab_size), greedy(64))

    def step(prompts: int) -> object:
        add(prompts)
        return eng.schedule(None)

    cases: dict[str, list[float]] = {}
    for _ in range(3):
        for case, prompts in (("prompts", 4), ("decode", 0), ("mixed", 4)):
            cases.setdefault(case, []).append(launch(eng, step(prompts), stream, other, a))
        for sid in list(eng.seqs):
            eng.abort(sid)
    syncs = {}
    for case, prompts in (("prompts", 4), ("decode", 0), ("mixed", 4)):
        plan = step(prompts)
        busy(other, a, 40)
        syncs[case] = waits_during(lambda plan=plan: eng.execute(plan, stream))
        eng.collect(plan)
        torch.cuda.synchronize()
    return {"model": name, "launch_host_ms": cases, "syncs_in_launch": syncs}


def main() -> None:
    torch.set_grad_enabled(False)
    rng = random.Random(0)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    other, stream = torch.cuda.Stream(), torch.cuda.Stream()
    results = []
    for name in sys.argv[1:] or ["llama-3.2-3b"]:
        results.append(probe(name, rng, stream, other, a))
        torch.cuda.empty_cache()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
