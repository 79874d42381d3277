"""GpuScheduler as pure logic: a simulated host loop with fake per-step costs (about the Mistral-7B and Qwen2.5-14B
decode steps at batch 1 on the H100, bench/results/decode-h100.json: 6.4 and 12.1 ms). The simulation keeps its own
ledger of GPU time, so the shares it checks do not come from the scheduler's own arithmetic."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import pytest

from llmhost.host.gpu_scheduler import DEBT_RATE, MAX_DEBT_STEPS, GpuScheduler, StepShape, concurrent_ok

DEV = "cuda:0"
MS = 1e-3
STEP_7B = 6.5 * MS
STEP_14B = 12.0 * MS


def make(weights: dict[str, float], device: str = DEV, lead_steps: float = 1.0) -> GpuScheduler:
    sched = GpuScheduler(lead_steps=lead_steps)
    for name, w in weights.items():
        sched.add(name, device, w)
    return sched


def active_lane(decode_step_s: dict[str, float]) -> GpuScheduler:
    """Models of equal weight, each with its solo 8-row decode step measured, all active (picked among once)."""
    sched = make(dict.fromkeys(decode_step_s, 1.0))
    for m, c in decode_step_s.items():
        sched.observe(m, 8, 0, c)
    sched.pick(DEV, set(decode_step_s))
    return sched


def run(
    sched: GpuScheduler,
    cost: dict[str, float],
    steps: int,
    ready: Callable[[int], set[str]] | None = None,
    device: str = DEV,
) -> tuple[Counter[str], list[str]]:
    """`steps` iterations of the host loop: pick, 'run' the step (its fake cost), charge it. Returns the simulated
    GPU seconds per model and the sequence of picks."""
    used: Counter[str] = Counter()
    picks: list[str] = []
    for i in range(steps):
        now_ready = ready(i) if ready is not None else set(cost)
        m = sched.pick(device, now_ready)
        if m is None:
            continue
        assert m in now_ready
        used[m] += cost[m]
        picks.append(m)
        sched.charge(m, cost[m])
    return used, picks


def fractions(used: Counter[str]) -> dict[str, float]:
    total = sum(used.values())
    return {m: s / total for m, s in used.items()}


# -- fair sharing ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heavy", ["m7b", "m14b"])
def test_weights_3_to_1_give_75_25_of_gpu_time(heavy: str) -> None:
    weights = {"m7b": 1.0, "m14b": 1.0, heavy: 3.0}
    sched = make(weights)
    used, _ = run(sched, {"m7b": STEP_7B, "m14b": STEP_14B}, 2000)
    light = "m14b" if heavy == "m7b" else "m7b"
    share = fractions(used)
    assert share[heavy] == pytest.approx(0.75, abs=0.05)
    assert share[light] == pytest.approx(0.25, abs=0.05)
    # shares() reports the same ledger.
    assert sched.shares(DEV) == pytest.approx(share)


def test_equal_weights_share_equally_despite_step_costs() -> None:
    sched = make({"m7b": 1.0, "m14b": 1.0})
    used, picks = run(sched, {"m7b": STEP_7B, "m14b": STEP_14B}, 2000)
    assert fractions(used)["m7b"] == pytest.approx(0.5, abs=0.05)
    # Equal time means the cheaper model takes more steps (alternation would give it 35% of the time).
    assert picks.count("m7b") > 1.5 * picks.count("m14b")


def test_three_models_share_by_weight() -> None:
    weights = {"a": 1.0, "b": 2.0, "c": 3.0}
    sched = make(weights)
    used, _ = run(sched, {"a": 5 * MS, "b": 9 * MS, "c": 14 * MS}, 3000)
    share = fractions(used)
    for name, w in weights.items():
        assert share[name] == pytest.approx(w / 6.0, abs=0.05)


def test_model_idle_then_ready_gets_no_burst() -> None:
    sched = make({"m7b": 1.0, "m14b": 1.0})
    cost = {"m7b": STEP_7B, "m14b": STEP_14B}
    # m14b has nothing to do for 1000 steps: m7b takes the whole GPU.
    used, _ = run(sched, cost, 1000, ready=lambda i: {"m7b"})
    assert set(used) == {"m7b"}
    assert sched.pick(DEV, set()) is None  # a moment with nothing to do at all
    # Then both are ready: m14b's share of the next window is its fair half, not a catch-up of the idle time.
    used, picks = run(sched, cost, 150)
    assert fractions(used)["m14b"] == pytest.approx(0.5, abs=0.05)
    # ...from the start of the window too: no run of m14b steps longer than fairness needs (12 ms vs 6.5 ms).
    runs = "".join("b" if p == "m14b" else "a" for p in picks)
    assert "bbb" not in runs[:40]


def test_idle_weighted_model_gets_its_weight_share_when_back() -> None:
    sched = make({"heavy": 3.0, "light": 1.0})
    cost = {"heavy": STEP_7B, "light": STEP_14B}
    run(sched, cost, 500, ready=lambda i: {"light"})
    used, _ = run(sched, cost, 400)
    assert fractions(used)["heavy"] == pytest.approx(0.75, abs=0.05)


def test_intermittent_model_is_served_and_takes_no_share_while_idle() -> None:
    """b is ready every other step only (lifted level with a each time): it is not passed over on ties, and a
    takes every step b leaves."""
    sched = make({"a": 1.0, "b": 1.0})
    used, picks = run(sched, {"a": STEP_7B, "b": STEP_7B}, 1000, ready=lambda i: {"a", "b"} if i % 2 else {"a"})
    assert len(picks) == 1000
    assert fractions(used)["b"] == pytest.approx(0.5, abs=0.05)


def test_single_ready_model_is_always_picked() -> None:
    sched = make({"a": 1.0, "b": 1.0})
    sched.charge("a", 100.0)  # a is far ahead of b, but b has nothing to do
    for _ in range(10):
        assert sched.pick(DEV, {"a"}) == "a"
        sched.charge("a", STEP_7B)
    assert sched.pick(DEV, set()) is None
    assert sched.pick("cuda:7", {"a"}) is None  # a lives on cuda:0


def test_busy_model_is_not_a_candidate_and_keeps_its_credit() -> None:
    sched = make({"b": 1.0, "a": 1.0, "c": 1.0})
    assert sched.pick(DEV, {"a", "b", "c"}) == "b"  # all even: the earliest added
    sched.charge("b", 1.0)
    assert sched.pick(DEV, {"a", "b", "c"}) == "a"
    # a's step is in flight on a side stream while the default stream takes the next pick.
    assert sched.pick(DEV, {"b", "c"}, busy={"a"}) == "c"
    sched.charge("c", 3.0)
    sched.charge("a", 0.5)
    # a had work all along: it keeps its lead over b rather than being lifted level with b (as a model back from
    # idle would be, and then lose the tie to b, picked less recently).
    assert sched.pick(DEV, {"a", "b", "c"}) == "a"


def test_devices_are_independent() -> None:
    sched = GpuScheduler()
    sched.add("a", "cuda:0", 1.0)
    sched.add("b", "cuda:0", 1.0)
    sched.add("c", "cuda:1", 5.0)
    sched.charge("c", 10.0)
    assert sched.pick("cuda:0", {"a", "b", "c"}) == "a"
    assert sched.pick("cuda:1", {"a", "b", "c"}) == "c"
    assert set(sched.shares("cuda:0")) == {"a", "b"}
    assert sched.shares("cuda:1") == {"c": 1.0}
    assert sched.shares("cuda:2") == {}


def test_remove_and_add_again() -> None:
    sched = make({"a": 1.0, "b": 1.0, "c": 1.0})
    run(sched, {"a": STEP_7B, "b": STEP_7B, "c": STEP_7B}, 300)
    sched.remove("b")
    assert set(sched.shares(DEV)) == {"a", "c"}
    with pytest.raises(KeyError, match="'b'"):
        sched.pick(DEV, {"a", "b"})
    with pytest.raises(KeyError):
        sched.charge("b", 1.0)
    used, _ = run(sched, {"a": STEP_7B, "c": STEP_14B}, 400)
    assert fractions(used)["a"] == pytest.approx(0.5, abs=0.05)
    # Added again, b starts with no credit: its share of the next window is its third, not a burst.
    sched.add("b", DEV, 1.0)
    assert sched.gpu_seconds("b") == 0.0
    used, _ = run(sched, {"a": STEP_7B, "b": STEP_7B, "c": STEP_14B}, 300)
    assert fractions(used)["b"] == pytest.approx(1 / 3, abs=0.05)


def test_bad_input_is_refused() -> None:
    sched = make({"a": 1.0})
    with pytest.raises(ValueError, match="already"):
        sched.add("a", "cuda:1", 1.0)
    for w in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight"):
            sched.add("z", DEV, w)
    with pytest.raises(ValueError):
        sched.charge("a", -1.0)
    with pytest.raises(ValueError):
        sched.observe("a", 1, -1, 0.1)
    with pytest.raises(ValueError, match="cuda:0"):
        sched.prefill_budget("a", "cuda:1")


# -- prefill chunking -----------------------------------------------------------------------------------------------

PER_TOKEN_14B = 60e-6  # s/token: Qwen2.5-14B prefill, 16.7k tokens/s on the H100 (decode-h100.json)
ENGINE_CHUNK = 512  # DEFAULT_PREFILL_CHUNK: what the engine takes when nothing limits it


def linear_cost(decode_s: float, per_token_s: float) -> Callable[[int], float]:
    return lambda tokens: decode_s + per_token_s * tokens


def roofline_cost(decode_s: float, per_token_s: float) -> Callable[[int], float]:
    """A step takes the longer of reading the weights (the decode step) and computing its tokens."""
    return lambda tokens: max(decode_s, per_token_s * tokens)


def prefill_beside_decode(
    cost: Callable[[int], float], prompt: int, budgeted: bool = True
) -> tuple[list[tuple[int, float]], int]:
    """The 14B prefills a `prompt`-token prompt while the 7B decodes, equal weights. Returns each 14B prefill
    step as (tokens, seconds) and the number of 7B steps meanwhile."""
    sched = make({"m7b": 1.0, "m14b": 1.0})
    left = prompt
    steps: list[tuple[int, float]] = []
    decodes = 0
    while left > 0:
        m = sched.pick(DEV, {"m7b", "m14b"})
        if m == "m7b":
            sched.charge(m, STEP_7B)
            sched.observe(m, 1, 0, STEP_7B)
            decodes += 1
            continue
        assert m == "m14b"
        budget = sched.prefill_budget(m, DEV) if budgeted else None
        tokens = min(left, ENGINE_CHUNK, budget if budget is not None else ENGINE_CHUNK)
        seconds = cost(tokens)
        sched.charge(m, seconds)
        sched.observe(m, 0, tokens, seconds)
        steps.append((tokens, seconds))
        left -= tokens
    return steps, decodes


def test_prefill_budget_bounds_the_stall_of_another_models_decode() -> None:
    cost = linear_cost(STEP_14B, PER_TOKEN_14B)
    steps, decodes = prefill_beside_decode(cost, 4096)
    # Each prefill step delays the 7B by at most one of its decode steps beyond the 14B's own step time.
    for tokens, seconds in steps:
        assert seconds - STEP_14B <= STEP_7B + 1e-12, (tokens, seconds)
    # ...and the chunks are as large as that allows (6.5 ms / 60 us = 108 tokens) once the slope is measured.
    chunks = [t for t, _ in steps]
    assert chunks[0] == 16  # never prefilled: a floor-sized measurement first
    assert max(chunks) == 108
    assert sum(chunks) == 4096 and decodes > 0
    # Without the budget the engine's 512-token chunks stall the 7B for 4.7 of its steps.
    unbudgeted, _ = prefill_beside_decode(cost, 4096, budgeted=False)
    assert max(s for _, s in unbudgeted) - STEP_14B > 4 * STEP_7B


@pytest.mark.parametrize("decoded_before", [True, False])
def test_prefill_budget_never_overshoots_when_cost_is_a_roofline(decoded_before: bool) -> None:
    """Small chunks are memory-bound (free tokens, slope 0), large ones compute-bound: the budget must grow through
    the free region without jumping past the knee."""
    cost = roofline_cost(STEP_14B, PER_TOKEN_14B)
    sched = make({"m7b": 1.0, "m14b": 1.0})
    if decoded_before:
        sched.observe("m14b", 1, 0, STEP_14B)
    sched.observe("m7b", 1, 0, STEP_7B)
    sched.pick(DEV, {"m7b", "m14b"})
    chunks, seconds = [], []
    for _ in range(40):
        budget = sched.prefill_budget("m14b", DEV)
        assert budget is not None
        tokens = min(budget, ENGINE_CHUNK)
        chunks.append(tokens)
        seconds.append(cost(tokens))
        sched.observe("m14b", 0, tokens, seconds[-1])
    assert all(s - STEP_14B <= STEP_7B + 1e-12 for s in seconds)
    assert chunks[:3] == sorted(chunks[:3]) and chunks[2] > chunks[0]  # growing through the memory-bound sizes
    # Settles where the step is one 7B step longer than the 14B's decode step: (12 + 6.5) ms / 60 us = 308 tokens.
    assert chunks[-1] == pytest.approx(308, rel=0.05)


def test_prefill_budget_is_none_alone_or_unmeasured() -> None:
    sched = make({"a": 1.0, "b": 1.0})
    sched.observe("a", 0, 512, 0.03)
    assert sched.pick(DEV, {"a"}) == "a"
    assert sched.prefill_budget("a", DEV) is None  # nothing else ready
    sched.pick(DEV, {"a", "b"})
    assert sched.prefill_budget("a", DEV) is None  # b ready but its decode step never measured
    sched.observe("b", 1, 0, STEP_7B)
    assert sched.prefill_budget("a", DEV) is not None
    sched.pick(DEV, {"a"})  # b went idle again
    assert sched.prefill_budget("a", DEV) is None


def test_prefill_budget_floor_and_proportional_growth() -> None:
    sched = make({"a": 1.0, "b": 1.0})
    sched.observe("b", 1, 0, 0.1 * MS)  # a very fast decoder beside a
    sched.pick(DEV, {"a", "b"})
    assert sched.prefill_budget("a", DEV) == 16  # a never prefilled
    sched.observe("a", 1, 0, STEP_14B)
    sched.observe("a", 0, 512, STEP_14B + 512 * PER_TOKEN_14B)
    assert sched.prefill_budget("a", DEV) == 16  # 0.1 ms buys 2 tokens: the floor keeps the prompt moving
    # Tokens that cost nothing measurable (a memory-bound chunk) let the chunk grow only in proportion:
    # 64 tokens x (12 + 6.5) ms / 12 ms = 98 tokens, a step of at most 18.5 ms if time per token does not grow.
    sched2 = make({"a": 1.0, "b": 1.0})
    sched2.observe("b", 1, 0, STEP_7B)
    sched2.observe("a", 1, 0, STEP_14B)
    sched2.observe("a", 0, 64, STEP_14B)
    sched2.pick(DEV, {"a", "b"})
    assert sched2.prefill_budget("a", DEV) == 98


# -- streams --------------------------------------------------------------------------------------------------------


def test_concurrent_for_small_decode_steps_and_one_prompt_step() -> None:
    assert concurrent_ok(StepShape(1, 0), StepShape(8, 0))
    assert not concurrent_ok(StepShape(1, 0), StepShape(9, 0))
    assert concurrent_ok(StepShape(1, 0), StepShape(0, 16)), "a prompt step runs beside decodes"
    assert concurrent_ok(StepShape(1, 16), StepShape(1, 0))
    assert not concurrent_ok(StepShape(1, 16), StepShape(9, 0)), "the decode beside it must still be small"
    assert not concurrent_ok(StepShape(0, 16), StepShape(2, 32)), "two prompt steps never overlap"
    assert not concurrent_ok(StepShape(0, 0), StepShape(1, 0))


def beside(
    sched: GpuScheduler, first: str, second: str, first_shape: StepShape | None = None, prompt: bool = False
) -> bool:
    """Whether `second` may start beside `first`'s step (of `first_shape`, a decode step by default) in flight."""
    cost = sched.expected_step_s(first, first_shape or StepShape(1, 0))
    return sched.launch_ok(second, {first: cost}, prompt=prompt)


