"""HostCopy: a resident engine's weights in pinned host RAM, so the engine can give its device memory back (park)
and take it again at PCIe speed (unpark).

Parking frees every device allocation the engine holds: weight storages (copied out first), the KV pools and the
decode runner with its CUDA graphs (their contents need no copy: a model is parked only with no sequence in
flight). The tensors keep their Python objects, shapes and views; only their storages shrink to zero bytes and grow
back, at new addresses. CUDA graphs recorded the old addresses, so the runner is rebuilt on unpark and captures
each batch size the first time it is used (DecodeRunner capture_on_demand), not all of them before the first step.

The host copy is kept after an unpark: weights never change, so parking the same model again needs no copy at all
(the coordinator accounts the copy against the park budget for as long as it exists).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import torch

from llmhost.engine.engine import Engine


@dataclass
class HostCopy:
    host: torch.Tensor  # [bytes] uint8, page-locked (registered with the driver) when the engine is on a GPU
    offsets: list[tuple[torch.UntypedStorage, int, int]]  # (device storage, offset in host, bytes)
    registered: bool = False  # host is registered with cudaHostRegister: release() must unregister it

    @property
    def nbytes(self) -> int:
        return self.host.numel()

    def release(self) -> None:
        """Unpin the host memory (it is freed when the last reference goes). Call before dropping the copy."""
        if self.registered:
            self.registered = False
            rt = torch.cuda.cudart()  # type: ignore[no-untyped-call]
            _check(rt.cudaHostUnregister(self.host.data_ptr()), "cudaHostUnregister")

    def __del__(self) -> None:
        # A copy dropped without release() must not leave its pages registered after they are freed.
        with contextlib.suppress(Exception):
            self.release()


def pinned_empty(nbytes: int) -> torch.Tensor:
    """Exactly `nbytes` of page-locked host memory, registered with the driver (cudaHostRegister); unregister it
    with cudaHostUnregister before it is freed (HostCopy.release).

    Fixed: host copies were allocated with pin_memory=True, but torch's pinned allocator rounds every allocation
    up to a power of two (a 27.5 GiB Qwen2.5-14B copy pinned 32 GiB, beyond what the park budget counts) and
    keeps freed blocks pinned in its cache, so dropping a host copy gave no RAM back."""
    host = torch.empty(nbytes, dtype=torch.uint8)
    rt = torch.cuda.cudart()  # type: ignore[no-untyped-call]
    _check(rt.cudaHostRegister(host.data_ptr(), nbytes, 0), "cudaHostRegister")
    return host


def _check(err: Any, call: str) -> None:
    """err: torch.cuda.cudart()'s cudaError (0: success)."""
    if int(err) != 0:
        raise RuntimeError(f"{call} failed with CUDA error {int(err)}")


def _weight_storages(engine: Engine) -> list[torch.UntypedStorage]:
    """Each weight storage once (tensors may be views of one allocation; a tied head is the embedding)."""
    seen: dict[int, torch.UntypedStorage] = {}
    for t in engine.model.tensors():
        st = t.untyped_storage()
        seen.setdefault(st.data_ptr(), st)
    return list(seen.values())


def _scratch_storages(engine: Engine) -> list[torch.UntypedStorage]:
    """Device storages whose contents need not survive a park: the KV pools of every stage."""
    return [t.untyped_storage() for c in engine.caches for t in (c.full_storage, c.window_storage)]


def _flat(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def park(engine: Engine, copy: HostCopy | None) -> HostCopy:
    """Free the engine's device memory, copying its weights to host RAM first unless `copy` already holds them.
    Returns the host copy (the same object when one was given). The engine must have no sequence in flight."""
    if engine.seqs:
        raise RuntimeError(f"cannot park a model with {len(engine.seqs)} sequences in flight")
    storages = _weight_storages(engine)
    on_gpu = engine.device.type == "cuda"
    if copy is None:
        total = sum(st.nbytes() for st in storages)
        host = pinned_empty(total) if on_gpu else torch.empty(total, dtype=torch.uint8)
        offsets = []
        off = 0
        for st in storages:
            n = st.nbytes()
            host[off : off + n].copy_(_flat(st), non_blocking=True)
            offsets.append((st, off, n))
            off += n
        copy = HostCopy(host, offsets, registered=on_gpu)
        if on_gpu:
            torch.cuda.synchronize(engine.device)  # the copies must land before the storages are freed
    engine.runner = None  # drops the graphs, their pool and the static buffers
    for st in storages:
        st.resize_(0)
    for st in _scratch_storages(engine):
        st.resize_(0)
    engine.blocks.forget_cached()  # the KV they held is gone
    _collect(engine)
    return copy


def unpark(engine: Engine, copy: HostCopy, kv_bytes: list[int]) -> float:
    """Give the engine its device memory back and copy the weights in; returns the copy's seconds (host to device,
    measured to the last byte). `kv_bytes`: kv_pool_bytes(engine) before the park."""
    on_gpu = engine.device.type == "cuda"
    for st, _, n in copy.offsets:
        st.resize_(n)
    for st, n in zip(_scratch_storages(engine), kv_bytes, strict=True):
        st.resize_(n)
    if on_gpu:
        torch.cuda.synchronize(engine.device)
    t0 = time.perf_counter()
    for st, off, n in copy.offsets:
        _flat(st).copy_(copy.host[off : off + n], non_blocking=True)
    if on_gpu:
        torch.cuda.synchronize(engine.device)
    seconds = time.perf_counter() - t0
    if engine.config.cuda_graphs and on_gpu and engine.graphs_wanted:
        from llmhost.engine.decode_runner import DecodeRunner

        engine.runner = DecodeRunner(
            engine.model,  # type: ignore[arg-type]
            engine.cache,
            engine.config.max_batch,
            engine.config.max_seq_len,
            capture_on_demand=True,
            prompt_tokens=engine.config.prompt_rows,
        )
    return seconds


def kv_pool_bytes(engine: Engine) -> list[int]:
    """Each KV pool's bytes, as unpark must allocate them again."""
    return [st.nbytes() for st in _scratch_storages(engine)]


def _collect(engine: Engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()
