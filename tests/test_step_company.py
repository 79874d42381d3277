"""bench/probes/step_company.py: a model's decode steps classed by what ran beside them on the GPU (other models'
decode steps for over half of the step, any prompt step at all), from collection records whose GPU intervals are
known."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "probes"))

import step_company


def collect(model: str, end: float, gpu_ms: float, prefill: int = 0) -> dict[str, Any]:
    return {"t": end, "ev": "collect", "model": model, "rows": 8, "prefill": prefill, "gpu_ms": gpu_ms}


def test_steps_are_classed_by_their_company() -> None:
    steps = [
        collect("small", 0.010, 4.0),  # 6-10 ms: big decodes 0-20 ms beside it all along
        collect("big", 0.020, 20.0),
        collect("small", 0.030, 8.0),  # 22-30 ms: big's next step from 25 ms covers 5 of its 8 ms, a prompt 28-29 ms
        collect("prompt", 0.029, 1.0, prefill=64),
        collect("big", 0.045, 20.0),
        collect("small", 0.060, 6.0),  # 54-60 ms: alone
        collect("small", 0.200, 5.0),  # outside the window
    ]
    out = step_company.company(steps, 0.0, 0.1)
    small = out["models"]["small"]
    assert set(small) == {"decode beside 1", "prompt beside 1", "decode beside 0"}
    assert small["decode beside 1"]["mean_ms"] == 4.0
    assert small["prompt beside 1"]["max_ms"] == 8.0
    assert small["decode beside 0"]["steps"] == 1
    assert abs(sum(c["share"] for c in small.values()) - 1.0) < 1e-3
    assert "prompt" not in out["models"]  # prompt steps are company, not classed themselves
    assert out["prompt_steps"]["models"]["prompt"] == {
        "steps": 1,
        "tokens_p50": 64,
        "gpu_ms_p50": 1.0,
        "gpu_ms_max": 1.0,
    }
    assert abs(out["prompt_steps"]["window_share"] - 0.01) < 1e-9  # 1 ms of the 100 ms window


def test_steps_carrying_prompt_rows_are_a_class_of_their_own() -> None:
    """A decode step that carried prompt rows in its graph (`prompt_rows` in its collect record) is `own rows`; one
    that another model's carrying step overlapped is `rows`; the rest as before."""
    carrying = collect("big", 0.020, 20.0) | {"prompt_rows": 128}
    steps = [
        collect("small", 0.010, 4.0),  # 6-10 ms: beside big's carrying step
        carrying,
        collect("small", 0.030, 4.0),  # 26-30 ms: beside big's plain step
        collect("big", 0.045, 20.0),
        collect("small", 0.060, 4.0) | {"prompt_rows": 16},  # 56-60 ms: alone, carrying its own
    ]
    out = step_company.company(steps, 0.0, 0.1)
    assert set(out["models"]["small"]) == {"rows beside 1", "decode beside 1", "own rows beside 0"}
    assert set(out["models"]["big"]) == {"own rows beside 0", "decode beside 0"}  # small covers under half
