# ruff: noqa: B023, F821
"""Probe: what a graph decode step costs beyond the graph itself: host staging, the replay call's CPU time, the
argmax and the tokens' trip to the host, per model and batch size."""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from decode import decode_rows, random_model
from shapes import SHAPES

from llmhost.engine.decode_runner import DecodeRunner
from llmhost.engine.kv_cache import KVCache

torch.set_grad_enabled(False)


def ev_time(fn, n=20):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / n


def cpu_time(fn, n=20):
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    ts.sort()
    return ts[n // 2] * 1e3


for name in sys.argv[1].split(","):
    shape = SHAPES[name]
    model = random_model(shape, 2112)
    cache = KVCache(shape, 64 * 14 + 1, 16, torch.bfloat16, torch.device("cuda"))
    runner = DecodeRunner(model, cache, 64, 200)
    runner.capture()
    for b in (1, 8, 64):
        rows = decode_rows(b, 128, 16, 0)
        runner.run(rows)
        g = runner.graphs[b]
        r = {
            "model": name,
            "batch": b,
            "replay_ms": ev_time(g.replay),
            "replay_call_cpu_ms": cpu_time(g.replay),
            "stage_cpu_ms": cpu_time(lambda: runner._stage(rows, b)),
            "argmax_tolist_ms": cpu_time(lambda: runner.logits[:b].argmax(-1).tolist()),
            "step_ms": ev_time(lambda: runner.run(rows).argmax(-1).tolist()),
        }
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    del runner, cache, model
    torch.cuda.empty_cache()
