"""Serving overhead: N concurrent streaming clients through `llmhost serve` (HTTP + API process + host process)
against the same engine driven directly in this process, with the same prompts, in the same run.

Both runs submit every request at once (the engine gets them all before its first step; the HTTP clients all
connect at once), generate exactly max_tokens tokens each (ignore_eos), and sample with temperature 0.7 and a seed
per request. Throughput = generated tokens / (last token - start); steady throughput counts only the tokens after
every request has its first one (HTTP requests reach the host spread over some milliseconds, so its first steps
mix prefill and decode differently); TTFT = first token - submission, per request.
Target (issue 5): HTTP throughput >= 95% of direct at 64 clients on one model.

The model: `--shape NAME` (default llama-3-8b) writes a random-weights checkpoint at that real shape once (see
bench/random_checkpoint.py; ~16 GB for Llama-3-8B in --cache-dir); `--checkpoint PATH` uses a real one (an HF dir
or GGUF with its tokenizer). Prompts are token ids, sent to /v1/completions as `prompt: [ids]`, so both paths see
identical prompts whatever the tokenizer.

Usage (GPU machine): python bench/serve.py [--clients 64] [--prompt-tokens 128] [--max-tokens 256]
Needs fastapi, uvicorn, pydantic in the environment (the clients are sse_client.py's, plain asyncio).
Writes bench/results/serve-<gpu>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from common import gpu_tag, write_result
from random_checkpoint import random_checkpoint
from sse_client import post_events

from llmhost.config import ModelConfig
from llmhost.engine.engine import Engine
from llmhost.engine.sampling_params import SamplingParams
from llmhost.engine.tokenizer import Tokenizer
from llmhost.model_files import open_checkpoint

REPO = Path(__file__).resolve().parents[1]
MODEL = "bench"
TEMPERATURE = 0.7
LOAD_TIMEOUT_S = 600.0
WARMUP_TOKENS = 8


def percentile(xs: list[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(times: list[list[float]], start: float) -> dict[str, Any]:
    """times: per request, when each of its tokens arrived. Throughput over the whole run, and over the steady
    part, after every request has its first token (arrival spread and prefill excluded): the serving overhead
    per decode step shows there."""
    firsts = [t[0] for t in times]
    end = max(t[-1] for t in times)
    all_started = max(firsts)
    tokens = sum(len(t) for t in times)
    steady = sum(1 for ts in times for x in ts if x > all_started)
    ttfts = [f - start for f in firsts]
    return {
        "tokens": tokens,
        "wall_s": round(end - start, 3),
        "tokens_per_s": round(tokens / (end - start), 1),
        "steady_tokens_per_s": round(steady / (end - all_started), 1) if end > all_started else None,
        "ttft_p50_s": round(statistics.median(ttfts), 4),
        "ttft_p99_s": round(percentile(ttfts, 0.99), 4),
    }


def make_prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    # Ids from the lower half of the vocabulary: real tokenizers put special tokens at the top.
    return [torch.randint(1, vocab // 2, (length,), generator=g).tolist() for _ in range(n)]


def model_config(path: Path, args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        name=MODEL,
        path=path,
        dtype=args.dtype,
        max_seq_len=args.prompt_tokens + args.max_tokens,
        max_batch=args.clients,
    )


def run_direct(path: Path, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    cfg = model_config(path, args)
    ckpt = open_checkpoint(path)
    t0 = time.perf_counter()
    engine = Engine.load(cfg, args.device, checkpoint=ckpt)
    load_s = time.perf_counter() - t0
    params = [
        SamplingParams(max_tokens=args.max_tokens, temperature=TEMPERATURE, seed=i, ignore_eos=True)
        for i in range(len(prompts))
    ]
    # Warm-up outside the measurement, the same for both paths: every client once, a few tokens each (first-call
    # kernels and allocator growth at each batch size).
    engine.generate(prompts, SamplingParams(max_tokens=WARMUP_TOKENS, ignore_eos=True))
    _sync(args.device)
    start = time.perf_counter()
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    times: dict[str, list[float]] = {i: [] for i in ids}
    while engine.has_work:
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            times[o.seq_id].append(now)
    result = summary(list(times.values()), start)
    result["load_s"] = round(load_s, 2)
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _client(port: int, prompt: list[int], seed: int, max_tokens: int) -> tuple[float, list[float]]:
    """When one streaming request was sent, and when each of its tokens arrived (one completions chunk per token:
    the word-level tokenizer never holds text back; a real tokenizer may, which delays a time but never drops
    one)."""
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": TEMPERATURE,
        "seed": seed,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    times: list[float] = []
    usage = 0
    sent = time.perf_counter()
    async for event in post_events("127.0.0.1", port, "/v1/completions", body):
        if event.data == "[DONE]":
            continue
        chunk = json.loads(event.data)
        if "error" in chunk:
            raise RuntimeError(chunk["error"]["message"])
        if chunk["choices"]:
            times.append(event.at)
        if chunk.get("usage"):
            usage = chunk["usage"]["completion_tokens"]
    if usage > len(times):  # a chunk that carried several tokens: count them all at its time
        times += [times[-1]] * (usage - len(times))
    return sent, times


async def _drive(port: int, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """Every client at once, each on its own connection (sse_client.py: httpx's one client spread the requests'
    arrival over half a second of its own work)."""
    await asyncio.gather(*(_client(port, p, 0, WARMUP_TOKENS) for p in prompts))
    start = time.perf_counter()
    results = await asyncio.gather(*(_client(port, p, i, max_tokens) for i, p in enumerate(prompts)))
    doc = summary([times for _, times in results], start)
    doc["send_spread_s"] = round(max(sent for sent, _ in results) - start, 4)
    return doc


def _health(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
        doc: dict[str, Any] = json.load(r)
    return doc


def run_http(path: Path, prompts: list[list[int]], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    cfg = model_config(path, args)
    config = workdir / "serve.toml"
    config.write_text(
        f'[models.{MODEL}]\npath = "{path}"\ndtype = "{cfg.dtype}"\n'
        f"max_seq_len = {cfg.max_seq_len}\nmax_batch = {cfg.max_batch}\n"
    )
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = workdir / "serve.log"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "llmhost.cli", "serve", "--config", str(config), "--port", str(port)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    try:
        while True:
            if proc.poll() is not None or time.perf_counter() - t0 > LOAD_TIMEOUT_S:
                raise RuntimeError(f"the server did not start:\n{log.read_text()[-4000:]}")
            try:
                state = _health(url)["models"].get(MODEL)
            except OSError:  # not listening yet (URLError is an OSError)
                state = None
            if state == "loaded":
                break
            if state == "failed":
                raise RuntimeError(f"the model failed to load:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        load_s = time.perf_counter() - t0
        result = asyncio.run(_drive(port, prompts, args.max_tokens))
        result["load_s"] = round(load_s, 2)
        return result
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-3-8b", help="bench/shapes.py name for a random-weights checkpoint")
    p.add_argument("--checkpoint", type=Path, default=None, help="a real checkpoint instead of --shape")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "llmhost-bench")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    path = args.checkpoint or random_checkpoint(args.shape, args.cache_dir / args.shape)
    prepare_s = time.perf_counter() - t0
    vocab = Tokenizer.from_checkpoint(open_checkpoint(path)).vocab_size
    prompts = make_prompts(args.clients, args.prompt_tokens, vocab)
    direct = run_direct(path, prompts, args)
    with tempfile.TemporaryDirectory() as tmp:
        http = run_http(path, prompts, args, Path(tmp))
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    ratio = http["tokens_per_s"] / direct["tokens_per_s"]
    steady = (http["steady_tokens_per_s"] or 0.0) / (direct["steady_tokens_per_s"] or 1.0)
    doc = {
        "bench": "serve",
        "gpu": name,
        "torch": torch.__version__,
        "model": str(args.checkpoint) if args.checkpoint else f"random weights, {args.shape} shape",
        "dtype": args.dtype,
        "clients": args.clients,
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "checkpoint_prepare_s": round(prepare_s, 1),
        "direct": direct,
        "http": http,
        "throughput_ratio": round(ratio, 4),
        "steady_throughput_ratio": round(steady, 4),
        "target_ratio": 0.95,
        "meets_target": ratio >= 0.95,
    }
    write_result("serve", gpu_tag(name), doc)


if __name__ == "__main__":
    main()
