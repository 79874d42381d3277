"""Probe: which SMs a stream's kernels run on, and what a prompt-like GEMM beside decode-like work costs it on
shared and on separate SMs.

1. SM ids: a Triton kernel of many small programs records the SM each ran on (%smid), on the default stream, on
   torch green contexts (engine/sm_partition.confined_stream: 40, a second 40, 88 SMs) and on streams at the far
   end of the GPU (sm_partition.far_stream). Expected, if torch always keeps the first group of its split: the
   two 40s run on the same SMs and inside the 88's; the far streams on none of them.
2. Interference: decode-like work (eight-row matmuls over 2 GB of weights, memory-bound like a batch-8 decode
   step) timed alone and beside a prompt-like GEMM loop (512 x 4096 x 14336, compute-bound) on another stream,
   with the GEMM on the whole GPU, on torch's first 44 SMs or on the far 44; and the decode-like work itself
   confined to the first 88 SMs (a steered 8B) beside the GEMM on the first 44 (shared SMs) or the far 44.

Usage: python bench/probes/sm_ids.py; writes bench/results/sm_ids-<gpu>.json."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import gpu_tag, write_result

from llmhost.engine.sm_partition import confined_stream, far_stream, sm_count
from llmhost.host.sm_steering import near_sms

DEV = torch.device("cuda")
LANES = 32  # a program's width; each lane reads %smid, lane 0's is kept


def smid_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(out_ptr, LANES: tl.constexpr):  # type: ignore[no-untyped-def]
        lanes = tl.arange(0, LANES)
        ids = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [lanes], dtype=tl.int32, is_pure=False, pack=1)
        tl.store(out_ptr + tl.program_id(0) * LANES + lanes, ids)

    return kernel


def sm_ids(kernel: Any, stream: torch.cuda.Stream | None, programs: int) -> list[int]:
    out = torch.full((programs, LANES), -1, dtype=torch.int32, device=DEV)
    with torch.cuda.stream(stream or torch.cuda.current_stream()):
        for _ in range(3):  # the first launch compiles; later ones spread as the block scheduler places them
            kernel[(programs,)](out, LANES=LANES)
    torch.cuda.synchronize()
    return sorted({int(x) for x in out[:, 0].tolist()})


def describe(ids: list[int]) -> dict[str, Any]:
    return {"count": len(ids), "min": min(ids), "max": max(ids), "ids": ids} if ids else {"count": 0}


class Loads:
    """Decode-like and prompt-like work, on given streams."""

    def __init__(self) -> None:
        # 16 matrices of 4096 x 14336 bf16 (117 MB each, 1.9 GB together: far past L2)
        self.weights = [torch.randn(4096, 14336, device=DEV, dtype=torch.bfloat16) for _ in range(16)]
        self.rows = torch.randn(8, 4096, device=DEV, dtype=torch.bfloat16)
        self.a = torch.randn(512, 4096, device=DEV, dtype=torch.bfloat16)
        self.b = torch.randn(4096, 14336, device=DEV, dtype=torch.bfloat16)
        self.bytes_per_pass = sum(w.numel() * w.element_size() for w in self.weights)

    def decode_like(self, stream: torch.cuda.Stream, passes: int) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record()
            for _ in range(passes):
                for w in self.weights:
                    self.rows @ w
            end.record()
        return start, end

    def prompt_like(self, stream: torch.cuda.Stream, reps: int) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record()
            for _ in range(reps):
                self.a @ self.b
            end.record()
        return start, end

    def run(self, decode: torch.cuda.Stream, prompt: torch.cuda.Stream | None) -> dict[str, Any]:
        """Decode-like passes timed on `decode`, with (when `prompt` is given) a GEMM loop running on `prompt`
        from before they start to after they end."""
        self.decode_like(decode, 2)  # warm (cuBLAS picks its kernels for this stream's SMs)
        if prompt is not None:
            self.prompt_like(prompt, 5)
        torch.cuda.synchronize()
        g = self.prompt_like(prompt, 1500) if prompt is not None else None
        d = self.decode_like(decode, 20)
        torch.cuda.synchronize()
        d_ms = d[0].elapsed_time(d[1])
        out: dict[str, Any] = {"decode_GBps": round(20 * self.bytes_per_pass / d_ms / 1e6, 1)}
        if g is not None:
            g_ms = g[0].elapsed_time(g[1])
            flops = 2 * 512 * 4096 * 14336 * 1500
            out["gemm_TFLOPs"] = round(flops / g_ms / 1e9, 1)
            out["gemm_outlasted_decode"] = g[0].elapsed_time(d[1]) < g_ms  # decode's end before the GEMMs' end
        return out


def main() -> None:
    total = sm_count(DEV)
    doc: dict[str, Any] = {"bench": "bench/probes/sm_ids.py", "gpu": torch.cuda.get_device_name(), "sms": total}
    streams: dict[str, torch.cuda.Stream | None] = {"default stream": None}
    for label, sms in (("torch green context 40", 40), ("second torch green context 40", 40),
                       ("torch green context 88", 88), ("torch green context 44", 44)):  # fmt: skip
        streams[label] = confined_stream(DEV, sms)
    for far in (44, 28):
        made = far_stream(DEV, near_sms(total, far))
        streams[f"far stream {far}"] = made[0] if made else None
        doc[f"far stream {far} SMs given"] = made[1] if made else None
    kernel = smid_kernel()
    ids: dict[str, list[int]] = {}
    for label, st in streams.items():
        if label != "default stream" and st is None:
            doc[label] = "not made"
            continue
        ids[label] = sm_ids(kernel, st, 64 * total)
        doc[label] = describe(ids[label])
    if "torch green context 40" in ids and "second torch green context 40" in ids:
        doc["two torch 40s on the same SMs"] = ids["torch green context 40"] == ids["second torch green context 40"]
    for far in (44, 28):
        key = f"far stream {far}"
        if key in ids and "torch green context 88" in ids:
            doc[f"{key} SMs shared with torch's 88"] = len(set(ids[key]) & set(ids["torch green context 88"]))

    loads = Loads()
    plain = torch.cuda.Stream(DEV, priority=-1)  # type: ignore[no-untyped-call]
    gemm_plain = torch.cuda.Stream(DEV)  # type: ignore[no-untyped-call]
    first44, far44 = streams.get("torch green context 44"), streams.get("far stream 44")
    first88 = confined_stream(DEV, 88)
    cases: dict[str, tuple[torch.cuda.Stream | None, torch.cuda.Stream | None]] = {
        "decode alone (whole GPU)": (plain, None),
        "decode beside GEMM on the whole GPU": (plain, gemm_plain),
        "decode beside GEMM on the first 44 SMs": (plain, first44),
        "decode beside GEMM on the far 44 SMs": (plain, far44),
        "decode on the first 88 alone": (first88, None),
        "decode on the first 88 beside GEMM on the first 44 (shared SMs)": (first88, first44),
        "decode on the first 88 beside GEMM on the far 44 (separate SMs)": (first88, far44),
    }
    interference: dict[str, Any] = {}
    for label, (dec, gemm) in cases.items():
        if dec is None or (gemm is None and "beside" in label):
            interference[label] = "a stream could not be made"
            continue
        interference[label] = loads.run(dec, gemm)
    doc["interference"] = interference
    write_result("sm_ids", gpu_tag(torch.cuda.get_device_name()), doc)


if __name__ == "__main__":
    main()
