"""Fused elementwise kernels for decode steps: each replaces several torch ops (and, inside a CUDA graph,
several kernel launches) with one. Rounding follows the torch reference op by op, so results match HF's order
of rounding: a bf16 add rounds before the norm, the norm's float32 result rounds before the weight multiply.

- add_rms_norm:   residual += x (in place); out = rms_norm(residual) * weight
- rms_norm:       out = rms_norm(x) * weight
- silu_mul:       out = silu(gate) * up, from the fused [T, 2I] gate|up projection
- rope_write_kv:  rotate q and k in place (rotate-half convention) and write k, v into their cache slots
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, n_cols, eps, stride_x, stride_r, stride_o,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # the add rounds, as in torch
        tl.store(res_ptr + row * stride_r + cols, x, mask=ok)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    normed = (xf * tl.math.rsqrt(var + eps)).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, N] -> [T, N]."""
    out = torch.empty_like(x) if out is None else out
    n = x.shape[-1]
    _rms_norm_kernel[(x.shape[0],)](
        x, x, weight, out, n, eps, x.stride(0), x.stride(0), out.stride(0),
        HAS_RESIDUAL=False, BLOCK=triton.next_power_of_2(n),
    )  # fmt: skip
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """residual += x in place; returns rms_norm(residual) * weight. x, residual: [T, N]."""
    out = torch.empty_like(x) if out is None else out
    n = x.shape[-1]
    _rms_norm_kernel[(x.shape[0],)](
        x, residual, weight, out, n, eps, x.stride(0), residual.stride(0), out.stride(0),
        HAS_RESIDUAL=True, BLOCK=triton.next_power_of_2(n),
    )  # fmt: skip
    return out


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, inter, stride_gu, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inter
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + inter + cols, mask=ok, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)  # silu rounds before the multiply
    tl.store(out_ptr + row * stride_o + cols, (s * u).to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up: [T, 2I] -> silu(gate) * up: [T, I]."""
    t, two_i = gate_up.shape
    inter = two_i // 2
    out = torch.empty((t, inter), dtype=gate_up.dtype, device=gate_up.device) if out is None else out
    block = 1024
    _silu_mul_kernel[(t, triton.cdiv(inter, block))](
        gate_up, out, inter, gate_up.stride(0), out.stride(0), BLOCK=block
    )  # fmt: skip
    return out


@triton.jit
def _rope_write_kernel(
    qkv_ptr, pos_ptr, inv_freq_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
    stride_t, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
):  # fmt: skip
    tok = tl.program_id(0)
    head = tl.program_id(1)  # 0..HEADS-1 are q heads, then KV_HEADS k heads (v rides along with k)
    pos = tl.load(pos_ptr + tok).to(tl.float32)
    i = tl.arange(0, HALF)
    freq = pos * tl.load(inv_freq_ptr + i)
    # cos/sin in float32 then rounded to the model dtype, as the reference computes them.
    cos = tl.cos(freq).to(qkv_ptr.dtype.element_ty).to(tl.float32)
    sin = tl.sin(freq).to(qkv_ptr.dtype.element_ty).to(tl.float32)
    base = qkv_ptr + tok * stride_t + head * 2 * HALF
    x1 = tl.load(base + i).to(tl.float32)
    x2 = tl.load(base + HALF + i).to(tl.float32)
    # Each product rounds to the model dtype before the sum, matching x * cos + rotate_half(x) * sin in torch.
    dt = qkv_ptr.dtype.element_ty
    y1 = ((x1 * cos).to(dt).to(tl.float32) - (x2 * sin).to(dt).to(tl.float32)).to(dt)
    y2 = ((x2 * cos).to(dt).to(tl.float32) + (x1 * sin).to(dt).to(tl.float32)).to(dt)
    tl.store(base + i, y1)
    tl.store(base + HALF + i, y2)
    if head >= HEADS:
        kvh = head - HEADS
        slot = tl.load(slot_ptr + tok)
        dst = slot * KV_HEADS * 2 * HALF + kvh * 2 * HALF
        tl.store(k_cache_ptr + dst + i, y1.to(k_cache_ptr.dtype.element_ty))
        tl.store(k_cache_ptr + dst + HALF + i, y2.to(k_cache_ptr.dtype.element_ty))
        vsrc = qkv_ptr + tok * stride_t + (HEADS + KV_HEADS + kvh) * 2 * HALF
        tl.store(v_cache_ptr + dst + i, tl.load(vsrc + i).to(v_cache_ptr.dtype.element_ty))
        tl.store(v_cache_ptr + dst + HALF + i, tl.load(vsrc + HALF + i).to(v_cache_ptr.dtype.element_ty))


def rope_write_kv(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    heads: int,
    kv_heads: int,
) -> None:
    """qkv: [T, (heads + 2 kv_heads) * head_dim], contiguous rows; rotates its q and k parts in place and writes
    k and v to `slots` of one layer's cache ([num_blocks, block_size, kv_heads, head_dim], contiguous)."""
    head_dim = k_cache.shape[-1]
    _rope_write_kernel[(qkv.shape[0], heads + kv_heads)](
        qkv, positions, inv_freq, slots, k_cache, v_cache, qkv.stride(0),
        HEADS=heads, KV_HEADS=kv_heads, HALF=head_dim // 2,
    )  # fmt: skip
