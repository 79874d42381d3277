"""StepTrace: an optional record of the host loop's steps, for finding where inter-token latency goes (which step
of which model was in flight, how long it took on the GPU, how many ran beside it). On when the environment
variable LLMHOST_STEP_TRACE names a file; the host writes it (JSON lines) when it stops. Off, it costs an
attribute test per step and four clock reads per loop pass (the pass's timing, traced when it is slow). On, every
record carries its loop pass's number, every token batch's send is recorded, and a slow pass records what the OS
gave the loop's thread meanwhile (ThreadUsage: a reading at every pass's start, ~2 us)."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

ENV = "LLMHOST_STEP_TRACE"
# Records kept at most (~0.5 KiB each in memory): a bench phase makes ~3,000 a second, a probe run ~200,000; a
# server left tracing would otherwise grow without bound. Past it, records are counted, not kept.
MAX_RECORDS = 1_000_000


class StepTrace:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self.passes = 0  # the host loop's passes so far: stamped on every record, to group a pass's events
        self.dropped = 0  # records past MAX_RECORDS

    @classmethod
    def from_env(cls) -> StepTrace | None:
        path = os.environ.get(ENV)
        return cls(Path(path)) if path else None

    def add(self, event: str, model: str, rows: int, prefill: int, at: float | None = None, **fields: Any) -> None:
        """One event (a launch, a collection, a slow loop pass, a send, a garbage collection), stamped with
        time.monotonic() (one clock for every process of the machine, so a client's token times line up with
        it): now, or `at` (a reading taken when the event began: a send's, which the client may see end first)."""
        if len(self.records) >= MAX_RECORDS:
            self.dropped += 1
            return
        self.records.append(
            {
                "t": time.monotonic() if at is None else at,
                "ev": event,
                "model": model,
                "rows": rows,
                "prefill": prefill,
                "pass_no": self.passes,
                **fields,
            }
        )

    def write(self) -> None:
        """The records as JSON lines; a last one says how many were dropped past MAX_RECORDS, if any."""
        with self.path.open("w") as f:
            for rec in self.records:
                f.write(json.dumps(rec) + "\n")
            if self.dropped:
                end = {"t": time.monotonic(), "ev": "dropped", "model": "", "rows": 0, "prefill": 0}
                f.write(json.dumps({**end, "pass_no": self.passes, "records": self.dropped}) + "\n")


class ThreadUsage:
    """What the calling thread got from the OS between two readings, for telling why a loop pass was slow: CPU time
    (user + system), time it was runnable but waited for a CPU (preempted: /proc/thread-self/schedstat, where the
    kernel keeps it), page faults (minor: the kernel remapping memory, as NUMA balancing does), and context switches
    (voluntary: it slept in a call; involuntary: the scheduler took its CPU). Linux; elsewhere `read` gives None.
    Made and read on the thread it measures."""

    def __init__(self) -> None:
        self._schedstat: int | None = None
        with contextlib.suppress(OSError):
            self._schedstat = os.open("/proc/thread-self/schedstat", os.O_RDONLY)

    def read(self) -> tuple[float, ...] | None:
        if not hasattr(resource, "RUSAGE_THREAD"):
            return None
        ru = resource.getrusage(resource.RUSAGE_THREAD)
        wait_ns = 0.0
        if self._schedstat is not None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                wait_ns = float(os.pread(self._schedstat, 64, 0).split()[1])
        return (ru.ru_utime + ru.ru_stime, wait_ns / 1e9, ru.ru_minflt, ru.ru_majflt, ru.ru_nvcsw, ru.ru_nivcsw)

    @staticmethod
    def since(start: tuple[float, ...] | None, end: tuple[float, ...] | None) -> dict[str, float]:
        """The trace fields for the span between two readings (none when either is missing)."""
        if start is None or end is None:
            return {}
        d = [b - a for a, b in zip(start, end, strict=True)]
        return {
            "cpu_ms": round(1e3 * d[0], 3), "runq_wait_ms": round(1e3 * d[1], 3), "minflt": int(d[2]),
            "majflt": int(d[3]), "vol_switches": int(d[4]), "invol_switches": int(d[5]),
        }  # fmt: skip

    def close(self) -> None:
        if self._schedstat is not None:
            os.close(self._schedstat)
            self._schedstat = None
