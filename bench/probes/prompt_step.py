"""Probe: what one prompt-only step costs on the GPU, for each model shape of the four-model bench, alone.

In the committed four-model step traces (`python bench/probes/step_company.py`, bench/results/step_company-*.json)
some prompt step is on the GPU 7.7-14.4% of the window, most of them the 1B's: one or two requests' 128-token
prompts at a time, 7.6-10.8 ms each at the median, beside the other models and alone alike. A 128-token prompt of
a 1B model is 0.25 TFLOP: 0.32 ms at the H100's GEMM peak. The 3B's decode steps beside a prompt step are the ones that
make its p99 (step_company.py), so a prompt step many times longer than its work is where that tail could shrink.

For each model and for 1, 2 and 4 requests of PROMPT tokens, a prompt-only step (Engine.schedule(decodes=False)),
as the host runs one beside other models: its kernels queued behind a stream gate's hold first, then let go as one
burst (host/core.py), so that its CUDA events time its GPU work, not the Python that launches it. Reported: the
median GPU time over REPEATS steps, the launch's host time, the matmul FLOPs (bench/decode.py prefill_flops) and
their rate against the GEMM peak measured in the same run; and for one PROMPT-token step of each model, its GPU time
by kernel (torch.profiler, the top KERNELS).

On the CPU (--cpu-smoke: the tiny model of bench/multi_model.py) the steps run as they are launched and are timed by
the wall clock; no gate, no profile, no peak. Writes bench/results/prompt_step-<gpu>.json.

Usage: python bench/probes/prompt_step.py [--cpu-smoke]"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # llmhost, where it is not installed

import torch
from common import gpu_tag, write_result
from decode import gemm_peak, prefill_flops
from multi_model import TINY
from multi_model_drivers import greedy, prompt, random_engine
from shapes import SHAPES

from llmhost.config import ModelConfig
from llmhost.engine.engine import Engine
from llmhost.model_files.shape import ModelShape

MODELS = ("llama-3.2-1b", "llama-3.2-3b", "llama-3-8b")  # the four-model bench's shapes (two 8Bs: one shape)
PROMPT = 128  # tokens per request, as the four-model bench sends
REQUESTS = (1, 2, 4)
REPEATS = 7
KERNELS = 12
KV_TOKENS = 8 * 1024
BLOCK = 16


def _engine(name: str, shape: ModelShape, device: str, dtype: str) -> Engine:
    config = ModelConfig(name, Path("/nonexistent") / name, dtype=dtype, max_seq_len=1024, max_batch=8)
    return random_engine(config, shape, device, KV_TOKENS, BLOCK)


def _one_step(eng: Engine, shape: ModelShape, requests: int, seed: int, gate: Any) -> tuple[float, float, list[int]]:
    """Queue `requests` prompts, run one prompt-only step of them: (GPU seconds, launch seconds, each chunk's
    tokens; the engine's token budget may leave part of a prompt out)."""
    rng = random.Random(seed)
    ids = [eng.add_request(prompt(rng, PROMPT, shape.vocab_size), greedy(4)) for _ in range(requests)]
    plan = eng.schedule(None, decodes=False)
    chunks = [len(c.token_ids) for c in plan.chunks]
    on_gpu = torch.cuda.is_available()
    stream = torch.cuda.current_stream() if on_gpu else None
    t0 = time.perf_counter()
    if on_gpu:
        ticket = gate.hold(stream)
        start = torch.cuda.Event(enable_timing=True)
        done = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        eng.execute(plan, stream)
        done.record(stream)
        launch_s = time.perf_counter() - t0
        gate.release(ticket)
        done.synchronize()
        gpu_s = start.elapsed_time(done) / 1e3
    else:
        eng.execute(plan, stream)
        launch_s = gpu_s = time.perf_counter() - t0
    eng.collect(plan)
    for seq_id in ids:
        eng.abort(seq_id)
    return gpu_s, launch_s, chunks


def _profile(eng: Engine, shape: ModelShape, gate: Any) -> list[dict[str, Any]]:
    """The GPU time by kernel of one PROMPT-token prompt step, the top KERNELS."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _one_step(eng, shape, 1, 99_999, gate)
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:KERNELS]
    return [{"kernel": e.key[:90], "calls": e.count, "ms": round(e.device_time_total / 1e3, 3)} for e in rows]


def _gate(device: str) -> Any:
    """The host's stream gate (its hold kernel compiled as it is made); None on the CPU."""
    if not device.startswith("cuda"):
        return None
    from llmhost.engine.stream_gate import StreamGate

    return StreamGate(device)


def measure(name: str, shape: ModelShape, device: str, dtype: str, peak: float | None) -> dict[str, Any]:
    eng = _engine(name, shape, device, dtype)
    gate = _gate(device)
    _one_step(eng, shape, 1, 0, gate)  # first use: compilations, matmul shapes
    out: dict[str, Any] = {"model": name, "steps": {}}
    for requests in REQUESTS:
        # Seeds never used before: a prompt seen before would hit the prefix cache and compute its last block only.
        runs = [_one_step(eng, shape, requests, 1000 * requests + k, gate) for k in range(REPEATS)]
        gpu_s = statistics.median(r[0] for r in runs)
        chunks = runs[0][2]
        flops = sum(prefill_flops(shape, n) for n in chunks)  # each request's chunk attends to itself only
        row = {
            "tokens": sum(chunks),
            "gpu_ms": round(1e3 * gpu_s, 3),
            "launch_ms": round(1e3 * statistics.median(r[1] for r in runs), 3),
            "tflops": round(flops / gpu_s / 1e12, 2),
        }
        if peak:
            row["fraction_of_gemm_peak"] = round(flops / gpu_s / peak, 3)
        out["steps"][str(requests)] = row
    if device.startswith("cuda"):
        out["kernels_128"] = _profile(eng, shape, gate)
    del eng
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the next shape's engine
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-smoke", action="store_true", help="the tiny float32 model on the CPU")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    on_gpu = torch.cuda.is_available() and not args.cpu_smoke
    device, dtype = ("cuda:0", "bfloat16") if on_gpu else ("cpu", "float32")
    peak = gemm_peak() if on_gpu else None
    models = [(n, SHAPES[n]) for n in MODELS] if on_gpu else [("tiny", TINY)]
    doc = {
        "bench": "prompt_step",
        "what": "one prompt-only step alone per model shape and prompt count, its kernels held, then let go at once",
        "gpu": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "torch": torch.__version__,
        "prompt_tokens": PROMPT,
        "bf16_gemm_peak_TFLOPs": round(peak / 1e12, 1) if peak else None,
        "models": [measure(n, s, device, dtype, peak) for n, s in models],
        "command": "python bench/probes/prompt_step.py" + (" --cpu-smoke" if args.cpu_smoke else ""),
    }
    write_result("prompt_step", gpu_tag(doc["gpu"]) if on_gpu else "cpu", doc)


if __name__ == "__main__":
    main()
