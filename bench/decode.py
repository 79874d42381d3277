"""Decode and prefill speed on the GPU, with the ceilings and baselines measured in the same run.

Per model shape (random weights: speed does not depend on values):
- graph decode (DecodeRunner: fused Triton kernels + CUDA graphs) at batch 1, 8, 32, 64 with prompts of 128 and
  2048 tokens: tokens/s, step time, and effective bandwidth = (weight bytes + KV bytes read) / step time, with its
  ratio to the device copy bandwidth (read + write bytes of a 4 GiB device-to-device copy);
- every step includes what a real engine step does around the graph: writing the inputs, a greedy argmax on the
  device whose tokens feed the next step there and come back to the host, run a step ahead as the engine runs
  them (engine.py); `engine_step_decode` times the engine's own step() (scheduler, sampler, run-ahead);
- prefill: one 2048-token chunk through the engine's forward (fused kernels on the GPU), as the matmul FLOPs it
  needs (layers' projections, causal attention, the head for one row) per second over the bf16 GEMM peak (8192^3);
- baselines: the same model through plain torch eager ops (our reference forward, batch 1) and HF transformers
  `generate` (batch 1, random init at the same shape);
- CUDA-graph capture time for all batch sizes.

Usage: python bench/decode.py [--models mistral-7b,llama-3-8b,qwen2.5-14b] [--quick]
Writes bench/results/decode-<gpu>.json.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from common import gpu_tag, write_result
from shapes import SHAPES

from llmhost.engine.attention import AttentionBatch, ChunkMeta
from llmhost.engine.decode_runner import DecodeRow, DecodeRunner
from llmhost.engine.kv_cache import KVCache
from llmhost.engine.model import LlamaModel
from llmhost.model_files.shape import ModelShape

GiB = 1024**3


def timed(fn: Any, iters: int) -> float:
    """Median seconds per call of `fn` over `iters` calls after warm-up, timed with CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth() -> float:
    src = torch.empty(4 * GiB // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), 20)
    return 2 * 4 * GiB / t  # bytes read + bytes written


def gemm_peak() -> float:
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    t = timed(lambda: a @ b, 20)
    return 2 * n**3 / t


def random_model(shape: ModelShape, max_seq_len: int) -> LlamaModel:
    m = LlamaModel(shape, torch.bfloat16, torch.device("cuda"), max_seq_len)
    for name, t in m.destinations().items():
        t.fill_(1.0) if "norm" in name else t.normal_(0.0, 0.02)
    return m


def prefill_flops(shape: ModelShape, n: int, rows_sampled: int = 1) -> float:
    """Matmul FLOPs a fresh n-token prompt chunk needs: the layers' projections for every token, the head for the
    `rows_sampled` rows sampled (the embedding is a lookup), and causal attention (QK^T and PV over half the
    square)."""
    q, kv, hid, inter = (
        shape.num_heads * shape.head_dim,
        shape.num_kv_heads * shape.head_dim,
        shape.hidden_size,
        shape.intermediate_size,
    )
    layer_params = hid * (q + 2 * kv) + q * hid + 3 * hid * inter
    attn_flops = 4 * shape.num_layers * shape.num_heads * shape.head_dim * n * n / 2
    return 2 * shape.num_layers * layer_params * n + 2 * hid * shape.vocab_size * rows_sampled + attn_flops


def decode_rows(batch: int, prompt: int, bs: int, step: int, feed: bool = False) -> list[DecodeRow]:
    """feed: each row's token is the previous step's row r, on the device (as when the engine runs ahead)."""
    per_seq = -(-(prompt + 64) // bs)
    return [
        DecodeRow(1 + r, prompt + step, tuple(range(r * per_seq, (r + 1) * per_seq)), feed=r if feed else -1)
        for r in range(batch)
    ]


def pipelined_step_time(runner: DecodeRunner, b: int, prompt: int, bs: int, steps: int) -> float:
    """Seconds per decode step as the engine runs them ahead (engine.py): step N+1's rows are staged and its graph
    launched before step N's tokens are read; each step's greedy tokens are taken on the device, left in the
    runner's `sampled` to feed the next step, and copied to the host (pinned, asynchronously), where they are read
    one step later. Median over three runs of `steps` steps."""
    host = [torch.empty(b, dtype=torch.int64, pin_memory=True) for _ in range(2)]
    done = [torch.cuda.Event() for _ in range(2)]

    def run() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(steps + 1):
            logits = runner.run(decode_rows(b, prompt, bs, i % 32, feed=i > 0))
            tokens = logits.argmax(dim=-1)
            runner.sampled[:b].copy_(tokens)
            host[i % 2].copy_(tokens, non_blocking=True)
            done[i % 2].record()
            if i == 0:
                done[0].synchronize()
                t0 = time.perf_counter()  # timing starts after the one step whose tokens the host staged
            else:
                done[(i - 1) % 2].synchronize()
                host[(i - 1) % 2].tolist()
        done[steps % 2].synchronize()
        host[steps % 2].tolist()
        return (time.perf_counter() - t0) / steps

    run()  # warm-up
    times = sorted(run() for _ in range(3))
    return times[1]


def bench_model(name: str, quick: bool, copy_bw: float, peak: float) -> dict[str, Any]:
    shape = SHAPES[name]
    bs = 16
    batches = (1, 8) if quick else (1, 8, 32, 64)
    prompts = (128,) if quick else (128, 2048)
    max_seq = max(prompts) + 64
    max_batch = max(batches)
    model = random_model(shape, max(max_seq, 2048))
    weight_bytes = model.weight_bytes()
    per_seq_blocks = -(-(max_seq) // bs)
    # Enough blocks for every decode row and for the 2048-token prefill, plus the runner's scratch block.
    blocks = max(max_batch * per_seq_blocks, -(-2048 // bs)) + 1
    cache = KVCache(shape, blocks, bs, torch.bfloat16, torch.device("cuda"))
    cache.k.normal_(0.0, 1.0)
    cache.v.normal_(0.0, 1.0)
    runner = DecodeRunner(model, cache, max_batch, max_seq)
    t0 = time.perf_counter()
    runner.capture()
    capture_s = time.perf_counter() - t0
    kv_per_token = shape.kv_bytes_per_token(2)
    rows = []
    for prompt in prompts:
        for b in batches:
            t = pipelined_step_time(runner, b, prompt, bs, 40)
            read = weight_bytes + b * (prompt + 16) * kv_per_token
            rows.append({
                "batch": b, "prompt": prompt, "step_ms": round(t * 1e3, 3), "tokens_per_s": round(b / t, 1),
                "effective_bandwidth_GBps": round(read / t / 1e9, 1),
                "fraction_of_copy_bandwidth": round(read / t / copy_bw, 3),
            })  # fmt: skip
            print(name, rows[-1], file=sys.stderr, flush=True)

    engine_rows = engine_steps(model, shape, weight_bytes, copy_bw, (1, max_batch))

    # Plain torch eager: the reference forward decoding one token of one sequence (prompt 128).
    def eager_step() -> None:
        table = tuple(range(per_seq_blocks))
        meta = ChunkMeta(0, 1, 129, torch.tensor(table[: -(-129 // bs)], device="cuda"))
        logits = model.forward(
            torch.tensor([1], device="cuda"), torch.tensor([128], device="cuda"),
            AttentionBatch(torch.tensor([128], device="cuda"), (meta,)), cache, torch.tensor([0], device="cuda"),
        )  # fmt: skip
        logits.argmax(dim=-1).tolist()

    model.fused = False  # plain torch ops, no Triton kernels
    eager_t = timed(eager_step, 10)
    model.fused = True

    # Prefill: one 2048-token chunk (fresh sequence) through the forward the engine runs (fused kernels).
    n = 2048
    table = tuple(range(-(-n // bs)))
    slots = torch.arange(n, device="cuda")
    meta = ChunkMeta(0, n, n, torch.tensor(table, device="cuda"))
    ids = torch.randint(0, shape.vocab_size, (n,), device="cuda")
    pos = torch.arange(n, device="cuda")
    prefill_t = timed(
        lambda: model.forward(ids, pos, AttentionBatch(slots, (meta,)), cache, torch.tensor([n - 1], device="cuda")),
        5,
    )
    flops = prefill_flops(shape, n)
    sizes = runner.sizes
    b1 = next(r for r in rows if r["batch"] == 1 and r["prompt"] == 128)
    return {
        "model": name,
        "weight_bytes": weight_bytes,
        "graph_capture_s": round(capture_s, 2),
        "graph_batch_sizes": list(sizes),
        "decode": rows,
        "engine_step_decode": engine_rows,
        "prefill_2048": {
            "tokens_per_s": round(n / prefill_t, 1),
            "tflops": round(flops / prefill_t / 1e12, 1),
            "fraction_of_gemm_peak": round(flops / prefill_t / peak, 3),
        },
        "baselines_batch1_prompt128": {
            "torch_eager_tokens_per_s": round(1 / eager_t, 1),
            "graph_over_eager": round(b1["tokens_per_s"] * eager_t, 2),
        },
    }


def engine_steps(
    model: LlamaModel, shape: ModelShape, weight_bytes: int, copy_bw: float, batches: tuple[int, ...]
) -> list[dict[str, Any]]:
    """Decode through Engine.step(): scheduler, graph replay and the sampler (greedy), prompt 128, in a fresh
    engine (own cache and graphs) for each batch size: what a served request gets."""
    from llmhost.config import ModelConfig
    from llmhost.engine.engine import Engine
    from llmhost.engine.sampling_params import SamplingParams

    out = []
    for b in batches:
        cfg = ModelConfig(name="bench", path=Path("random"), dtype="bfloat16", max_seq_len=512, max_batch=b)
        cache = KVCache(shape, b * 32 + 1, 16, torch.bfloat16, torch.device("cuda"))
        engine = Engine(model, cache, cfg, decode_graphs=True)
        params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        for r in range(b):
            engine.add_request([(r * 7 + i) % shape.vocab_size for i in range(128)], params)
        while any(s.num_computed < len(s.prompt_ids) for s in engine.seqs.values()):
            engine.step()  # prefill (reference path)
        for _ in range(5):
            engine.step()
        torch.cuda.synchronize()
        n = 40
        t0 = time.perf_counter()
        for _ in range(n):
            engine.step()
        torch.cuda.synchronize()
        t = (time.perf_counter() - t0) / n
        read = weight_bytes + b * 200 * shape.kv_bytes_per_token(2)
        out.append({
            "batch": b, "prompt": 128, "step_ms": round(t * 1e3, 3), "tokens_per_s": round(b / t, 1),
            "fraction_of_copy_bandwidth": round(read / t / copy_bw, 3),
        })  # fmt: skip
        print("engine.step", out[-1], file=sys.stderr, flush=True)
        del engine, cache
        gc.collect()
        torch.cuda.empty_cache()
    return out


def hf_generate_tok_s(shape: ModelShape) -> float:
    """HF transformers `generate`, batch 1, 128-token prompt, 64 new tokens, random init at the same shape."""
    import transformers

    cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}.get(
        shape.architecture, (transformers.LlamaConfig, transformers.LlamaForCausalLM)
    )
    cfg = cls[0](
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads, vocab_size=shape.vocab_size,
        max_position_embeddings=4096, tie_word_embeddings=shape.tie_embeddings, head_dim=shape.head_dim,
    )  # fmt: skip
    with torch.device("cuda"):
        model = cls[1](cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, shape.vocab_size, (1, 128), device="cuda")
    new = 64
    model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return round(new / dt, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mistral-7b,llama-3-8b,qwen2.5-14b")
    ap.add_argument("--quick", action="store_true", help="batch 1 and 8, prompt 128, no HF baseline")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    copy_bw = copy_bandwidth()
    peak = gemm_peak()
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s, bf16 GEMM peak {peak / 1e12:.0f} TFLOP/s", file=sys.stderr)
    results = []
    for m in args.models.split(","):
        r = bench_model(m, args.quick, copy_bw, peak)
        gc.collect()
        torch.cuda.empty_cache()  # our model, cache and graphs are gone before HF's copy arrives
        if not args.quick:
            base = r["baselines_batch1_prompt128"]
            hf = hf_generate_tok_s(SHAPES[m])
            b1 = next(x for x in r["decode"] if x["batch"] == 1 and x["prompt"] == 128)
            base["hf_transformers_generate_tokens_per_s"] = hf
            base["graph_over_hf"] = round(b1["tokens_per_s"] / hf, 2)
        results.append(r)
        gc.collect()
        torch.cuda.empty_cache()
    import transformers

    doc = {
        "what": "decode/prefill speed: DecodeRunner (Triton kernels + CUDA graphs) vs torch eager and HF generate",
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "copy_bandwidth_TBps": round(copy_bw / 1e12, 3),
        "bf16_gemm_peak_TFLOPs": round(peak / 1e12, 1),
        "models": results,
        "command": "python bench/decode.py" + (" --quick" if args.quick else ""),
    }
    write_result("decode" + ("-quick" if args.quick else ""), gpu_tag(doc["gpu"]), doc)


if __name__ == "__main__":
    main()
