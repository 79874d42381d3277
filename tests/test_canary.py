"""bench/probes/canary.py: the process that only reads the clock, whose stalls tell the machine's hiccups from the
host loop's own (bench/multi_model.py --trace-dir runs one beside each four-model host window)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "probes"))

import canary

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat and RUSAGE_THREAD are Linux's")


@linux
def test_spin_samples_the_machine_and_finds_a_stall_it_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    real = time.monotonic
    calls = 0

    def stalling() -> float:  # from the 201st clock read on, 5 ms later: as if the 100th nap ended that late
        nonlocal calls  # (the first read is the start; then each nap reads before and after)
        calls += 1
        return real() + (0.005 if calls >= 201 else 0.0)

    monkeypatch.setattr(canary.time, "monotonic", stalling)
    record = canary.spin(None, 0.2)
    stalls = [h for h in record["hiccups"] if h["ms"] >= 5.0]
    assert len(stalls) == 1 and stalls[0]["ms"] < 50.0
    assert "invol_switches" in stalls[0]  # what the OS says of the canary's thread over that nap
    assert len(record["cpu_samples"]) >= 5  # every SAMPLE_S: the 0.2 s hold ~20
    assert all(len(s) == 1 + len(canary.STAT_FIELDS) for s in record["cpu_samples"])
    summary = canary.summary(record, record["t0"], record["t1"] + 1.0)
    assert summary["hiccups"] == len(record["hiccups"]) and summary["longest_ms"] >= 5.0
    assert abs(sum(summary["cpu_share"].values()) - 1.0) < 0.01


@linux
def test_canary_process_writes_its_record_when_the_block_ends(tmp_path: Path) -> None:
    path = tmp_path / "canary.json"
    t0 = time.monotonic()
    with canary.Canary(path, max_s=30.0):
        time.sleep(0.5)
    assert time.monotonic() - t0 < 20.0, "stopped when the block ended, not at max_s"
    record = json.loads(path.read_text())
    assert record["t1"] > record["t0"] and record["cpu_samples"]
    assert record["machine"]["cpus"] == os.cpu_count()
