"""Decode-shaped matmuls: y[M, N] = x[M, K] @ w[N, K]^T for the few rows of a decode step.

A decode step reads every weight once for a handful of rows, so its matmuls are bound by memory bandwidth, not
arithmetic. cuBLAS picks tiles for square-ish problems; at M = 1 its kernels read the H100's memory at 2.1-2.9
TB/s depending on the shape, a Triton GEMV with narrow output tiles and long K tiles at 2.5-3.1 TB/s
(bench/probes/gemv_probe.py: qkv 2.29 -> 2.66, o 2.10 -> 2.46, gate_up 2.86 -> 3.00, down 2.65 -> 2.84, a 128k
vocabulary head 2.82 -> 3.11). Up to 16 rows a tensor-core tile of 16 rows does the same; beyond that cuBLAS wins
on narrow outputs and this kernel only on wide ones (the gate/up projection, the head), where it has enough
tiles to fill the GPU.

- gemv:   M = 1, elementwise products accumulated in a [BN, BK] float32 tile, one reduction at the end;
- skinny: 1 < M <= 64, tl.dot of a BM-row tile of x against BN rows of w.

K is a compile-time constant (a model has three or four), so the loop bound is known to the compiler (and
Triton's CPU interpreter, which the tests use, cannot loop to a runtime bound). Accumulation is float32 in both,
as cuBLAS's; only the order of the sums differs (bench/kernels_check.py compares against torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_SMS_FILLED = 200  # output tiles a wide-row launch needs to beat cuBLAS (1.5 waves on the H100's 132 SMs)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, y_ptr, N, stride_w, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr
):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    n_ok = rn < N
    acc = tl.zeros((BN, BK), tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + rk
        if EVEN_K:
            w = tl.load(w_ptr + rn[:, None] * stride_w + k[None, :], mask=n_ok[:, None], other=0.0)
            x = tl.load(x_ptr + k)
        else:
            k_ok = k < K
            w = tl.load(w_ptr + rn[:, None] * stride_w + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_ptr + k, mask=k_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    # Rounded to the inputs' dtype first, as torch's bf16 product is, even when the output is float32 logits.
    y = tl.sum(acc, axis=1).to(x_ptr.dtype.element_ty)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _skinny_kernel(
    x_ptr, w_ptr, y_ptr, M, N, stride_x, stride_w, stride_y,
    K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    n_ok = rn < N
    m_ok = rm < M
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + rk
        if EVEN_K:
            x = tl.load(x_ptr + rm[:, None] * stride_x + k[None, :], mask=m_ok[:, None], other=0.0)
            w = tl.load(w_ptr + rn[:, None] * stride_w + k[None, :], mask=n_ok[:, None], other=0.0)
        else:
            k_ok = k < K
            x = tl.load(x_ptr + rm[:, None] * stride_x + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + rn[:, None] * stride_w + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    mask = m_ok[:, None] & n_ok[None, :]
    y = acc.to(x_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], y, mask=mask)


def uses_triton(m: int, n: int) -> bool:
    """Whether `linear` runs its own kernel for an [m, K] x [n, K]^T product (else cuBLAS)."""
    return m <= 16 or (m <= 64 and triton.cdiv(n, 128) >= _SMS_FILLED)


def linear(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K], w: [N, K] (rows contiguous) -> x @ w^T: [M, N] in x's dtype, into `out` when given (which may
    be float32: the product still rounds to x's dtype first, as the reference's bf16 product then .float())."""
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    if not uses_triton(m, n) or x.stride(1) != 1 or w.stride(1) != 1 or out.stride(1) != 1:
        if out.dtype == x.dtype:
            return torch.matmul(x, w.t(), out=out)
        return out.copy_(torch.matmul(x, w.t()))
    if m == 1:
        bk = 512
        # Eight output rows per program: 512-1024 programs for these shapes, several per SM in flight.
        bn = 16 if n >= 65536 else 8
        warps, stages = (8, 2) if n >= 65536 or n <= 4096 else (4, 4)
        _gemv_kernel[(triton.cdiv(n, bn),)](
            x, w, out, n, w.stride(0), K=k, BN=bn, BK=bk, EVEN_K=k % bk == 0, num_warps=warps, num_stages=stages
        )
        return out
    if m <= 16:
        bm, bn, bk, stages = (16, 32, 256, 5) if n <= 8192 else (16, 64, 256, 3)
    else:
        bm, bn, bk, stages = (64, 128, 128, 3)
    _skinny_kernel[(triton.cdiv(n, bn),)](
        x, w, out, m, n, x.stride(0), w.stride(0), out.stride(0),
        K=k, BM=bm, BN=bn, BK=bk, EVEN_K=k % bk == 0, num_warps=4, num_stages=stages,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # float32 models keep float32 products
    )  # fmt: skip
    return out
