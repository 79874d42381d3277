"""Probe: a canary process that does nothing but read the clock, to tell the machine's hiccups from the host's own.

In the H100 four-model traces the host loop has 2-3 "slow moments" per 4 s window, each about 100 ms long, in
which every launch, collection and pipe poll takes several times its usual time. If a process that shares nothing
with the host stalls at the same moments, the machine took the CPUs (a hypervisor's steal, interrupts, frequency);
if it does not, the cause is in the host process (its page faults, its CUDA calls, its own CPU time).

The canary naps NAP_S at a time and reads time.monotonic() (the clock the step trace and the clients' token times
use) around each nap; a wake-up more than HICCUP_S late is recorded, with what the OS says about its thread over
that nap (ThreadUsage: waiting for a CPU or not). Napping, it takes ~2% of a core and leaves the CPUs to the host
and the clients (a spinning canary would take one, and could itself exhaust a container's CPU quota). Every
SAMPLE_S it reads the machine-wide CPU time from /proc/stat (steal, interrupts) and the container's CPU throttling
(cgroup cpu.stat: a CPU quota used up stops every thread of the container until the next period, 100 ms by
default), so that a window's figures line up with the host's step trace.

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

NAP_S = 0.0002  # how long the canary sleeps between clock reads
HICCUP_S = 0.001  # a wake-up later than this past its nap is recorded (timer slack is ~0.05-0.1 ms)
SAMPLE_S = 0.01  # how often the machine-wide CPU times are read
STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")  # /proc/stat's first eight


def cpu_times() -> list[int] | None:
    """The machine's CPU time so far per STAT_FIELDS, in clock ticks (USER_HZ, 100 per second); None off Linux."""
    first = _first_line("/proc/stat")
    return [int(x) for x in first.split()[1 : 1 + len(STAT_FIELDS)]] if first is not None else None


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
        "cpu_quota": cpu_quota(),
    }


def throttling() -> list[float] | None:
    """The container's CPU throttling so far: [periods throttled, milliseconds throttled] (cgroup v2 cpu.stat, or
    v1's); None where neither file is there."""
    for path, key, to_ms in (
        ("/sys/fs/cgroup/cpu.stat", "throttled_usec", 1e-3),
        ("/sys/fs/cgroup/cpu/cpu.stat", "throttled_time", 1e-6),
        ("/sys/fs/cgroup/cpu,cpuacct/cpu.stat", "throttled_time", 1e-6),
    ):
        try:
            with open(path) as f:
                stat = dict(line.split() for line in f if line.strip())
        except (OSError, ValueError):
            continue
        if key in stat and "nr_throttled" in stat:
            return [float(stat["nr_throttled"]), float(stat[key]) * to_ms]
    return None


def cpu_quota() -> str | None:
    """The container's CPU quota as "quota period" in microseconds ("max ..." or "-1 ...": none)."""
    v2 = _first_line("/sys/fs/cgroup/cpu.max")
    if v2 is not None:
        return v2
    quota, period = (
        _first_line("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
        _first_line("/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    )
    return f"{quota} {period}" if quota is not None else None


def spin(stop: Any, seconds: float) -> dict[str, Any]:
    """Nap and read the clock until `stop` is set (an Event, or None) or `seconds` pass: the late wake-ups, and the
    CPU-time and throttling samples."""
    usage = ThreadUsage()
    hiccups: list[dict[str, Any]] = []
    samples: list[list[float]] = []
    throttles: list[list[float]] = []
    t_start = now = time.monotonic()
    next_sample = t_start
    while now - t_start < seconds and (stop is None or not stop.is_set()):
        before = usage.read()
        t_nap = time.monotonic()
        time.sleep(NAP_S)
        now = time.monotonic()
        if now - t_nap - NAP_S > HICCUP_S:
            hiccups.append({"t": t_nap, "ms": round(1e3 * (now - t_nap), 3), **ThreadUsage.since(before, usage.read())})
        if now >= next_sample:
            times, throttled = cpu_times(), throttling()
            if times is not None:
                samples.append([now, *times])
            if throttled is not None:
                throttles.append([now, *throttled])
            next_sample = now + SAMPLE_S
    usage.close()
    return {
        "machine": machine(),
        "nap_s": NAP_S,
        "hiccup_s": HICCUP_S,
        "t0": t_start,
        "t1": now,
        "hiccups": hiccups,
        "cpu_fields": STAT_FIELDS,
        "cpu_samples": samples,
        "throttle_samples": throttles,
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
    """The canary's figures in a window: the container's CPU throttling, the late wake-ups (count, longest, and each
    one's time in the window, nap length and involuntary switches), and the machine's CPU time by kind over the
    window, as a fraction of all of it."""
    hs = [h for h in record["hiccups"] if t0 <= h["t"] < t1]
    inside = [s for s in record["cpu_samples"] if t0 <= s[0] < t1]
    shares: dict[str, float] = {}
    if len(inside) >= 2:
        delta = [b - a for a, b in zip(inside[0][1:], inside[-1][1:], strict=True)]
        total = sum(delta) or 1
        shares = {k: round(d / total, 4) for k, d in zip(record["cpu_fields"], delta, strict=True)}
    throttled = [s for s in record.get("throttle_samples", []) if t0 <= s[0] < t1]
    return {
        "machine": record.get("machine"),
        "throttled_periods": throttled[-1][1] - throttled[0][1] if len(throttled) >= 2 else None,
        "throttled_ms": round(throttled[-1][2] - throttled[0][2], 3) if len(throttled) >= 2 else None,
        "hiccups": len(hs),
        "longest_ms": max((h["ms"] for h in hs), default=0.0),
        "late": [[round(h["t"] - t0, 4), h["ms"], h.get("invol_switches")] for h in hs],
        "cpu_share": shares,
    }


def main() -> None:
    out, seconds = Path(sys.argv[1]), float(sys.argv[2])
    record = spin(None, seconds)
    out.write_text(json.dumps(record))
    print(json.dumps(summary(record, record["t0"], record["t1"]), indent=1))


if __name__ == "__main__":
    main()
