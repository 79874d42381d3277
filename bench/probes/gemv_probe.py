# ruff: noqa: B023, F821
"""Probe: can a Triton GEMV/skinny GEMM beat cuBLAS on decode-shaped matmuls, and where does a decode step's time
go? Prints JSON lines; writes $OUT/gemv_probe.json when OUT is set.

1. per projection shape of Llama-3-8B (and Mistral's head), M = 1, 8, 64: cuBLAS vs a sweep of Triton configs, each
   timed as a CUDA graph over 32 layers' distinct weights (so nothing stays in the 50 MB L2);
2. the decode step: graph replay time, and eager per-kernel GPU time grouped by kind, at batch 1 and 64.
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import triton
import triton.language as tl

torch.set_grad_enabled(False)
RESULTS: dict = {}


@triton.jit
def gemv1(x_ptr, w_ptr, y_ptr, N, K, BN: tl.constexpr, BK: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    nmask = rn < N
    acc = tl.zeros((BN, BK), tl.float32)
    for k0 in range(0, K, BK):
        w = tl.load(w_ptr + rn[:, None] * K + (k0 + rk)[None, :], mask=nmask[:, None], other=0.0)
        x = tl.load(x_ptr + k0 + rk)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(y_ptr + rn, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def gemm_skinny(x_ptr, w_ptr, y_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    nmask = rn < N
    mmask = rm < M
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        x = tl.load(x_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=mmask[:, None], other=0.0)
        w = tl.load(w_ptr + rn[:, None] * K + (k0 + rk)[None, :], mask=nmask[:, None], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(
        y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :]
    )


def graph_time(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.graph(g, stream=s):
        fn()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def copy_bw():
    src = torch.empty(2 * 1024**3, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    t = graph_time(lambda: dst.copy_(src))
    del src, dst
    return 2 * 4 * 1024**3 / t


def main():
    bw = copy_bw()
    RESULTS["copy_TBps"] = bw / 1e12
    print("copy", bw / 1e12, flush=True)
    L = 32
    shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
    heads = {"head128k": (128256, 4096), "head32k": (32000, 4096)}
    per = {}
    for name, (n, k) in list(shapes.items()) + list(heads.items()):
        layers = L if name in shapes else 4
        ws = [torch.empty(n, k, dtype=torch.bfloat16, device="cuda").normal_(0, 0.02) for _ in range(layers)]
        for m in (1, 8, 64):
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
            ref = x.float() @ ws[0].float().t()
            nbytes = layers * n * k * 2
            t_cublas = graph_time(lambda: [torch.matmul(x, w.t(), out=y) for w in ws])
            row = {"shape": name, "M": m, "cublas_TBps": nbytes / t_cublas / 1e12, "configs": []}
            if m == 1:
                cfgs = [
                    dict(BN=bn, BK=bk, num_warps=nw, num_stages=st)
                    for bn in (8, 16, 32)
                    for bk in (256, 512)
                    for nw in (4, 8)
                    for st in (2, 4)
                ]
            elif m == 8:
                cfgs = [
                    dict(BM=16, BN=bn, BK=bk, num_warps=nw, num_stages=st)
                    for bn in (32, 64)
                    for bk in (128, 256)
                    for nw in (4,)
                    for st in (3, 5)
                ]
            else:
                cfgs = [
                    dict(BM=64, BN=bn, BK=bk, num_warps=nw, num_stages=st)
                    for bn in (64, 128)
                    for bk in (64, 128)
                    for nw in (4, 8)
                    for st in (3, 4)
                ]
            best = None
            for c in cfgs:
                c = dict(c)
                bn = c["BN"]
                grid = (triton.cdiv(n, bn),)
                try:
                    if m == 1:
                        fn = lambda: [gemv1[grid](x, w, y, n, k, **c) for w in ws]  # noqa: E731
                    else:
                        fn = lambda: [gemm_skinny[grid](x, w, y, m, n, k, **c) for w in ws]  # noqa: E731
                    y.fill_(float("nan"))
                    fn()
                    torch.cuda.synchronize()
                    # y holds the last layer's product; check against it
                    err = (
                        (y.float() - x.float() @ ws[-1].float().t()).norm() / (x.float() @ ws[-1].float().t()).norm()
                    ).item()
                    t = graph_time(fn)
                except Exception as e:
                    row["configs"].append({**c, "error": str(e)[:100]})
                    continue
                tb = nbytes / t / 1e12
                row["configs"].append({**c, "TBps": round(tb, 3), "err": err})
                if best is None or tb > best[0]:
                    best = (tb, c, err)
            row["triton_best"] = best
            del ref
            print(json.dumps({k2: v for k2, v in row.items() if k2 != "configs"}), flush=True)
            per[(name, m)] = row
        del ws
        torch.cuda.empty_cache()
    RESULTS["gemm"] = [r for r in per.values()]

    # decode step breakdown
    from decode import decode_rows, random_model
    from shapes import SHAPES
    from torch.profiler import ProfilerActivity, profile

    from llmhost.engine.decode_runner import DecodeRunner
    from llmhost.engine.kv_cache import KVCache

    shape = SHAPES["llama-3-8b"]
    model = random_model(shape, 2112)
    cache = KVCache(shape, 64 * 14 + 1, 16, torch.bfloat16, torch.device("cuda"))
    runner = DecodeRunner(model, cache, 64, 200)
    runner.capture()
    step = {}
    for b in (1, 64):
        rows = decode_rows(b, 128, 16, 0)
        runner.run(rows)
        g = runner.graphs[b]
        torch.cuda.synchronize()
        a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(20):
            g.replay()
        e.record()
        e.synchronize()
        replay = a.elapsed_time(e) / 20
        t0 = time.perf_counter()
        for _ in range(20):
            runner.run(rows).argmax(-1).tolist()
        wall = (time.perf_counter() - t0) / 20 * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            runner._forward(b)
            torch.cuda.synchronize()
        groups: dict = {}
        for ev in prof.key_averages():
            nm = ev.key
            kind = (
                "gemm"
                if any(s in nm.lower() for s in ("gemm", "gemv", "sm90", "cutlass", "xmma", "splitk"))
                else nm[:40]
            )
            groups[kind] = groups.get(kind, 0.0) + ev.device_time_total / 1e3
        step[b] = {
            "replay_ms": replay,
            "wall_with_argmax_ms": wall,
            "eager_kernel_ms": {k: round(v, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        }
        print(b, json.dumps(step[b]), flush=True)
    RESULTS["step"] = step
    out = os.environ.get("OUT")
    if out:
        Path(out, "gemv_probe.json").write_text(json.dumps(RESULTS, indent=1, default=str))


if __name__ == "__main__":
    main()
