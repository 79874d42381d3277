"""Paged decode attention: one query token per sequence, reading K/V in place from the paged cache.

Split-K ("flash decoding"): each program takes one (sequence, kv head, context partition) and its whole group of
query heads (GQA), runs an online softmax over the partition's tokens, and writes a partial result; a second
kernel merges the partitions. The grid depends only on the batch size and max_seq_len, never on the lengths, so
a CUDA graph can capture it: lengths and block tables are read from device memory.

Shapes: q [B, H, D]; k_cache, v_cache [num_blocks, block_size, KVH, D]; block_tables [B, max_blocks] int32;
context_lens [B] int32 -> out [B, H, D].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PARTITION = 256  # context tokens per program: small enough that long contexts fill the GPU with programs
TILE = 64  # tokens per loop iteration, gathered across blocks: several loads in flight hide memory latency


@triton.jit
def _partial_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, m_ptr, l_ptr, acc_ptr,
    scale,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_tb,
    max_parts,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, PART: tl.constexpr, TILE_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    ctx = tl.load(lens_ptr + seq)
    start = part * PART
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    g_ok = g < GROUP
    heads = kvh * GROUP + g
    out_idx = (seq * tl.num_programs(1) * GROUP + heads) * max_parts + part  # [GROUP_PAD]
    if start >= ctx:
        # An empty partition still writes a neutral partial, so the merge needs no length logic.
        tl.store(m_ptr + out_idx, tl.full([GROUP_PAD], float("-inf"), tl.float32), mask=g_ok)
        tl.store(l_ptr + out_idx, tl.zeros([GROUP_PAD], tl.float32), mask=g_ok)
        return
    q_off = seq * stride_qb + heads[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=g_ok[:, None], other=0.0)  # [GROUP_PAD, HEAD_DIM]
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    t = tl.arange(0, TILE_N)
    # A fixed trip count (PART / TILE_N, small) keeps the loop static; tiles past the context are masked, and a
    # masked load moves no memory.
    for i in range(0, PART // TILE_N):
        pos = start + i * TILE_N + t  # [TILE_N] token positions
        tok_ok = pos < ctx
        block = tl.load(tables_ptr + seq * stride_tb + pos // BLOCK_SIZE, mask=tok_ok, other=0)
        kv_off = block[:, None] * stride_kb + (pos % BLOCK_SIZE)[:, None] * stride_ks + kvh * stride_kh + d[None, :]
        k = tl.load(k_ptr + kv_off, mask=tok_ok[:, None], other=0.0)  # [TILE_N, HEAD_DIM]
        v = tl.load(v_ptr + kv_off, mask=tok_ok[:, None], other=0.0)
        # Tensor cores with float32 accumulation for bf16/fp16; exact float32 ("ieee") when the cache is float32.
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, TILE_N]
        s = tl.where(tok_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    tl.store(m_ptr + out_idx, m_i, mask=g_ok)
    tl.store(l_ptr + out_idx, l_i, mask=g_ok)
    tl.store(acc_ptr + out_idx[:, None] * HEAD_DIM + d[None, :], acc, mask=g_ok[:, None])


@triton.jit
def _merge_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr, lens_ptr,
    stride_ob, stride_oh,
    max_parts,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PARTS_PAD: tl.constexpr, PART: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    h = tl.program_id(1)
    n_parts = tl.cdiv(tl.load(lens_ptr + seq), PART)
    p = tl.arange(0, PARTS_PAD)
    p_ok = p < n_parts
    base = (seq * HEADS + h) * max_parts
    m = tl.load(m_ptr + base + p, mask=p_ok, other=float("-inf"))
    l_part = tl.load(l_ptr + base + p, mask=p_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(p_ok, tl.exp(m - m_max), 0.0)
    d = tl.arange(0, HEAD_DIM)
    acc = tl.load(acc_ptr + (base + p)[:, None] * HEAD_DIM + d[None, :], mask=p_ok[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_part * w, axis=0)
    tl.store(out_ptr + seq * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


class DecodeWorkspace:
    """Partial-result buffers sized for (max_batch, heads, max_seq_len): allocated once, so graph replays
    reuse them. Bytes: max_batch x heads x parts x (2 + head_dim) x 4."""

    def __init__(self, max_batch: int, heads: int, head_dim: int, max_seq_len: int, device: torch.device) -> None:
        self.max_parts = triton.cdiv(max_seq_len, PARTITION)
        shape = (max_batch, heads, self.max_parts)
        self.m = torch.empty(shape, dtype=torch.float32, device=device)
        self.l = torch.empty(shape, dtype=torch.float32, device=device)
        self.acc = torch.empty((*shape, head_dim), dtype=torch.float32, device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.m, self.l, self.acc))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    ws: DecodeWorkspace,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    b, heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    out = torch.empty_like(q) if out is None else out
    _partial_kernel[(b, kv_heads, ws.max_parts)](
        q, k_cache, v_cache, block_tables, context_lens, ws.m, ws.l, ws.acc,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        ws.max_parts,
        # tl.dot needs at least 16 rows: the group of query heads is padded (masked rows cost no memory traffic).
        GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 16), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, PART=PARTITION, TILE_N=TILE,
        PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    _merge_kernel[(b, heads)](
        ws.m, ws.l, ws.acc, out, context_lens,
        out.stride(0), out.stride(1),
        ws.max_parts,
        HEADS=heads, HEAD_DIM=head_dim, PARTS_PAD=max(triton.next_power_of_2(ws.max_parts), 1), PART=PARTITION,
    )  # fmt: skip
    return out
