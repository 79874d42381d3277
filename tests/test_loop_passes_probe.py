"""bench/probes/loop_passes.py over a made-up step trace whose slow moment, prompt step and send delays are known:
the probe finds the slow moment where it was put, blames each of a model's largest gaps on what lay beside it, and
splits a token's way from its collection to its client at the pass's send, from the traced sends (numbered passes)
and, for traces from before pass numbers, from the passes it infers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "probes"))

import loop_passes

SLOW = (1.0, 1.1)  # launches take 2 ms instead of 0.4 ms, and model a steps every 20 ms instead of 10
PROMPT = (1.49, 1.52)  # model b's prompt step; model a's collections 25 ms apart across it


def a_times() -> list[float]:
    times = [round(0.01 * k, 3) for k in range(200)]
    times = [t for t in times if not (SLOW[0] < t < SLOW[1] and round(t * 100) % 2)]
    return sorted([t for t in times if t not in (1.5, 1.51)] + [1.515])


def write_trace(root: Path, numbered: bool) -> None:
    records: list[dict[str, Any]] = []
    arrivals: dict[str, list[float]] = {"a": [], "b": []}
    passes = [(t, "a") for t in a_times()] + [(round(0.005 + 0.01 * k, 3), "b") for k in range(200)]
    for n, (t, model) in enumerate(sorted(passes)):
        launch_ms = 2.0 if SLOW[0] <= t < SLOW[1] else 0.4
        sent = t + 2e-4 + launch_ms / 1e3 + 1e-4
        step = {"model": model, "rows": 1, "prefill": 0, "pass_no": n}
        records.append({"t": t, "ev": "collect", **step, "ms": 0.1, "gpu_ms": 5.0, "latency_ms": 5.0})
        records.append({"t": t + 2e-4 + launch_ms / 1e3, "ev": "launch", **step, "ms": launch_ms, "follows": False})
        records.append({"t": sent, "ev": "send", "model": "", "rows": 0, "prefill": 0, "pass_no": n, "ms": 0.05})
        arrivals[model].append(sent + 3e-4)
        if model == "b" and abs(t - (PROMPT[0] - 0.005)) < 1e-9:
            records.append({"t": PROMPT[0], "ev": "launch", **step, "prefill": 512, "ms": 1.0, "follows": False})
        if model == "b" and abs(t - (PROMPT[1] - 0.005)) < 1e-9:
            records.append({"t": PROMPT[1], "ev": "collect", **step, "prefill": 512, "ms": 0.1, "latency_ms": 30.0})
    records.sort(key=lambda r: r["t"])
    if not numbered:  # as traces were before 2026-12-05: no pass numbers, no sends but slow ones
        records = [{k: v for k, v in r.items() if k != "pass_no"} for r in records if r["ev"] != "send"]
    root.mkdir()
    (root / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    streams = [{"model": m, "submitted": 0.0, "times": ts} for m, ts in arrivals.items()]
    (root / "tokens.json").write_text(json.dumps({"t0": 0.1, "t1": 1.9, "streams": streams}))


@pytest.mark.parametrize("numbered", [True, False])
def test_slow_moment_and_gaps_found_where_they_were_put(tmp_path: Path, numbered: bool) -> None:
    write_trace(tmp_path / "raw", numbered)
    out = loop_passes.analyse(tmp_path / "raw")
    assert out["numbered_passes"] is numbered
    [moment] = out["slow_moments"]
    assert moment["at_s"] == pytest.approx(SLOW[0] - 0.1) and moment["ms"] == pytest.approx(100.0)
    assert moment["decode_launch_ms_p50"] == 2.0 and not moment["prompt_step"]
    assert out["launch_ms"]["p50"] == 0.4
    a = out["models"]["a"]
    assert a["top_gaps"]["n"] == 5
    assert a["top_gaps"]["smallest_ms"] == pytest.approx(20.0, abs=0.01)
    assert (a["top_gaps"]["slow_moment_only"], a["top_gaps"]["prompt_step_only"]) == (4, 1)
    # ~180 gaps: the p99 is the second largest, a slow-moment gap (20 ms at both ends, its tokens 2.6 ms late)
    assert a["itl_ms"]["p99"] == pytest.approx(20.0, abs=0.01)
    assert a["itl_ms"]["at_collection_p99_ms"] == pytest.approx(20.0, abs=0.01)
    assert a["itl_ms"]["median_send_to_client_ms"] == pytest.approx(0.3 if numbered else 0.4, abs=1e-3)


def test_traced_sends_split_the_way_to_the_client(tmp_path: Path) -> None:
    write_trace(tmp_path / "raw", numbered=True)
    b = loop_passes.analyse(tmp_path / "raw")["models"]["b"]["after_collect_ms"]
    assert b["wait_for_send"]["p50"] == pytest.approx(0.2 + 0.4 + 0.1, abs=1e-3)  # the launch after the collection
    assert b["wait_for_send"]["max"] == pytest.approx(0.2 + 2.0 + 0.1, abs=1e-3)  # in the slow moment
    assert b["send_to_client"]["p50"] == pytest.approx(0.3, abs=1e-3)
    assert b["launches_after"]["p50"] == 1


def test_without_sends_the_pass_ends_at_its_last_record_before_the_arrival(tmp_path: Path) -> None:
    write_trace(tmp_path / "raw", numbered=False)
    b = loop_passes.analyse(tmp_path / "raw")["models"]["b"]["after_collect_ms"]
    assert b["wait_for_send"]["p50"] == pytest.approx(0.2 + 0.4, abs=1e-3)  # up to the launch's record
    assert b["send_to_client"]["p50"] == pytest.approx(0.1 + 0.3, abs=1e-3)
