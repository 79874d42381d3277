"""Streams confined to part of a GPU's SMs (CUDA green contexts), for the decode graphs of a model that would
otherwise take more of the GPU than its share beside another.

Kernels captured into a CUDA graph on such a stream run on the context's SMs whenever the graph replays, whatever
stream replays it; a graph captured on a plain stream and replayed on a confined one ignores the limit (the
14B-shaped model of bench/probes/green_context.py: 93 tok/s on 16 of 132 SMs replayed there, while an eager copy
there fell to 1,188 GB/s of 3,017). So a model is confined by capturing its graphs again on one of these.

Green contexts are never destroyed: one destroyed while the caching allocator still held blocks used on its
stream aborted the process (an event record in a tensor's destructor, cudaErrorContextIsDestroyed). A host makes
a few (one per model and SM count), for its lifetime.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("llmhost.engine")

_KEEP: list[Any] = []  # every green context made: alive to the end of the process (see above)
_UNSUPPORTED: set[int] = set()  # devices where making one failed: not tried again


def confined_stream(device: torch.device | str, num_sms: int) -> torch.cuda.Stream | None:
    """A stream of a new green context of `num_sms` SMs on `device`, or None where green contexts are not
    available (a CPU, a torch or driver without them): the caller then leaves the model unconfined. Each call
    makes its own context and stream: a stream a model captures its GEMMs on keeps its own cuBLAS workspace, and
    two models' graphs sharing one raced on it (decode_runner.py)."""
    dev = torch.device(device)
    if dev.type != "cuda" or num_sms <= 0:
        return None
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index in _UNSUPPORTED:
        return None
    try:
        from torch.cuda import green_contexts

        make: Any = green_contexts.GreenContext.create  # its signature moved between torch releases
        try:
            ctx: Any = make(num_sms=num_sms, device_id=index)
        except TypeError:  # releases before keyword arguments
            ctx = make(num_sms, index)
        _KEEP.append(ctx)
        if hasattr(ctx, "Stream"):
            stream: torch.cuda.Stream = ctx.Stream()
            return stream
        ctx.set_context()  # older torch: a stream made while the green context is current belongs to it
        try:
            return torch.cuda.Stream(dev)  # type: ignore[no-untyped-call]
        finally:
            ctx.pop_context()
    except Exception as e:  # ImportError, a driver without green contexts, an SM count it refuses
        _UNSUPPORTED.add(index)
        log.warning("no green contexts on cuda:%d (%s): models there are not confined to part of its SMs", index, e)
        return None


def sm_count(device: torch.device | str) -> int:
    """The GPU's number of SMs (0 for a CPU)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return 0
    return int(torch.cuda.get_device_properties(dev).multi_processor_count)