def run_overlapped(
    sched: GpuScheduler, cost: dict[str, float], pair_s: float, iterations: int
) -> tuple[Counter[str], float, int]:
    """The host loop with two streams (core.py _step/_peek_second): pick the first model, let the second step
    beside it when `launch_ok`, charge overlapped steps their solo cost and feed the estimates as the host does.
    Wall time: a pair takes `pair_s`, a lone step its cost. Returns the steps per model, the wall seconds and the
    number of overlapped pairs."""
    steps: Counter[str] = Counter()
    wall = 0.0
    pairs = 0
    for _ in range(iterations):
        first = sched.pick(DEV, set(cost))
        assert first is not None
        rest = set(cost) - {first}
        second = sched.pick(DEV, rest, busy=[first]) if rest else None
        if second is not None and not beside(sched, first, second):
            second = None
        ran = [first] if second is None else [first, second]
        wall += cost[first] if second is None else pair_s
        pairs += second is not None
        for m in ran:
            steps[m] += 1
            overlapped = second is not None
            solo = sched.solo_step_s(m) if overlapped else None
            sched.charge(m, solo if solo is not None else cost[m])
            sched.observe(m, 1, 0, pair_s if overlapped else cost[m], overlapped)
    return steps, wall, pairs


@pytest.mark.parametrize("weights", [(1.0, 1.0), (3.0, 1.0), (1.0, 3.0)])
def test_overlapped_steps_share_normalized_speed_by_weight(weights: tuple[float, float]) -> None:
    """Two models overlapping on two streams: each one's normalized speed (steps x solo cost over wall time, its
    speed together over alone) follows the weights, and overlap still happens (the pair beats stepping in turn).
    Before the fix every iteration ran both, one step each whatever the weights."""
    cost = {"m7b": STEP_7B, "m14b": STEP_14B}
    sched = make(dict(zip(cost, weights, strict=True)))
    pair_s = 14.0 * MS  # a pair of overlapped decode steps: longer than the 14B's alone, shorter than both
    steps, wall, pairs = run_overlapped(sched, cost, pair_s, 3000)
    normalized = {m: steps[m] * cost[m] / wall for m in cost}
    assert normalized["m7b"] / normalized["m14b"] == pytest.approx(weights[0] / weights[1], rel=0.05)
    assert pairs > 300
    assert sum(normalized.values()) > 1.05


