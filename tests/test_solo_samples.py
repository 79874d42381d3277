"""bench/probes/solo_samples.py on a made-up step trace: decode steps before the window split by how they were
launched, and the estimate the host charged with as the window began."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "probes"))

from solo_samples import samples


def launch(t: float, follows: bool, prefill: int = 0) -> dict[str, Any]:
    return {"ev": "launch", "t": t, "model": "m", "rows": 1, "prefill": prefill, "follows": follows}


def collect(t: float, gpu_ms: float, overlapped: bool, solo_ms: float | None = None) -> dict[str, Any]:
    return {"ev": "collect", "t": t, "model": "m", "rows": 1, "prefill": 0, "gpu_ms": gpu_ms,
            "overlapped": overlapped, "solo_ms": solo_ms}  # fmt: skip


def test_steps_run_ahead_and_lone_steps_after_a_collection_are_told_apart() -> None:
    steps = [
        launch(0.0, False),
        collect(0.01, 1.9, overlapped=False),  # a default sample: host time included
        launch(0.011, False),
        launch(0.012, True),
        collect(0.02, 1.5, overlapped=False),
        collect(0.03, 1.4, overlapped=True),  # the step run ahead (the host marks it overlapped)
        launch(0.031, False),
        collect(0.04, 9.0, overlapped=True),  # beside another step: left out
        {"ev": "pass", "t": 0.05, "admit_ms": 1.0},  # other events are skipped
        launch(0.06, False, prefill=128),
        {"ev": "collect", "t": 0.07, "model": "m", "prefill": 128},
        launch(2.0, True),
        collect(2.01, 4.0, overlapped=True, solo_ms=1.7),  # in the window: the estimate only
        launch(2.02, True),
        collect(2.03, 4.0, overlapped=True, solo_ms=1.6),
    ]
    out = samples(steps, t0=2.0)["m"]
    assert out["run_ahead"] == {"n": 1, "p50_ms": 1.4}
    assert out["after_collect_alone"] == {"n": 2, "p50_ms": 1.7}  # 1.9 and 1.5
    assert out["estimate_ms"] == 1.7 and out["estimate_over_run_ahead"] == round(1.7 / 1.4, 3)


def test_steps_just_before_the_window_are_left_out() -> None:
    steps = [launch(1.6, True), collect(1.7, 1.4, overlapped=True)]  # within WINDOW_MARGIN_S of t0
    assert samples(steps, t0=2.0)["m"]["run_ahead"] == {"n": 0}
