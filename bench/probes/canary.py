"""Probe: a canary process that does nothing but read the clock, to tell the machine's hiccups from the host's own.

In the H100 four-model traces the host loop has 2-3 "slow moments" per 4 s window, each about 100 ms long, in
which every launch, collection and pipe poll takes several times its usual time. If a process that shares nothing
with the host stalls at the same moments, the machine took the CPUs (a hypervisor's steal, interrupts, frequency);
if it does not, the cause is in the host process (its page faults, its CUDA calls, its own CPU time).

The canary spins on time.monotonic() (the clock the step trace and the clients' token times use) and records every
gap longer than HICCUP_S, with what the OS says about its thread over the gap (ThreadUsage: preempted or not), and
every SAMPLE_S the machine-wide CPU time from /proc/stat (steal, interrupts), so that a window's figures line up with
the host's step trace. It keeps one core busy, as the host loop does.

`with Canary(path):` around a bench window (bench/multi_model.py --trace-dir does) writes `path` (JSON) when the
block ends. Standalone: python bench/probes/canary.py OUT.json SECONDS"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # llmhost, where it is not installed

from llmhost.host.step_trace import ThreadUsage

HICCUP_S = 0.0005  # a gap between two clock reads longer than this is recorded (a read takes ~0.1 us)
SAMPLE_S = 0.01  # how often the machine-wide CPU times are read
STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")  # /proc/stat's first eight


def cpu_times() -> list[int] | None:
    """The machine's CPU time so far per STAT_FIELDS, in clock ticks (USER_HZ, 100 per second); None off Linux."""
    try:
        with open("/proc/stat") as f:
            first = f.readline().split()
    except OSError:
        return None
    return [int(x) for x in first[1 : 1 + len(STAT_FIELDS)]]


def _first_line(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return None


def machine() -> dict[str, Any]:
    """What of the machine could make it hiccup: its CPU, its NUMA nodes and whether the kernel balances memory
    across them (which unmaps a process's pages now and then, to fault them back in: page faults in bursts),
    transparent huge pages, the CPU frequency governor, the load. None where the file is not there."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    nodes = sorted(p.name for p in Path("/sys/devices/system/node").glob("node[0-9]*"))
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "numa_nodes": len(nodes) or None,
        "numa_balancing": _first_line("/proc/sys/kernel/numa_balancing"),
        "transparent_hugepage": _first_line("/sys/kernel/mm/transparent_hugepage/enabled"),
        "cpufreq_governor": _first_line("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "loadavg": _first_line("/proc/loadavg"),
    }


def spin(stop: Any, seconds: float) -> dict[str, Any]:
    """Read the clock until `stop` is set (an Event, or None) or `seconds` pass; the hiccups and CPU-time samples."""
    usage = ThreadUsage()
    hiccups: list[dict[str, Any]] = []
    samples: list[list[float]] = []
    t_start = last = time.monotonic()
    next_sample = t_start
    before = usage.read()
    while last - t_start < seconds and (stop is None or not stop.is_set()):
        now = time.monotonic()
        if now - last > HICCUP_S:
            after = usage.read()
            hiccups.append({"t": last, "ms": round(1e3 * (now - last), 3), **ThreadUsage.since(before, after)})
            before = after
            now = time.monotonic()
        if now >= next_sample:
            times = cpu_times()
            if times is not None:
                samples.append([now, *times])
            next_sample = now + SAMPLE_S
            before = usage.read()
            now = time.monotonic()
        last = now
    usage.close()
    return {
        "machine": machine(),
        "hiccup_s": HICCUP_S,
        "t0": t_start,
        "t1": last,
        "hiccups": hiccups,
        "cpu_fields": STAT_FIELDS,
        "cpu_samples": samples,
    }


def _child(stop: Any, seconds: float, path: str) -> None:
    Path(path).write_text(json.dumps(spin(stop, seconds)))


class Canary:
    """A canary process for the span of a `with` block (at most `max_s`); its record written to `path`."""

    def __init__(self, path: Path, max_s: float = 600.0) -> None:
        self.path = path
        self.max_s = max_s
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self._proc = ctx.Process(target=_child, args=(self._stop, max_s, str(path)), daemon=True)

    def __enter__(self) -> Canary:
        self._proc.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._proc.join(timeout=30.0)
        if self._proc.is_alive():
            self._proc.kill()


def summary(record: dict[str, Any], t0: float, t1: float) -> dict[str, Any]:
    """The canary's figures in a window: its hiccups (count, longest, those over 1 ms with their times), and the
    machine's CPU time by kind over the window, as a fraction of all of it."""
    hs = [h for h in record["hiccups"] if t0 <= h["t"] < t1]
    inside = [s for s in record["cpu_samples"] if t0 <= s[0] < t1]
    shares: dict[str, float] = {}
    if len(inside) >= 2:
        delta = [b - a for a, b in zip(inside[0][1:], inside[-1][1:], strict=True)]
        total = sum(delta) or 1
        shares = {k: round(d / total, 4) for k, d in zip(record["cpu_fields"], delta, strict=True)}
    return {
        "machine": record.get("machine"),
        "hiccups": len(hs),
        "longest_ms": max((h["ms"] for h in hs), default=0.0),
        "over_1ms": [[round(h["t"] - t0, 4), h["ms"], h.get("invol_switches")] for h in hs if h["ms"] > 1.0],
        "cpu_share": shares,
    }


def main() -> None:
    out, seconds = Path(sys.argv[1]), float(sys.argv[2])
    record = spin(None, seconds)
    out.write_text(json.dumps(record))
    print(json.dumps(summary(record, record["t0"], record["t1"]), indent=1))


if __name__ == "__main__":
    main()