def test_overlap_waits_for_solo_costs_and_overlapped_steps_leave_them() -> None:
    sched = make({"a": 1.0, "b": 1.0})
    sched.pick(DEV, {"a", "b"})
    assert not beside(sched, "a", "b"), "no solo cost measured yet: step one after the other"
    sched.observe("a", 1, 0, STEP_7B)
    sched.observe("b", 1, 0, STEP_14B)
    assert beside(sched, "a", "b")
    sched.observe("a", 1, 0, 30 * MS, overlapped=True)
    assert sched.solo_step_s("a") == pytest.approx(STEP_7B)
    sched.charge("b", 10 * STEP_14B)
    assert not beside(sched, "a", "b"), "b is ahead by more than a's step"


def test_launch_waits_for_every_lagging_model_not_just_one_step_in_flight() -> None:
    """Two 8Bs level with each other and a 3B 20 ms behind: an 8B may not start beside the other 8B's step while
    the 3B's step ends far below its virtual time. Judged against any one step in flight, the two 8Bs let each
    other start again and again and drifted 75 ms ahead of the 3B, then both stopped ~100 ms while it caught up."""
    sched = active_lane({"8b-1": 6.4 * MS, "8b-2": 6.4 * MS, "3b": 3.3 * MS})
    sched.charge("8b-1", 20 * MS)
    sched.charge("8b-2", 20 * MS)
    in_flight = {"8b-1": 6.4 * MS, "3b": 3.3 * MS}
    assert not sched.launch_ok("8b-2", in_flight), "the 3B's step ends 16.7 ms below the 8B's virtual time"
    assert not sched.launch_ok("8b-2", {"8b-1": 6.4 * MS}), "the 3B, ready with no step in flight: its next step"
    sched.charge("3b", 17 * MS)
    assert sched.launch_ok("8b-2", in_flight), "caught up: within the end of the 3B's step"


