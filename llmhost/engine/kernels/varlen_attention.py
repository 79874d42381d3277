"""Attention over the paged KV cache for a whole eager step in one call: every chunk's context is gathered from
the cache into one flat K and V (two index_selects per layer) and FlashAttention's variable-length kernel attends
each chunk's queries to its own context, causally aligned to the context's end (a prompt chunk after earlier ones,
or a decode row, sees everything before it).

Why: the reference path (attention.paged_attention) runs about fifteen operations per chunk and layer; a step with
eight prompts on a 28-layer model launched thousands of kernels, which held the host core for 20-70 ms per step
while other models waited on it, and once the GPU's launch queue filled, the host blocked until the GPU drained it
(bench/probes/launch_syncs.py, bench/probes/host_trace.py). GPU only; checked against the reference in
bench/kernels_check.py.
"""

from __future__ import annotations

import torch

from llmhost.engine.attention import FlatContext

FLASH_DTYPES = (torch.float16, torch.bfloat16)


def varlen_ok(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether FlashAttention takes this layer: a GPU, 16-bit queries and cache of the same dtype, a head size it
    compiles (a multiple of 8, at most 256)."""
    hd = q.shape[-1]
    return q.is_cuda and q.dtype in FLASH_DTYPES and k_cache.dtype == q.dtype and hd % 8 == 0 and hd <= 256


def varlen_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, flat: FlatContext, scale: float
) -> torch.Tensor:
    """q: [T, heads, head_dim] (the step's tokens, chunk after chunk); caches [blocks, block_size, kv_heads,
    head_dim] (the new tokens already written). Returns [T, heads, head_dim]. Grouped-query heads are native to
    the kernel: K/V stay at kv_heads."""
    kvh, hd = k_cache.shape[2], k_cache.shape[3]
    k = k_cache.view(-1, kvh, hd).index_select(0, flat.ctx_slots)
    v = v_cache.view(-1, kvh, hd).index_select(0, flat.ctx_slots)
    out: torch.Tensor = torch.ops.aten._flash_attention_forward(
        q, k, v, flat.cu_q, flat.cu_k, flat.max_q, flat.max_k, 0.0, True, False, scale=scale
    )[0]
    return out
