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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import multi_model as mm

from llmhost.host.core import HostCore


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

    def on() -> Any:
        profiling[0] = True

    mm.drive_four(mode, "profile", in_process=True, warm_s=1.0, on_window=on)
    profiling[0] = False
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text)
    stats.sort_stats("tottime").print_stats(35)
    stats.sort_stats("cumulative").print_stats(45)
    print(text.getvalue())
    if args.out:
        args.out.write_text(text.getvalue())


if __name__ == "__main__":
    main()
