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


def far_stream(device: torch.device | str, near_sms: int, priority: int = 0) -> tuple[torch.cuda.Stream, int] | None:
    """A stream of a green context on the SMs left once the first `near_sms` are split off, and how many those
    are; None where that cannot be made (a CPU, no cuda-bindings, a driver without green contexts).

    Why not confined_stream: torch makes every green context by splitting the whole device and keeping the first
    group, so two of them always share their SMs, the smaller's all inside the larger's (bench/probes/sm_ids.py
    shows which SMs each runs on). Work kept apart from the confined decode graphs, which take the first SMs,
    needs the other end: the driver's split hands back both the first group and the rest; torch keeps only the
    first. This makes the split itself (cuda-bindings, which torch does not need: optional), and a stream of its
    own in the rest's context."""
    dev = torch.device(device)
    if dev.type != "cuda" or near_sms <= 0:
        return None
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    try:
        from cuda.bindings import driver

        def checked(result: tuple[Any, ...]) -> Any:
            if result[0] != driver.CUresult.CUDA_SUCCESS:
                raise RuntimeError(f"{result[0]!r}")
            return result[1] if len(result) == 2 else result[1:]

        cu_dev = checked(driver.cuDeviceGet(index))
        whole = checked(driver.cuDeviceGetDevResource(cu_dev, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
        _first, _groups, rest = checked(driver.cuDevSmResourceSplitByCount(1, whole, 0, near_sms))
        desc = checked(driver.cuDevResourceGenerateDesc([rest], 1))
        flags = driver.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM
        green = checked(driver.cuGreenCtxCreate(desc, cu_dev, flags))
        _KEEP.append(green)  # never destroyed, as confined_stream's (module docstring)
        raw = checked(driver.cuGreenCtxStreamCreate(green, driver.CUstream_flags.CU_STREAM_NON_BLOCKING, priority))
        _KEEP.append(raw)
        stream: torch.cuda.Stream = torch.cuda.get_stream_from_external(int(raw), dev)
        return stream, int(rest.sm.smCount)
    except Exception as e:  # no cuda-bindings, a driver refusing the split or the context
        log.warning("no green context on the far SMs of cuda:%d (%s)", index, e)
        return None


def sm_count(device: torch.device | str) -> int:
    """The GPU's number of SMs (0 for a CPU)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return 0
    return int(torch.cuda.get_device_properties(dev).multi_processor_count)
