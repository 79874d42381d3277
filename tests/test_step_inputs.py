"""StepInputs: the packed metadata of an eager step, and the flat contexts the GPU's one-call attention reads
(kernels/varlen_attention.py; the kernel itself is checked against the reference in bench/kernels_check.py)."""

from __future__ import annotations

import torch

from llmhost.engine.attention import _context
from llmhost.engine.scheduler import Chunk
from llmhost.engine.step_inputs import StepInputs

BS = 4


def chunks() -> list[Chunk]:
    """A prompt chunk after earlier ones (context 3 blocks, partly filled), a fresh prompt, a decode row."""
    return [
        Chunk("a", 6, (11, 12, 13, 14, 15), (7, 2, 9), sample=True),  # positions 6..10: reads 0..10
        Chunk("b", 0, (21, 22, 23), (5,), sample=False),  # positions 0..2
        Chunk("c", 8, (31,), (1, 4, 8), sample=True),  # position 8: reads 0..8
    ]


def test_flat_contexts_gather_what_each_chunk_reads() -> None:
    cs = chunks()
    step = StepInputs(cs, BS, windowed=False, flat=True).to(torch.device("cpu"))
    flat = step.batch.flat
    assert flat is not None
    assert flat.cu_q.dtype == torch.int32 and flat.cu_k.dtype == torch.int32
    assert flat.cu_q.tolist() == [0, 5, 8, 9]
    assert flat.cu_k.tolist() == [0, 11, 14, 23]
    assert (flat.max_q, flat.max_k) == (5, 11)
    # a cache whose every slot holds its own index: the gathered values are the slots themselves
    cache = torch.arange(10 * BS, dtype=torch.float32).view(10, BS, 1, 1)
    flat_keys = cache.view(-1, 1, 1).index_select(0, flat.ctx_slots).view(-1)
    for k, meta in enumerate(step.batch.chunks):
        ref = _context(cache, meta, 1, 1, 1, torch.float32).view(-1)
        assert flat_keys[flat.cu_k[k] : flat.cu_k[k + 1]].tolist() == ref.tolist()
    # chunk a's positions 4..7 live in its second block (2): slots 8..11; position 10 in block 9: slot 38
    assert flat.ctx_slots[4:8].tolist() == [8, 9, 10, 11] and flat.ctx_slots[10].item() == 38


def test_without_flat_nothing_extra_is_packed() -> None:
    plain = StepInputs(chunks(), BS, windowed=False)
    flat = StepInputs(chunks(), BS, windowed=False, flat=True)
    assert plain.to(torch.device("cpu")).batch.flat is None
    assert flat.host.shape[0] == plain.host.shape[0] + 2 * 4 + 23
    assert torch.equal(flat.host[: plain.host.shape[0]], plain.host)
