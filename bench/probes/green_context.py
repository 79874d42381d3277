"""Probe: can a CUDA green context (a stream limited to some of the GPU's SMs) steer how two models decoding at
once share the bandwidth, without holding either back? The pair of bench/multi_model.py (Mistral-7B + Qwen2.5-14B
shapes, batch 1, one thread each on its own stream, as its threads baseline): free-running threads favour the 14B
(normalized 0.62 against 0.52, bench/results/multi_model-h100.json), and stream priorities do not move that split
(bench/probes/stream_priority.py). Here the 14B's stream belongs to a green context of fewer SMs, the 7B's to the
whole GPU: each model's tokens/s, normalized speed (together / alone) and the combined effective bandwidth, per SM
count, with the 14B's decode graphs captured on a plain stream (replayed on the green one) and captured on the
green context's own stream. If the split moves while the combined bandwidth stays at threads', the host could be
fair without idling.

Usage: python bench/probes/green_context.py [--quick] [--sms 96,72,56,40] [--out FILE]"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import multi_model as mm

WARM_S = 1.0
WINDOW_S = 4.0


def green_stream(num_sms: int) -> tuple[Any, torch.cuda.Stream]:
    """A stream of a new green context of `num_sms` SMs (the context is returned to keep it alive). torch's API
    moved between releases: Stream() where it exists, else a stream made while the context is current."""
    from torch.cuda.green_contexts import GreenContext

    try:
        ctx = GreenContext.create(num_sms=num_sms, device_id=torch.cuda.current_device())
    except TypeError:
        ctx = GreenContext.create(num_sms, torch.cuda.current_device())
    if hasattr(ctx, "Stream"):
        return ctx, ctx.Stream()
    ctx.set_context()
    try:
        return ctx, torch.cuda.Stream()  # type: ignore[no-untyped-call]
    finally:
        ctx.pop_context()


def recapture(engine: Any, stream: torch.cuda.Stream) -> None:
    """Capture the engine's decode graphs again, on `stream` (a green context's) into a fresh pool."""
    from llmhost.engine import decode_runner

    runner = engine.runner
    torch.cuda.synchronize()
    decode_runner._CAPTURE_STREAMS[runner.model] = stream
    runner.graphs.clear()
    runner.pool = None
    runner.capture()


def copy_GBps(stream: torch.cuda.Stream, mib: int = 1024, reps: int = 10) -> float:
    """An eager device-to-device copy's bandwidth (read + write) on `stream`: whether the context's SM limit
    holds for plain kernels, whatever it does to graph replays."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    with torch.cuda.stream(stream):
        dst.copy_(src)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            dst.copy_(src)
        end.record()
    end.synchronize()
    return round(2 * reps * (mib << 20) / (start.elapsed_time(end) / 1e3) / 1e9, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sms", default="96,72,56,40", help="SM counts of the 14B's green context")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    mode = mm.MODES["quick" if args.quick else "full"]
    d = mm.drivers()
    models = mode.pair
    loads = mm._loads(mode, models, 1, mode.pair_tokens)
    engines = [d.random_engine(*spec) for spec in mm._engine_specs(mode, models, mode.pair_tokens, 1)]
    for e, load in zip(engines, loads, strict=True):
        d.warm_engine(e, load)
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    out: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "models": models,
                           "sm_count": sm_count}  # fmt: skip

    def measure(streams: list[torch.cuda.Stream] | None, which: list[int]) -> dict[str, Any]:
        t0 = time.monotonic() + 0.2
        picked = [engines[i] for i in which]
        got = d.drive_threads(picked, [loads[i] for i in which], t0, t0 + WARM_S + WINDOW_S, streams=streams)
        names = tuple(models[i] for i in which)
        return mm._per_model(mode, names, got, t0 + WARM_S, t0 + WARM_S + WINDOW_S, 1)

    out["copy_GBps_whole_gpu"] = copy_GBps(torch.cuda.Stream())  # type: ignore[no-untyped-call]
    alone = {m: measure(None, [i])[m]["tokens_per_s"] for i, m in enumerate(models)}
    out["alone_tokens_per_s"] = alone
    runs = []
    # Every green context lives to the end: one destroyed while the allocator still holds blocks used on its
    # stream aborted the process ("context is destroyed" from an event record in a tensor's destructor).
    keep: list[Any] = []
    for sms in [sm_count, *(int(x) for x in args.sms.split(","))]:
        row: dict[str, Any] = {"sms_of_" + models[1]: sms}
        try:
            streams = None
            # Graphs captured on a plain stream (the engine's own), whatever the row before captured them on.
            recapture(engines[1], torch.cuda.Stream())  # type: ignore[no-untyped-call]
            if sms != sm_count:
                ctx, st = green_stream(sms)
                keep.append(ctx)
                streams = [torch.cuda.Stream(), st]  # type: ignore[no-untyped-call]
                row["copy_GBps_on_green"] = copy_GBps(st)
            # The heavy model alone on its green context first: how much bandwidth its SMs reach.
            if streams is not None:
                t0 = time.monotonic() + 0.2
                got = d.drive_threads([engines[1]], [loads[1]], t0, t0 + WARM_S + WINDOW_S, streams=[streams[1]])
                per1 = mm._per_model(mode, (models[1],), got, t0 + WARM_S, t0 + WARM_S + WINDOW_S, 1)
                row["alone_on_green_tokens_per_s"] = per1[models[1]]["tokens_per_s"]
            per = measure(streams, [0, 1])
            row["combined_bandwidth_GBps"] = round(sum(p["effective_bandwidth_GBps"] for p in per.values()), 1)
            row["normalized"] = {m: round(per[m]["tokens_per_s"] / alone[m], 4) for m in models}
            if streams is not None:
                # The same with the 14B's graphs captured on its green context's stream.
                recapture(engines[1], streams[1])
                t0 = time.monotonic() + 0.2
                got = d.drive_threads([engines[1]], [loads[1]], t0, t0 + WARM_S + WINDOW_S, streams=[streams[1]])
                per1 = mm._per_model(mode, (models[1],), got, t0 + WARM_S, t0 + WARM_S + WINDOW_S, 1)
                row["captured_on_green_alone_tokens_per_s"] = per1[models[1]]["tokens_per_s"]
                per = measure(streams, [0, 1])
                row["captured_on_green_combined_GBps"] = round(
                    sum(p["effective_bandwidth_GBps"] for p in per.values()), 1
                )
                row["captured_on_green_normalized"] = {m: round(per[m]["tokens_per_s"] / alone[m], 4) for m in models}
        except Exception:  # an API this torch lacks, or a graph that will not replay there: recorded, not fatal
            row["error"] = traceback.format_exc(limit=3)
        runs.append(row)
        print(json.dumps(row), flush=True)
    out["runs"] = runs
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    # Skip interpreter teardown: it destroyed the green contexts before tensors whose blocks were used on their
    # streams, and the allocator's event record then aborted the process (cudaErrorContextIsDestroyed).
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
