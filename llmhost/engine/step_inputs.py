"""StepInputs: one eager step's per-token metadata (token ids, positions, KV slots, block tables, sampled rows),
built on the host from a StepPlan and packed into one int64 tensor, so each device that runs a stage of the model
receives all of it with one host-to-device copy per step, not one per tensor or per layer.

Packed layout: [ids: T | positions: T | slots: T | window slots: T (windowed models) | rows: R | each chunk's
full-pool blocks | each chunk's window-pool blocks | (flat steps) cu_q, cu_k: chunks + 1 each | every chunk's
context slots]. `to(device)` copies it once and returns views.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from llmhost.engine.attention import AttentionBatch, ChunkMeta, FlatContext
from llmhost.engine.block_manager import blocks_for
from llmhost.engine.scheduler import Chunk


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` copied onto `device` without making the host wait: to a GPU, non-blocking from pinned memory, so
    the copy is queued on the current stream like a kernel. torch's default blocking copy synchronizes the
    current stream (and a non-blocking one from pageable memory may wait too): the host then waits for every
    kernel queued before it, while the GPU is shared with other models' steps (bench/probes/host_trace.py: the
    launch of a step with a 55-token prompt chunk held the host core for 77 ms)."""
    if device.type != "cuda":
        return host.to(device)
    staging = getattr(_STAGING, "pool", None)
    if staging is None:
        staging = _STAGING.pool = PinnedStaging()
    return staging.to_device(host, device)


