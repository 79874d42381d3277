"""bench/probes/itl_budget.py over a made-up four-model result whose numbers are known: each model's normalized
speed and tail growth, and the equal share the bytes read allow (a model's p99 over solo at that share)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "probes"))

import itl_budget

# name -> (solo tok/s, solo bytes/s, solo mean ms, solo p99 ms)
SOLO = {"small": (4000.0, 1.0e12, 2.0, 2.5), "large": (1000.0, 2.0e12, 8.0, 10.0)}


def _doc(speeds: dict[str, float], tails: dict[str, float]) -> dict[str, Any]:
    """A result in which each model runs at `speeds` x its solo speed together, with p99 / mean `tails`."""
    models, alone, together = {}, {}, {}
    for name, (tok_s, bytes_s, mean, p99) in SOLO.items():
        s = speeds[name]
        mean_t = mean / s
        models[name] = {
            "tokens_per_s_alone": tok_s,
            "tokens_per_s_together": tok_s * s,
            "itl_ms_alone": {"mean": mean, "p99": p99},
            "itl_ms_together": {"mean": mean_t, "p99": mean_t * tails[name]},
        }
        alone[name] = {"bytes_per_s": bytes_s}
        together[name] = {"bytes_per_s": bytes_s * s}
    return {
        "gpu": "made-up",
        "four": {"host": {"models": models}},
        "raw": {"four/host": {"alone": alone, "together": together}},
    }


def test_equal_speeds_read_back_as_the_equal_share_and_tail_growth_sets_the_p99() -> None:
    out = itl_budget.budget(_doc({"small": 0.4, "large": 0.4}, {"small": 1.25 * 1.1, "large": 1.25}))
    run = out["runs"]["host"]
    assert run["equal_share"] == pytest.approx(0.4)
    assert run["tail_growth_allowed"] == pytest.approx(1.2)  # 3 x 0.4
    small, large = run["models"]["small"], run["models"]["large"]
    assert small["tail_growth"] == pytest.approx(1.1) and large["tail_growth"] == pytest.approx(1.0)
    # p99 / solo p99 = (1 / s) x tail growth: 2.75 and 2.5
    assert small["p99_over_solo"] == pytest.approx(2.75) and small["p99_over_solo_at_equal_share"] == pytest.approx(
        2.75
    )
    assert large["p99_over_solo_at_equal_share"] == pytest.approx(2.5)


def test_unequal_speeds_give_the_share_their_bytes_would_buy_each_at_one_speed() -> None:
    """The large model reads twice the small one's bytes per unit of normalized speed: 0.5 and 0.2 together read
    what 0.3 each would ((0.5 x 1 + 0.2 x 2) / 3)."""
    out = itl_budget.budget(_doc({"small": 0.5, "large": 0.2}, {"small": 1.25, "large": 1.25}))
    run = out["runs"]["host"]
    assert run["equal_share"] == pytest.approx(0.3)
    assert run["models"]["large"]["p99_over_solo"] == pytest.approx(5.0)  # at 0.2 of its speed
    assert run["models"]["large"]["p99_over_solo_at_equal_share"] == pytest.approx(1 / 0.3, abs=1e-3)


def test_a_result_without_bytes_has_no_equal_share() -> None:
    doc = _doc({"small": 0.4, "large": 0.4}, {"small": 1.25, "large": 1.25})
    del doc["raw"]
    run = itl_budget.budget(doc)["runs"]["host"]
    assert "equal_share" not in run and "p99_over_solo_at_equal_share" not in run["models"]["small"]
