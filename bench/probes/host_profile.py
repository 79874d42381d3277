"""Probe: where the host loop's time goes with four models x eight clients (bench/multi_model.py's "four"
scenario): the host runs in this process with its loop under cProfile (the clients' coroutines share the GIL, so
times are inflated; the ranking is what counts). Prints the top functions by own and by cumulative time.

Usage: python bench/probes/host_profile.py [--quick] [--out FILE]"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import multi_model as mm

from llmhost.config import HostConfig
from llmhost.host.core import HostCore
from llmhost.memory.inventory import detect_inventory


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    mode = mm.MODES["quick" if args.quick else "full"]
    profile = cProfile.Profile()
    original = HostCore.iterate

    def iterate(self: HostCore) -> None:  # profiled only while every model is driven together
        if profiling[0]:
            profile.enable()
            try:
                original(self)
            finally:
                profile.disable()
        else:
            original(self)

    profiling = [False]
    HostCore.iterate = iterate  # type: ignore[method-assign]
    d = mm.drivers()
    inventory = detect_inventory()
    loads = mm._loads(mode, mode.four, mm.FOUR_CLIENTS, mode.four_tokens)
    models = mm._host_models(mode, mode.four, mode.four_tokens, mm.FOUR_CLIENTS, (1.0,) * len(mode.four))
    run = d.start_host(inventory, HostConfig(), models, "profile", in_process=True)
    for ld in loads:
        d.drive_host(run, [ld], time.monotonic() + 1.0)

    def on() -> Any:
        profiling[0] = True

    t0 = time.monotonic()
    d.drive_host(run, loads, t0 + 1.0 + mode.window_s, at=[(t0 + 1.0, on)])
    profiling[0] = False
    d.stop_host(run)
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text)
    stats.sort_stats("tottime").print_stats(35)
    stats.sort_stats("cumulative").print_stats(45)
    print(text.getvalue())
    if args.out:
        args.out.write_text(text.getvalue())


if __name__ == "__main__":
    main()
