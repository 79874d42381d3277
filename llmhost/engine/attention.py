"""Attention over the paged KV cache: the torch reference path (CPU and CUDA). Faster kernels are checked
against it.

Cache layout per layer: k, v: [num_blocks, block_size, kv_heads, head_dim]; a token at position p of a sequence
lives in slot `block_table[p // block_size - first_block] * block_size + p % block_size`, where first_block is 0
in the full pool and the sequence's window_start in the window pool (which drops blocks behind the window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right


@dataclass(frozen=True)
class ChunkMeta:
    q_start: int  # index of the chunk's first token in the flat batch
    q_len: int
    ctx_len: int  # cached tokens gathered for the chunk: positions [ctx_start, ctx_start + ctx_len), itself last
    blocks: torch.Tensor  # [ceil(ctx_len / block_size)] int64 block ids on the cache's device
    ctx_start: int = 0  # position of the first gathered token: a block boundary (> 0 only in the window pool)


@dataclass(frozen=True)
class FlatContext:
    """Every chunk's context in one flat list, for one variable-length attention call over the whole batch
    (kernels/varlen_attention.py): chunk i's queries are rows cu_q[i]:cu_q[i+1] of the batch and its keys the
    cache slots ctx_slots[cu_k[i]:cu_k[i+1]] (positions 0 .. ctx_len - 1 of the full pool, itself last)."""

    cu_q: torch.Tensor  # [chunks + 1] int32
    cu_k: torch.Tensor  # [chunks + 1] int32
    ctx_slots: torch.Tensor  # [sum of ctx_len] int64
    max_q: int
    max_k: int


@dataclass(frozen=True)
class AttentionBatch:
    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V is written
    chunks: tuple[ChunkMeta, ...]
    window: AttentionBatch | None = None  # the same tokens in the window pool (models with sliding layers)
    flat: FlatContext | None = None  # the full pool's contexts flattened, when the step packed them

    def for_pool(self, window_pool: bool) -> AttentionBatch:
        if not window_pool:
            return self
        if self.window is None:
            raise ValueError("a layer reads the window pool but the batch carries no window-pool slots")
        return self.window


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """k, v: [T, kv_heads, head_dim] -> their slots in the cache."""
    kvh, hd = k.shape[1], k.shape[2]
    k_cache.view(-1, kvh, hd).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, kvh, hd).index_copy_(0, slots, v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q: [T, heads, head_dim] -> [T, heads, head_dim]. One chunk at a time: each gathers its context's K/V and
    expands it to every query head (both counted in the workspace estimate), then attends causally, aligned to
    the end of the context; with a `window`, a query at p sees keys (p - window, p] only. `softcap`: scores go
    through cap * tanh(scores / cap) before the softmax (Gemma 2 style; no fused kernel applies).

    The inputs are 4-D and K/V expanded on purpose: with 3-D inputs, or K/V left at kv_heads, CUDA's fused
    (memory-efficient) kernel refuses a lower-right causal mask and SDPA falls back to the math path, which
    materialises heads x q_len x ctx scores (measured on the H100: gigabytes for one prefill chunk)."""
    out = torch.empty_like(q)
    kvh, hd = k_cache.shape[2], k_cache.shape[3]
    groups = q.shape[1] // kvh
    for c in batch.chunks:
        k = _context(k_cache, c, kvh, hd, groups, q.dtype)  # [1, heads, ctx, head_dim]
        v = _context(v_cache, c, kvh, hd, groups, q.dtype)
        qc = q[c.q_start : c.q_start + c.q_len].transpose(0, 1).unsqueeze(0)  # [1, heads, q_len, head_dim]
        mask: CausalBias | torch.Tensor | None = None
        causal = False
        if window is not None and c.ctx_len > window:
            if c.q_len == 1:
                # A decode reads the last `window` keys: a slice, no mask.
                k, v = k[:, :, -window:], v[:, :, -window:]
            else:
                mask = _window_mask(c, window, q.device)
        elif c.q_len > 1 and c.q_len == c.ctx_len and softcap is None:
            # A chunk with no context before it: both causal alignments coincide, and is_causal lets SDPA take
            # its flash kernel (measured faster than the memory-efficient one a mask forces, bench/decode.py).
            causal = True
        elif c.q_len > 1:
            mask = causal_lower_right(c.q_len, c.ctx_len)
        if softcap is None:
            o = F.scaled_dot_product_attention(qc, k, v, attn_mask=mask, scale=scale, is_causal=causal)
        else:
            o = _softcapped(qc, k, v, mask, scale, softcap)
        out[c.q_start : c.q_start + c.q_len] = o[0].transpose(0, 1)
    return out


def _context(cache: torch.Tensor, c: ChunkMeta, kvh: int, hd: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """The chunk's context from one layer's cache: [1, heads, ctx, head_dim], contiguous."""
    x = cache.index_select(0, c.blocks).view(-1, kvh, hd)[: c.ctx_len].transpose(0, 1)  # [kv_heads, ctx, hd]
    return x.repeat_interleave(groups, dim=0).to(dtype).unsqueeze(0)


def _window_mask(c: ChunkMeta, window: int, device: torch.device) -> torch.Tensor:
    """[q_len, ctx_len] bool, True where query p may read key k: p - window < k <= p (transformers' sliding
    window: `kv_idx > q_idx - sliding_window`, on top of causal)."""
    end = c.ctx_start + c.ctx_len
    q_pos = torch.arange(end - c.q_len, end, device=device)[:, None]
    k_pos = torch.arange(c.ctx_start, end, device=device)[None, :]
    return (k_pos <= q_pos) & (k_pos > q_pos - window)


def _softcapped(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: CausalBias | torch.Tensor | None,
    scale: float,
    softcap: float,
) -> torch.Tensor:
    """Eager attention with capped scores, as transformers' eager path computes it (softmax in float32)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [1, heads, q_len, ctx]
    scores = torch.tanh(scores / softcap) * softcap
    if isinstance(mask, CausalBias):
        q_len, ctx = scores.shape[-2], scores.shape[-1]
        mask = torch.ones(q_len, ctx, dtype=torch.bool, device=q.device).tril(ctx - q_len)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)
