"""Probe: where the ~2.6% that decode loses for good once any kernel ran on a second stream goes
(bench/results/side_stream-h200.log: GEMMs, a high-priority stream, one elementwise op alike, at unchanged SM
clocks). That probe drove a whole engine per variant; this one replays plain CUDA graphs, so each variant is a
fresh process of a few seconds and the effect can be split into per-kernel cost and bandwidth:

- `tiny`: a graph of 1000 one-element adds (what a kernel boundary costs inside a graph replay);
- `decode`: a Mistral-7B-shaped batch-1 decode graph made of torch ops (32 layers of GEMVs over 14 GB of bf16
  weights, SiLU*mul and residual adds, about 230 kernels), bandwidth-bound as the engine's is;
- `copy`: one 4 GiB device-to-device copy (the memory system alone).

Each variant: build and capture (on a side capture stream, as the engine's runners do), time every workload
(before), do the variant's action, time them again (after). after / before above 1 is a slowdown.

The second round (--only green,"op on the default","100 one","one large" --name stream_gap_green): which work
triggers it (count of kernels or their size; the default stream's own work) and whether a green context, a
context of its own with its own channels, escapes it on either side.

Found (H200, bench/results/stream_gap-h200.json; H100, stream_gap_green-h100.json): after the trigger, the
1000-kernel graph takes 1.18-1.21x as long (about 0.18 us more per kernel boundary), the decode graph 1.024-1.032x,
copies and clocks are unchanged, for the rest of the process. It is the number of kernels on a second stream, not
their size: a hundred one-element adds set it off, one large add (or one tiny one, or an event) does not; work on
the default stream alone never does. Nothing tried undoes it (connections, priorities, recapture, destroying the
stream), and a green context escapes it on neither side: its work sets it off and its replays pay it.

Usage: python bench/probes/stream_gap.py [--repeat N] [--only WORDS] [--name NAME]; writes
bench/results/<name>-<gpu>.json (stream_gap by default)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# variant -> (environment, action between the windows, stream the windows replay on)
MAXC = "CUDA_DEVICE_MAX_CONNECTIONS"
VARIANTS: dict[str, tuple[dict[str, str], str, str]] = {
    "nothing": ({}, "none", "default"),
    "elementwise op on a side stream": ({}, "add-side", "default"),
    "one 1-element op on a side stream": ({}, "tiny-side", "default"),
    "a side stream made, an event recorded on it, no kernel": ({}, "event-side", "default"),
    "op on a side stream, CUDA_DEVICE_MAX_CONNECTIONS=1": ({MAXC: "1"}, "add-side", "default"),
    "op on a side stream, CUDA_DEVICE_MAX_CONNECTIONS=32": ({MAXC: "32"}, "add-side", "default"),
    "replays on a side stream, nothing else": ({}, "none", "side"),
    "replays on a side stream, op on another side stream": ({}, "add-side", "side"),
    "replays on a side stream (high priority), op on another": ({}, "add-side", "side-high"),
    "op on a side stream, graphs re-captured after": ({}, "add-side-recapture", "default"),
    "op on a raw stream, stream destroyed after": ({}, "add-raw-destroy", "default"),
    "op on a side stream, graphs uploaded again": ({}, "add-side-upload", "default"),
    # The second round: which work triggers it, and whether a green context (a context of its own, with its own
    # channels) escapes it: two models on two contexts could then overlap without it.
    "op on the default stream": ({}, "add-default", "default"),
    "100 one-element ops on a side stream": ({}, "tiny100-side", "default"),
    "one large op on a side stream": ({}, "add1-side", "default"),
    "op on a green-context stream (all SMs)": ({}, "add-green", "default"),
    "replays on a green-context stream, nothing else": ({}, "none", "green"),
    "replays on a green-context stream, op on a side stream": ({}, "add-side", "green"),
    "graphs captured and replayed on a green-context stream, op on a side stream": ({}, "add-side", "green-captured"),
    "green contexts made and graphs captured on them, nothing run there": ({}, "green-capture", "default"),
    "graphs captured and replayed on a green-context stream, op on another green context": (
        {},
        "add-green",
        "green-captured",
    ),
}
LAYERS = 32
HIDDEN, QKV, FFN, VOCAB = 4096, 6144, 14336, 32000


def sm_clocks() -> dict[str, int | None]:
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        return {"sm_mhz": int(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)),
                "mem_mhz": int(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM))}  # fmt: skip
    except Exception:
        return {"sm_mhz": None, "mem_mhz": None}


def worker(action: str, where: str) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    dev = torch.device("cuda:0")
    bf = torch.bfloat16
    with torch.inference_mode():
        weights = [
            (torch.empty(QKV, HIDDEN, device=dev, dtype=bf), torch.empty(HIDDEN, HIDDEN, device=dev, dtype=bf),
             torch.empty(2 * FFN, HIDDEN, device=dev, dtype=bf), torch.empty(HIDDEN, FFN, device=dev, dtype=bf))
            for _ in range(LAYERS)
        ]  # fmt: skip
        for group in weights:
            for w in group:
                w.normal_(0, 0.02)
        head = torch.randn(VOCAB, HIDDEN, device=dev, dtype=bf) * 0.02
        x = torch.randn(1, HIDDEN, device=dev, dtype=bf)
        small = torch.zeros(1, device=dev)
        src = torch.empty(2**31, device=dev, dtype=torch.int16)
        dst = torch.empty_like(src)

        def decode() -> torch.Tensor:
            h = x
            for wqkv, wo, wgu, wd in weights:
                q = F.linear(h, wqkv)
                h = h + F.linear(q[:, :HIDDEN], wo)
                gu = F.linear(h, wgu)
                h = h + F.linear(F.silu(gu[:, :FFN]) * gu[:, FFN:], wd)
            return F.linear(h, head)

        def tiny() -> None:
            for _ in range(1000):
                small.add_(1.0)

        def green() -> torch.cuda.Stream:
            from llmhost.engine.sm_partition import confined_stream, sm_count

            made = confined_stream(dev, sm_count(dev) // 8 * 8)
            assert made is not None, "no green contexts here"
            return made

        green_stream = green() if where.startswith("green") else None
        capture_stream = green_stream if where == "green-captured" else torch.cuda.Stream(dev)  # type: ignore[no-untyped-call]

        def capture() -> dict[str, torch.cuda.CUDAGraph]:
            graphs = {}
            for name, fn in (("tiny", tiny), ("decode", decode)):
                fn()
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, stream=capture_stream):
                    fn()
                torch.cuda.synchronize()
                graphs[name] = g
            return graphs

        graphs = capture()
        stream = green_stream
        if where.startswith("side"):
            stream = torch.cuda.Stream(dev, priority=-1 if where == "side-high" else 0)  # type: ignore[no-untyped-call]

        def window() -> dict[str, Any]:
            out: dict[str, Any] = {}
            with torch.cuda.stream(stream or torch.cuda.current_stream()):
                for name, reps in (("tiny", 100), ("decode", 60)):
                    g = graphs[name]
                    for _ in range(5):
                        g.replay()
                    times = []
                    for _ in range(7):
                        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        a.record()
                        for _ in range(reps):
                            g.replay()
                        b.record()
                        b.synchronize()
                        times.append(a.elapsed_time(b) * 1000 / reps)
                    out[f"{name}_us"] = round(statistics.median(times), 2)
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                dst.copy_(src)
                a.record()
                for _ in range(5):
                    dst.copy_(src)
                b.record()
                b.synchronize()
                out["copy_GBps"] = round(2 * src.numel() * 2 * 5 / (a.elapsed_time(b) / 1000) / 1e9, 1)
            out.update(sm_clocks())
            return out

        before = window()
        kept: list[torch.cuda.CUDAGraph] = []
        big = torch.randn(256 * 2**20, device=dev, dtype=bf)
        if action.startswith("add-side"):
            with torch.cuda.stream(torch.cuda.Stream(dev)):  # type: ignore[no-untyped-call]
                for _ in range(10):
                    big.add_(1.0)
        elif action == "add-default":
            for _ in range(10):
                big.add_(1.0)
        elif action == "add1-side":
            with torch.cuda.stream(torch.cuda.Stream(dev)):  # type: ignore[no-untyped-call]
                big.add_(1.0)
        elif action == "tiny100-side":
            with torch.cuda.stream(torch.cuda.Stream(dev)):  # type: ignore[no-untyped-call]
                for _ in range(100):
                    small.add_(1.0)
        elif action == "add-green":
            with torch.cuda.stream(green()):
                for _ in range(10):
                    big.add_(1.0)
        elif action == "green-capture":  # what SM steering does at a model's load (host/sm_confinement.py)
            for _ in range(4):
                confined = green()
                for fn in (tiny, decode):
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, stream=confined):
                        fn()
                    kept.append(g)
        elif action == "tiny-side":
            with torch.cuda.stream(torch.cuda.Stream(dev)):  # type: ignore[no-untyped-call]
                small.add_(1.0)
        elif action == "event-side":
            torch.cuda.Event().record(torch.cuda.Stream(dev))  # type: ignore[no-untyped-call]
        elif action == "add-raw-destroy":
            from cuda.bindings import runtime as cudart

            _err, raw = cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking)
            with torch.cuda.stream(torch.cuda.ExternalStream(int(raw))):
                for _ in range(10):
                    big.add_(1.0)
            torch.cuda.synchronize()
            cudart.cudaStreamDestroy(raw)
        torch.cuda.synchronize()
        if action == "add-side-recapture":
            graphs = capture()
        elif action == "add-side-upload":
            for g in graphs.values():
                g.replay()  # torch has no separate upload: one replay on the default stream re-binds it there
        torch.cuda.synchronize()
        time.sleep(0.2)
        after = window()
    ratios = {k: round(after[k] / before[k], 4) for k in ("tiny_us", "decode_us") if before[k]}
    ratios["copy"] = round(before["copy_GBps"] / after["copy_GBps"], 4)
    return {"before": before, "after": after, "after_over_before": ratios}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=2, metavar=("ACTION", "STREAM"), help="one variant in this process (internal)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each variant")
    ap.add_argument("--only", help="comma-separated words: run the variants whose label holds one of them")
    ap.add_argument("--name", default="stream_gap", help="result name: bench/results/<name>-<gpu>.json")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    import torch
    from common import gpu_tag, write_result

    doc: dict[str, Any] = {"bench": "bench/probes/stream_gap.py", "gpu": torch.cuda.get_device_name(),
                           "torch": torch.__version__, "variants": {}}  # fmt: skip
    words = [w.strip() for w in args.only.split(",")] if args.only else None
    for label, (env, action, where) in VARIANTS.items():
        if words is not None and not any(w in label for w in words):
            continue
        runs = []
        for _ in range(args.repeat):
            cmd = [sys.executable, __file__, "--worker", action, where]
            proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
            try:
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            except (IndexError, json.JSONDecodeError):
                runs.append({"failed": proc.returncode, "stderr": proc.stderr[-800:]})
            print(label, runs[-1], file=sys.stderr, flush=True)
        doc["variants"][label] = runs
    write_result(args.name, gpu_tag(torch.cuda.get_device_name()), doc)


if __name__ == "__main__":
    main()
