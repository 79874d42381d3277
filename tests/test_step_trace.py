"""The step trace's record of what the OS gave the host loop's thread in a slow pass (ThreadUsage): CPU time, page
faults, context switches, told apart, so that a trace from the GPU can say whether the loop's slow moments were
spent computing, faulting pages in, sleeping in a call or waiting for a CPU."""

from __future__ import annotations

import json
import mmap
import sys
import time
from pathlib import Path

import pytest

from llmhost.host import step_trace
from llmhost.host.step_trace import StepTrace, ThreadUsage

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="getrusage(RUSAGE_THREAD) is Linux's")


def test_busy_time_counts_as_cpu_time() -> None:
    usage = ThreadUsage()
    start = usage.read()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.05:
        pass
    d = ThreadUsage.since(start, usage.read())
    usage.close()
    assert 20.0 <= d["cpu_ms"] <= 500.0
    assert d["minflt"] >= 0 and d["runq_wait_ms"] >= 0.0


def test_sleeping_is_a_voluntary_switch_not_cpu_time() -> None:
    usage = ThreadUsage()
    start = usage.read()
    time.sleep(0.05)
    d = ThreadUsage.since(start, usage.read())
    usage.close()
    assert d["vol_switches"] >= 1
    assert d["cpu_ms"] < 40.0


def test_writing_fresh_memory_counts_page_faults() -> None:
    size = 64 << 20
    block = mmap.mmap(-1, size)  # fresh anonymous memory (malloc might hand back pages already faulted in)
    usage = ThreadUsage()
    start = usage.read()
    for offset in range(0, size, 4096):  # one write per 4 KiB page: each faulted in
        block[offset] = 1
    d = ThreadUsage.since(start, usage.read())
    usage.close()
    block.close()
    assert d["minflt"] >= 1000  # 16k pages of 4 KiB (fewer with huge pages, never this few)


def test_no_reading_no_fields() -> None:
    usage = ThreadUsage()
    assert ThreadUsage.since(None, usage.read()) == {}
    usage.close()


def test_every_record_carries_its_loop_pass(tmp_path: Path) -> None:
    trace = StepTrace(tmp_path / "steps.jsonl")
    trace.add("launch", "a", 8, 0)
    trace.passes += 1
    trace.add("collect", "a", 8, 0)
    trace.add("send", "", 0, 0, tokens={"a": 8})
    assert [r["pass_no"] for r in trace.records] == [0, 1, 1]


def test_past_the_cap_records_are_counted_not_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(step_trace, "MAX_RECORDS", 3)
    trace = StepTrace(tmp_path / "steps.jsonl")
    for _ in range(5):
        trace.add("launch", "a", 8, 0)
    trace.write()
    lines = [json.loads(line) for line in trace.path.read_text().splitlines()]
    assert [r["ev"] for r in lines] == ["launch"] * 3 + ["dropped"]
    assert lines[-1]["records"] == 2
