"""bench/probes/hold_sim.py, the four-model loop simulated with the real GpuScheduler: with every model's bandwidth
grab at its fair split nobody is held and all progress alike; with the 8Bs grabbing more, fair sharing holds them
back (what the H100's step traces show)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "probes"))

import hold_sim

NAMES = list(hold_sim.MODELS)


def test_fair_grabs_follow_the_solo_streaming_rates() -> None:
    grabs = hold_sim.fair_grabs(NAMES)
    assert abs(sum(grabs.values()) - 1.0) < 1e-3
    rates = {n: hold_sim.MODELS[n][1] for n in NAMES}
    for a in NAMES:
        for b in NAMES:
            assert abs(grabs[a] / grabs[b] - rates[a] / rates[b]) < 2e-3


def _together(grabs: dict[str, float]) -> dict[str, dict[str, float]]:
    saved = dict(hold_sim.MODELS)
    try:
        for n, g in grabs.items():
            hold_sim.MODELS[n] = (*hold_sim.MODELS[n][:2], g)
        return hold_sim.simulate(NAMES, 1.5, lead_steps=2.0, dither=0.85, bandwidth_tbps=3.0)
    finally:
        hold_sim.MODELS.clear()
        hold_sim.MODELS.update(saved)


def test_fair_grabs_need_no_holds_and_uneven_ones_do() -> None:
    solo = {n: hold_sim.simulate([n], 1.0, 1.0, bandwidth_tbps=3.0)[n]["gap_mean_ms"] for n in NAMES}
    fair = _together(hold_sim.fair_grabs(NAMES))
    speeds = [solo[n] / fair[n]["gap_mean_ms"] for n in NAMES]
    assert max(speeds) / min(speeds) < 1.03
    assert all(fair[n]["held_share"] < 0.01 for n in NAMES)
    # the fitted grabs: the 8Bs take more than their split, so they are held back (the 1B never is)
    fitted = _together({n: hold_sim.MODELS[n][2] for n in NAMES})
    assert fitted["8b-1"]["held_share"] > 0.01 and fitted["8b-2"]["held_share"] > 0.01
    assert fitted["1b"]["held_share"] < 0.005
    # 3.0 TB/s over the sum of the solo rates: every model near that equal share
    share = 3.0 / sum(hold_sim.MODELS[n][1] for n in NAMES)
    assert all(abs(s / share - 1.0) < 0.05 for s in speeds)


def test_the_benchs_clients_send_their_first_prompts_together_one_carried_per_step() -> None:
    solo_ms = hold_sim.MODELS["8b-1"][0]
    alone = hold_sim.simulate(["8b-1"], 1.0, 1.0, bandwidth_tbps=3.0, clients=True)["8b-1"]
    # eight prompts at the start, one per step: the last waits about seven steps after the first is taken
    assert 6 * solo_ms <= alone["prompt_wait_ms"]["max"] <= 9 * solo_ms
    # taken in turns beside the others, a prompt waits for the others' prompt steps too
    free = hold_sim.simulate(NAMES, 1.0, 2.0, 0.85, bandwidth_tbps=3.0, clients=True)
    turns = hold_sim.simulate(NAMES, 1.0, 2.0, 0.85, bandwidth_tbps=3.0, clients=True, one_prompt=True)
    assert turns["1b"]["prompt_wait_ms"]["mean"] > free["1b"]["prompt_wait_ms"]["mean"]