def test_the_blocker_is_the_model_a_held_one_waits_for_longest() -> None:
    """SM steering's evidence: the 8B ahead of both others waits for the 1B, whose bound is the smallest it passes;
    once the 1B caught up it waits for the 3B; a model within every bound waits for none."""
    sched = active_lane({"8b": 5.0 * MS, "3b": 3.0 * MS, "1b": 1.0 * MS})
    sched.charge("8b", 20 * MS)
    sched.charge("3b", 15 * MS)
    sched.charge("1b", 10 * MS)
    in_flight = {"3b": 3.0 * MS, "1b": 1.0 * MS}
    assert sched.blocker("8b", in_flight) == "1b", "bounds: 3b 18 ms, 1b 11 ms; the 8B is at 20 ms"
    sched.charge("1b", 15 * MS)
    assert sched.blocker("8b", in_flight) == "3b", "1b's bound now 26 ms: only the 3B's, 18 ms, holds it"
    assert sched.blocker("3b", {"1b": 1.0 * MS}) is None and sched.launch_ok("3b", {"1b": 1.0 * MS}), "the last"


def test_a_lead_of_two_steps_lets_a_model_start_one_of_its_own_steps_past_a_bound() -> None:
    """lead_steps 2 (the LLMHOST_LEAD_STEPS experiment): the 8B may start up to one 8B step (5 ms) past the 1B's
    bound, not further; the 1B's own slack is one 1B step."""
    sched = GpuScheduler(lead_steps=2.0)
    for m in ("8b", "1b"):
        sched.add(m, DEV, 1.0)
    sched.observe("8b", 8, 0, 5.0 * MS)
    sched.observe("1b", 8, 0, 1.0 * MS)
    sched.pick(DEV, {"8b", "1b"})
    sched.charge("1b", 10 * MS)  # its bound: 11 ms
    sched.charge("8b", 15 * MS)
    assert sched.launch_ok("8b", {"1b": 1.0 * MS}) and sched.blocker("8b", {"1b": 1.0 * MS}) is None, "4 ms past"
    sched.charge("8b", 2 * MS)
    assert not sched.launch_ok("8b", {"1b": 1.0 * MS}), "6 ms past its bound: more than one 8B step"
    assert sched.blocker("8b", {"1b": 1.0 * MS}) == "1b"
    assert not make({"8b": 1.0, "1b": 1.0}).lead_steps > 1.0, "the default is start-time fair queuing's bound"
    with pytest.raises(ValueError, match="lead_steps"):
        GpuScheduler(lead_steps=0.5)


