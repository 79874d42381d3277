"""bench/probes/itl_tail.py on a made-up trace: which token gaps overlap a prompt step, and the figures of those
clear of prompts."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "probes"))

from itl_tail import analyse


def test_gaps_are_split_by_the_prompt_steps_they_overlap() -> None:
    # a prompts from 1.00 to 1.02 s (launch to collection); b's tokens every 5 ms, one 25 ms gap across a's prompt
    steps = [
        {"ev": "collect", "t": 1.02, "model": "a", "prefill": 128, "latency_ms": 20.0, "gpu_ms": 15.0},
        {"ev": "collect", "t": 0.995, "model": "b", "prefill": 0, "latency_ms": 5.0, "gpu_ms": 4.0},
        {"ev": "collect", "t": 1.03, "model": "b", "prefill": 0, "latency_ms": 5.0, "gpu_ms": 8.0},
    ]
    b_times = [0.98, 0.985, 0.99, 0.995, 1.02, 1.025, 1.03]
    a_times = [1.02, 1.03]
    tokens = {"t0": 0.9, "t1": 1.1, "streams": [{"model": "b", "times": b_times}, {"model": "a", "times": a_times}]}
    out = analyse(steps, tokens)
    assert out["prompt_steps_in_window"] == 1
    b = out["models"]["b"]
    assert b["gaps"] == 6 and b["overlapping_other_prompt"] == 1 and b["overlapping_own_prompt"] == 0
    assert b["clear_of_prompts"]["gaps"] == 5 and b["clear_of_prompts"]["p99"] == 5.0
    assert round(b["itl_ms"]["p99"], 3) == 25.0
    assert b["decode_gpu_ms"] == {"p50": 4.0, "p99": 8.0}
    a = out["models"]["a"]
    assert a["overlapping_own_prompt"] == 0 and a["clear_of_prompts"]["gaps"] == 1  # its gap starts at the collection


def test_each_tokens_delay_after_its_models_latest_collection() -> None:
    steps = [
        {"ev": "collect", "t": 1.000, "model": "a", "prefill": 0, "latency_ms": 5.0, "gpu_ms": 4.0},
        {"ev": "collect", "t": 1.010, "model": "a", "prefill": 0, "latency_ms": 5.0, "gpu_ms": 4.0},
        {"ev": "collect", "t": 1.005, "model": "b", "prefill": 0, "latency_ms": 5.0, "gpu_ms": 4.0},
    ]
    # a's first token 1 ms after its collection, its second 8 ms after the next (b's collection is not a's)
    tokens = {"t0": 0.9, "t1": 1.1, "streams": [{"model": "a", "times": [1.001, 1.018]}]}
    after = analyse(steps, tokens)["models"]["a"]["client_after_collect_ms"]
    assert after == {"mean": 4.5, "p50": 1.0, "p99": 8.0, "max": 8.0}