class PinnedStaging:
    """Pinned host buffers reused for small host-to-device copies (a step's metadata, its sampling settings),
    each free again once the copy queued from it has run. Not `tensor.pin_memory()` per copy: torch's caching
    host allocator keeps a block per power-of-two size and allocates another when every block of the size is
    still being copied from, and a page-locked allocation is one of the calls CUDA orders against every stream of
    the GPU (the programming guide's "implicit synchronization"): the first slice of a prompt step, which stages
    its metadata, took 13-18 ms now and then beside three decoding models where it takes 1-3 ms
    (bench/probes/host_trace.py). Here buffers hold any size up to theirs, so allocations stop after warm-up.
    One per thread (`to_device`): an engine's steps are launched from one thread."""

    MIN_BYTES = 64 * 1024

    def __init__(self) -> None:
        self.buffers: list[tuple[torch.Tensor, torch.cuda.Event]] = []  # uint8 buffers, each with its last copy

    def to_device(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        flat = host.contiguous().view(-1).view(torch.uint8)
        n = flat.numel()
        free = (k for k, (b, ev) in enumerate(self.buffers) if b.numel() >= n and ev.query())  # type: ignore[no-untyped-call]
        k = next(free, None)
        if k is None:
            size = max(self.MIN_BYTES, 1 << max(0, n - 1).bit_length())
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self.buffers.append((torch.empty(size, dtype=torch.uint8, pin_memory=True), event))
            k = len(self.buffers) - 1
        buf, copied = self.buffers[k]
        buf[:n].copy_(flat)
        out = buf[:n].to(device, non_blocking=True)
        # Behind the copy, on the stream it was queued on: the destination GPU's current stream (for a split
        # model's later stage that is not the current device's).
        copied.record(torch.cuda.current_stream(device))
        return out.view(host.dtype).view(host.shape)


_STAGING = threading.local()


@dataclass(frozen=True)
class DeviceStep:
    """The step's metadata on one device (views into one packed tensor)."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    batch: AttentionBatch
    logits_rows: torch.Tensor  # [R] int64: rows of T whose next token is sampled


@dataclass(frozen=True)
class _ChunkLayout:
    q_start: int
    q_len: int
    ctx_len: int
    blocks: tuple[int, int]  # (offset, length) in the packed tensor
    w_ctx_len: int
    w_blocks: tuple[int, int]
    w_ctx_start: int


class StepInputs:
    def __init__(self, chunks: Sequence[Chunk], block_size: int, windowed: bool, flat: bool = False) -> None:
        """windowed: the model has a window pool; its slots and tables are packed too. flat: pack every chunk's
        context slots in one list too (attention.FlatContext), for one attention call over the whole batch."""
        bs = block_size
        self.windowed = windowed
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        w_slots: list[int] = []
        rows: list[int] = []
        blocks: list[list[int]] = []
        w_blocks: list[list[int]] = []
        metas: list[tuple[int, int, int, int, int]] = []  # q_start, q_len, ctx_len, w_ctx_len, w_ctx_start
        for c in chunks:
            q_start = len(ids)
            ids.extend(c.token_ids)
            for p in range(c.start, c.end):
                positions.append(p)
                slots.append(c.block_table[p // bs] * bs + p % bs)
            blocks.append(list(c.block_table[: blocks_for(c.end, bs)]))
            w_len, ctx_start = 0, 0
            if windowed:
                # window_table[j] is logical block window_start + j; the chunk reads from that block's first token.
                first = c.window_start
                w_slots.extend(c.window_table[p // bs - first] * bs + p % bs for p in range(c.start, c.end))
                w_blocks.append(list(c.window_table[: blocks_for(c.end, bs) - first]))
                ctx_start = first * bs
                w_len = c.end - ctx_start
            metas.append((q_start, len(c.token_ids), c.end, w_len, ctx_start))
            if c.sample:
                rows.append(len(ids) - 1)
        t = len(ids)
        packed = ids + positions + slots + w_slots + rows
        self._rows = (len(packed) - len(rows), len(rows))
        self._num_tokens = t
        layouts: list[_ChunkLayout] = []
        for k, (q_start, q_len, ctx_len, w_len, ctx_start) in enumerate(metas):
            b = (len(packed), len(blocks[k]))
            packed += blocks[k]
            wb = (0, 0)
            if windowed:
                wb = (len(packed), len(w_blocks[k]))
                packed += w_blocks[k]
            layouts.append(_ChunkLayout(q_start, q_len, ctx_len, b, w_len, wb, ctx_start))
        self._layouts = tuple(layouts)
        self._flat: tuple[int, int, int, int] | None = None  # offsets of cu_q, cu_k, ctx slots; their total
        self._flat_max = (0, 0)  # longest chunk, longest context
        host = torch.tensor(packed, dtype=torch.int64)  # [packed] on the CPU
        if flat:
            host = torch.cat([host, self._flat_part(chunks, bs, len(packed))])
        self.host = host

    def _flat_part(self, chunks: Sequence[Chunk], bs: int, offset: int) -> torch.Tensor:
        """cu_q, cu_k and the context slots of every chunk (numpy: a step's contexts run to tens of thousands of
        slots, too many for a Python loop per token)."""
        q_lens = np.array([len(c.token_ids) for c in chunks], dtype=np.int64)
        k_lens = np.array([c.end for c in chunks], dtype=np.int64)
        cu_q = np.concatenate([[0], np.cumsum(q_lens)])
        cu_k = np.concatenate([[0], np.cumsum(k_lens)])
        within = np.arange(bs, dtype=np.int64)
        slots = [
            (np.asarray(c.block_table[: blocks_for(c.end, bs)], dtype=np.int64)[:, None] * bs + within).reshape(-1)[
                : c.end
            ]
            for c in chunks
        ]
        n = len(chunks) + 1
        self._flat = (offset, offset + n, offset + 2 * n, int(cu_k[-1]))
        self._flat_max = (int(q_lens.max(initial=0)), int(k_lens.max(initial=0)))
        return torch.from_numpy(np.concatenate([cu_q, cu_k, *slots]))

    def to(self, device: torch.device) -> DeviceStep:
        """One copy of the packed metadata onto `device` (none on the CPU), and views of it."""
        d = to_device(self.host, device)
        t = self._num_tokens

        def part(span: tuple[int, int]) -> torch.Tensor:
            return d[span[0] : span[0] + span[1]]

        full = tuple(ChunkMeta(c.q_start, c.q_len, c.ctx_len, part(c.blocks)) for c in self._layouts)
        window = None
        if self.windowed:
            w_metas = tuple(
                ChunkMeta(c.q_start, c.q_len, c.w_ctx_len, part(c.w_blocks), c.w_ctx_start) for c in self._layouts
            )
            window = AttentionBatch(d[3 * t : 4 * t], w_metas)
        flat = None
        if self._flat is not None:
            q_at, k_at, s_at, total = self._flat
            cu = d[q_at:s_at].to(torch.int32)  # cu_q and cu_k, next to each other: one conversion
            n = k_at - q_at
            flat = FlatContext(cu[:n], cu[n:], d[s_at : s_at + total], *self._flat_max)
        batch = AttentionBatch(d[2 * t : 3 * t], full, window, flat)
        return DeviceStep(d[:t], d[t : 2 * t], batch, part(self._rows))
