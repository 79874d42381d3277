"""Matmul warm-up: every matmul shape an eager step of this model can launch, run once when the engine is built.

Why: the first matmul of a shape the process has not run before makes the host wait for every kernel queued on
the GPU, on any stream (bench/probes/lazy_loading.py on the H100: 40-49 ms behind 40 ms of other work, 0.1 ms
the second time; CUDA_MODULE_LOADING=EAGER does not change it). A prompt step's token count is whatever its
chunk holds, so in the four-model bench new counts kept arriving, and each first one stood the host core still for
an 8B model's step: 7-20 ms token gaps for every model (bench/probes/slow_calls.py, bench/probes/host_trace.py).
Run here, at load, those waits fall before the model serves.

Which shapes: each distinct weight of the decoder layers (its bias too: a matmul with a bias is another kernel)
at every token count an eager step can have (1 .. the scheduler's step budget), and the head at every row count
that samples (1 .. max_batch). Past DENSE_TOKENS, every STRIDE-th count only: a GPU-only cost that grows with
the square of the budget (an 8B model at 512 tokens: ~0.1 s of GPU time). Once per process per shape."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmhost.engine.model import DecoderModel

DENSE_TOKENS = 1024  # token counts warmed one by one up to here...
STRIDE = 16  # ...and every STRIDE-th beyond

_WARMED: set[tuple[str, torch.dtype, int, int, bool, int]] = set()  # (device, dtype, out, in, bias, tokens)


def token_counts(max_tokens: int) -> list[int]:
    """The token counts warmed for a step budget of max_tokens."""
    dense = list(range(1, min(max_tokens, DENSE_TOKENS) + 1))
    return dense + list(range(DENSE_TOKENS + STRIDE, max_tokens + 1, STRIDE))


def warm_matmuls(model: DecoderModel, max_tokens: int, max_rows: int) -> int:
    """Run each eager matmul shape of `model` once (GPU weights only); returns how many ran (0 on a CPU)."""
    jobs: list[tuple[torch.Tensor, torch.Tensor | None, list[int]]] = []
    counts = token_counts(max_tokens)
    for stage in model.placement.stages:
        lw = model.layers[stage.layers[0]]  # every layer of a stage has the same shapes on the same device
        for w, b in ((lw.qkv, lw.qkv_bias), (lw.o, None), (lw.gate_up, None), (lw.down, None)):
            jobs.append((w, b, counts))
    jobs.append((model.lm_head, None, list(range(1, max_rows + 1))))
    ran = 0
    for w, b, ms in jobs:
        if w.device.type != "cuda":
            continue
        x = torch.zeros(max(ms), w.shape[1], dtype=w.dtype, device=w.device)
        for m in ms:
            key = (str(w.device), w.dtype, w.shape[0], w.shape[1], b is not None, m)
            if key in _WARMED:
                continue
            F.linear(x[:m], w, b)
            _WARMED.add(key)
            ran += 1
        del x
    return ran