def test_a_lagging_models_bound_moves_on_while_its_step_runs() -> None:
    """An 8B 5 ms ahead of a 3B whose step is in flight may not start while that step has just begun (its bound
    is the step's end); once the host reckons the 3B's step mostly run (`done_s`), its bound is one decode step
    past that, and the 8B may start without waiting for the 3B's collection. The lead stays bounded: never more
    than one step past what has run."""
    sched = make({"8b": 1.0, "3b": 1.0})
    sched.observe("8b", 8, 0, 6.4 * MS)
    sched.observe("3b", 8, 0, 3.3 * MS)
    sched.pick(DEV, {"8b", "3b"})
    sched.charge("8b", 25 * MS)
    sched.charge("3b", 20 * MS)
    in_flight = {"3b": 3.3 * MS}
    assert not sched.launch_ok("8b", in_flight), "5 ms ahead, the 3B's step ends 3.3 ms past its virtual time"
    assert not sched.launch_ok("8b", in_flight, done_s={"3b": 0.5 * MS}), "0.5 + 3.3 ms: still short"
    assert sched.launch_ok("8b", in_flight, done_s={"3b": 2.0 * MS}), "2.0 + 3.3 ms reaches 5 ms"
    assert sched.follow_ok("8b", {"8b": 6.4 * MS, "3b": 3.3 * MS}, done_s={"3b": 3.3 * MS}) is False, (
        "following would start 11.4 ms ahead: more than one 3B step past all of its step"
    )


