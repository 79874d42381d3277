"""Attention over the paged KV cache: the torch reference path (CPU and CUDA). Faster kernels are checked
against it.

Cache layout per layer: k, v: [num_blocks, block_size, kv_heads, head_dim]; a token at position p of a sequence
lives in slot `block_table[p // block_size] * block_size + p % block_size`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


@dataclass(frozen=True)
class ChunkMeta:
    q_start: int  # index of the chunk's first token in the flat batch
    q_len: int
    ctx_len: int  # tokens the chunk attends to: everything before it plus itself
    blocks: torch.Tensor  # [ceil(ctx_len / block_size)] int64 block ids on the cache's device


@dataclass(frozen=True)
class AttentionBatch:
    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V is written
    chunks: tuple[ChunkMeta, ...]


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """k, v: [T, kv_heads, head_dim] -> their slots in the cache."""
    kvh, hd = k.shape[1], k.shape[2]
    k_cache.view(-1, kvh, hd).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, kvh, hd).index_copy_(0, slots, v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch, scale: float
) -> torch.Tensor:
    """q: [T, heads, head_dim] -> [T, heads, head_dim]. One chunk at a time: each gathers its context's K/V and
    expands it to every query head (both counted in the workspace estimate), then attends causally, aligned to
    the end of the context.

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
        mask = causal_lower_right(c.q_len, c.ctx_len) if c.q_len > 1 else None
        o = F.scaled_dot_product_attention(qc, k, v, attn_mask=mask, scale=scale)
        out[c.q_start : c.q_start + c.q_len] = o[0].transpose(0, 1)
    return out


def _context(cache: torch.Tensor, c: ChunkMeta, kvh: int, hd: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """The chunk's context from one layer's cache: [1, heads, ctx, head_dim], contiguous."""
    x = cache.index_select(0, c.blocks).view(-1, kvh, hd)[: c.ctx_len].transpose(0, 1)  # [kv_heads, ctx, hd]
    return x.repeat_interleave(groups, dim=0).to(dtype).unsqueeze(0)