def test_launch_bound_prefill_takes_the_whole_chunk() -> None:
    """When even a floor-sized prefill step costs far more than a decode step (the eager path's per-kernel launch
    cost), no chunk size keeps another model's stall to one decode step: the budget is lifted, so the prompt is
    done in few steps instead of many equally long ones."""
    s = GpuScheduler()
    s.add("small", "cuda:0")
    s.add("big", "cuda:0")
    s.observe("small", 8, 0, 0.0065)
    s.observe("big", 8, 0, 0.010)
    s.pick("cuda:0", ["small", "big"])
    assert s.prefill_budget("big", "cuda:0") == 16  # never prefilled: a floor-sized measurement first
    s.observe("big", 8, 16, 0.045)  # 16 prompt tokens beside its decode rows: +35 ms, fixed cost
    assert s.prefill_budget("big", "cuda:0") is None
    t = GpuScheduler()  # the same, but a cheap prefill step keeps the bound
    t.add("small", "cuda:0")
    t.add("big", "cuda:0")
    t.observe("small", 8, 0, 0.0065)
    t.observe("big", 8, 0, 0.010)
    t.pick("cuda:0", ["small", "big"])
    t.observe("big", 8, 16, 0.011)
    budget = t.prefill_budget("big", "cuda:0")
    assert budget is not None and 16 <= budget < 512


def test_expected_step_cost_from_the_measured_estimates() -> None:
    sched = make({"a": 1.0})
    assert sched.expected_step_s("a", StepShape(4, 0)) == 0.0, "nothing measured yet"
    sched.observe("a", 0, 64, 8 * MS)  # a prompt first: only its size and time are known
    assert sched.expected_step_s("a", StepShape(0, 128)) == pytest.approx(16 * MS)
    sched.observe("a", 4, 0, 2 * MS)
    sched.observe("a", 4, 100, 12 * MS)  # 100 tokens add 10 ms to the 2 ms decode step
    assert sched.expected_step_s("a", StepShape(4, 0)) == pytest.approx(2 * MS)
    assert sched.expected_step_s("a", StepShape(4, 50)) == pytest.approx(7 * MS)


def test_overlap_beside_a_prompt_step_counts_its_whole_length() -> None:
    """A 1B model's 20 ms prompt step: a model 5 ms ahead of it may start beside it (judged by the 1B's 2 ms
    decode step it could not, and the GPU ran the prompt alone)."""
    sched = make({"small": 1.0, "big": 1.0})
    sched.observe("small", 8, 0, 2 * MS)
    sched.observe("small", 8, 384, 20 * MS)
    sched.observe("big", 8, 0, STEP_7B)
    sched.pick(DEV, {"small", "big"})
    sched.charge("big", 5 * MS)
    prompt = StepShape(4, 384)
    assert not beside(sched, "small", "big"), "beyond the end of small's decode step"
    assert beside(sched, "small", "big", prompt)
    assert beside(sched, "small", "big", StepShape(8, 0)) == beside(sched, "small", "big")
    sched.charge("big", 30 * MS)
    assert not beside(sched, "small", "big", prompt), "beyond the end of the prompt step too"


def test_follow_ok_keeps_each_model_within_the_others_current_step() -> None:
    sched = make({"a": 1.0, "b": 1.0})
    sched.pick(DEV, {"a", "b"})
    assert not sched.follow_ok("a", {"a": STEP_7B, "b": STEP_14B}), "no solo cost measured yet"
    sched.observe("a", 1, 0, STEP_7B)
    sched.observe("b", 1, 0, STEP_14B)
    in_flight = {"a": STEP_7B, "b": STEP_14B}
    assert sched.follow_ok("a", in_flight), "a's next step starts before b's step ends"
    assert not sched.follow_ok("b", in_flight), "b's next step would start after a's step ends"
    assert not sched.follow_ok("a", {"b": STEP_14B}), "a has no step in flight to follow"
    sched.charge("a", 2 * STEP_14B)
    assert not sched.follow_ok("a", in_flight), "a is ahead: it waits for the scheduler's pick"
    assert sched.follow_ok("b", in_flight)


@pytest.mark.parametrize("lead_steps", [1.0, 2.0])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (3.0, 1.0), (1.0, 3.0)])
def test_following_steps_keep_the_weights(weights: tuple[float, float], lead_steps: float) -> None:
    """The host's loop (core.py _step, _launch_beside, _run_ahead) over two decode-only models in an event
    simulation: a step takes its solo cost alone, `slowdown` times it while the other stream runs too. After each
    collection: launch a ready model by pick (beside a step in flight only if launch_ok), then let each model
    with one step in flight queue the next behind it if follow_ok. Charged at solo cost, normalized progress
    still follows the weights, and most steps follow (their stream never idles); with the lead of two steps
    (the LLMHOST_LEAD_STEPS experiment) too."""
    cost = {"m7b": STEP_7B, "m14b": STEP_14B}
    sched = make(dict(zip(cost, weights, strict=True)), lead_steps=lead_steps)
    for m, c in cost.items():
        sched.observe(m, 1, 0, c)
    slowdown = 1.8
    queue: dict[str, list[float]] = {m: [] for m in cost}  # per stream: end times of its steps in flight
    steps: Counter[str] = Counter()
    followed = 0
    now = 0.0

    def launch(m: str, after: float) -> None:
        other = next(n for n in cost if n != m)
        queue[m].append(after + cost[m] * (slowdown if queue[other] else 1.0))

    def host_pass() -> int:
        ready = [n for n in cost if not queue[n]]
        busy = [n for n in cost if queue[n]]
        while ready:
            pick = sched.pick(DEV, ready, busy=busy)
            if pick is None or (busy and not sched.launch_ok(pick, {b: cost[b] * len(queue[b]) for b in busy})):
                break
            launch(pick, now)
            ready.remove(pick)
            busy.append(pick)
        follows = 0
        in_flight = {n: cost[n] * len(queue[n]) for n in cost if queue[n]}
        for n in list(in_flight):
            if len(queue[n]) == 1 and sched.follow_ok(n, in_flight):
                launch(n, queue[n][0])
                in_flight[n] += cost[n]
                follows += 1
        return follows

    host_pass()
    for _ in range(4000):
        m = min((n for n in cost if queue[n]), key=lambda n: queue[n][0])
        now = queue[m].pop(0)
        steps[m] += 1
        sched.charge(m, cost[m])
        followed += host_pass()
    normalized = {m: steps[m] * cost[m] / now for m in cost}
    assert normalized["m7b"] / normalized["m14b"] == pytest.approx(weights[0] / weights[1], rel=0.1)
    assert followed > 0.5 * sum(steps.values())


def test_prompt_steps_beside_other_models_are_charged_their_solo_cost() -> None:
    """A 1B model's 128-token prompt step takes ~3 ms alone (beside its own decode steps) and 33 ms beside three
    decoding models: the 33 ms is no sample of its cost, and the host charges it the solo 3 ms, so the model is
    not held back ~30 ms afterwards while the others catch up (its decoding requests' token gaps)."""
    sched = make({"small": 1.0, "big": 1.0})
    assert sched.solo_step_s("small", StepShape(0, 128)) is None, "nothing measured"
    sched.observe("small", 8, 0, 1.5 * MS)
    sched.observe("big", 8, 0, 6 * MS)
    assert sched.solo_step_s("small", StepShape(0, 128)) is None, "no prompt step measured alone yet"
    sched.observe("small", 0, 128, 33 * MS, overlapped=True)
    assert sched.solo_step_s("small", StepShape(0, 128)) is None, "an overlapped prompt step is no solo sample"
    sched.observe("small", 0, 128, 3 * MS)  # alone: 1.5 ms of decode cost + 128 tokens x 11.7 us
    assert sched.solo_step_s("small", StepShape(0, 128)) == pytest.approx(3 * MS)
    assert sched.solo_step_s("small", StepShape(0, 256)) == pytest.approx(4.5 * MS)
    sched.observe("small", 0, 128, 33 * MS, overlapped=True)
    assert sched.solo_step_s("small", StepShape(0, 128)) == pytest.approx(3 * MS), "overlapped: unchanged"
    assert sched.solo_step_s("small") == pytest.approx(1.5 * MS)
    # Charged its solo cost, the model stays within the big model's next decode step: it may step beside it.
    sched.pick(DEV, {"small", "big"})
    sched.charge("small", sched.solo_step_s("small", StepShape(0, 128)) or 0.0)
    assert beside(sched, "big", "small")
    sched.charge("small", 30 * MS)  # charged the 33 ms instead, it would wait five of the big model's steps
    assert not beside(sched, "big", "small")


def test_a_prompt_step_may_start_beside_others_before_its_model_was_measured() -> None:
    """A model loaded beside a busy one starts with its prompt: it must not wait for the busy one to run out of
    work. Its decode steps (charged their solo cost when overlapped) still wait for a measurement."""
    sched = make({"busy": 1.0, "new": 1.0})
    sched.observe("busy", 8, 0, STEP_7B)
    sched.pick(DEV, {"busy", "new"})
    assert beside(sched, "busy", "new", prompt=True)
    assert not beside(sched, "busy", "new")
    assert not beside(sched, "new", "busy"), "nothing starts beside a step of unknown cost"
    sched.observe("new", 0, 128, 20 * MS, overlapped=True)  # its first prompt step, beside the busy model
    budget = sched.prefill_budget("new", DEV)
    assert budget is not None and budget >= 16


def test_a_prompt_steps_charge_is_spread_over_the_models_next_steps() -> None:
    """An 8B model's 14 ms prompt step beside a 1B's decode steps: charged at once, it put the 8B 14 ms ahead and
    its decoding requests stopped until the 1B caught up; spread, the 8B stays eligible and repays it at DEBT_RATE
    of each later step's cost, and its GPU seconds count in full at once."""
    sched = make({"big": 1.0, "small": 1.0})
    sched.observe("big", 8, 0, 6 * MS)
    sched.observe("small", 8, 0, 1.5 * MS)
    sched.pick(DEV, {"big", "small"})
    sched.charge("big", 14 * MS, spread=True)
    assert sched.gpu_seconds("big") == pytest.approx(14 * MS)
    assert beside(sched, "small", "big"), "still within the small model's step"
    vtimes = []
    steps = math.ceil(14 / (DEBT_RATE * 6))  # until all of it is repaid
    for _ in range(steps):
        sched.charge("big", 6 * MS)
        vtimes.append(sched._accounts["big"].vtime)
    assert vtimes[0] == pytest.approx((6 + DEBT_RATE * 6) * MS), "the first step after it repays DEBT_RATE of its cost"
    assert vtimes[-1] == pytest.approx((steps * 6 + 14) * MS), "all of it repaid: the steps + the prompt"
    # At most MAX_DEBT_STEPS decode steps stay outstanding: a larger prompt counts its excess at once.
    before = sched._accounts["big"].vtime
    sched.charge("big", 200 * MS, spread=True)
    assert sched._accounts["big"].vtime == pytest.approx(before + 200 * MS - MAX_DEBT_STEPS * 6 * MS)


def test_weights_hold_with_spread_prompt_charges() -> None:
    """Every fifth step of `a` is a prompt step costing four decode steps, its charge spread: weights 3:1 still give
    75/25 +- 5% of the GPU seconds (the debt is bounded and repaid; dropped, `a` would take 86%)."""
    sched = make({"a": 3.0, "b": 1.0})
    cost = {"a": 2 * MS, "b": 6 * MS}
    steps = {"a": 0, "b": 0}
    for m in cost:
        sched.observe(m, 8, 0, cost[m])
    for _ in range(4000):
        m = sched.pick(DEV, {"a", "b"})
        assert m is not None
        steps[m] += 1
        prompt = m == "a" and steps[m] % 5 == 0
        sched.charge(m, 4 * cost[m] if prompt else cost[m], spread=prompt)
    shares = sched.shares(DEV)
    assert shares["a"] == pytest.approx(0.75, abs=0.05)
    assert shares["b"] == pytest.approx(0.25, abs=0.05)


def test_lead_is_the_distance_past_the_mean_of_the_others_with_steps_in_flight() -> None:
    sched = active_lane({"a": STEP_7B, "b": STEP_14B, "c": STEP_7B})
    sched.charge("a", 30 * MS)
    sched.charge("b", 12 * MS)
    assert sched.lead("a", {}) == pytest.approx(24 * MS)  # 30 - mean(12, 0)
    assert sched.lead("c", {}) == pytest.approx(-21 * MS)
    # b's step in flight will be charged: it counts already, for b itself and for the others.
    assert sched.lead("b", {"b": STEP_14B}) == pytest.approx(24 * MS - 15 * MS)
    assert sched.lead("a", {"b": STEP_14B}) == pytest.approx(30 * MS - 12 * MS)
    alone = make({"a": 1.0})
    alone.pick(DEV, {"a"})
    assert alone.lead("a", {}) is None
