"""How a collected step counts for fair sharing (host/core.py _accounting): charged its model's solo cost or its
measured time, and whether that time samples the solo cost. A decode step carrying prompt rows in its graph, or
confined to fewer SMs, takes longer alone than the solo decode step and must not raise its estimate. With
LLMHOST_ONE_PROMPT=1 a step takes prompt tokens only in its turn (HostCore._may_take_prompt, PromptTurns)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast
from unittest.mock import patch

import pytest

from llmhost.engine.scheduler import Chunk, StepPlan
from llmhost.host.core import HostCore, _accounting, _Running, _shape
from llmhost.host.prompt_turns import PromptTurns


def _plan(decode_rows: int, prompt_tokens: int = 0, graphed: bool = False) -> StepPlan:
    chunks = [Chunk(f"d{i}", 10, (1,), (0,), True) for i in range(decode_rows)]
    if prompt_tokens:
        chunks.append(Chunk("p", 0, tuple(range(prompt_tokens)), (0,), True))
    return StepPlan(chunks=tuple(chunks), graphed=graphed)


def _run(plan: StepPlan, **flags: bool) -> _Running:
    run = _Running("m", cast(Any, None), plan, _shape(plan), 0.0)
    for k, v in flags.items():
        setattr(run, k, v)
    return run


def test_a_plain_decode_step_alone_samples_its_cost() -> None:
    assert _accounting(_run(_plan(8)), solo_known=True) == (False, True)


def test_a_decode_step_beside_another_is_charged_its_solo_cost_and_is_no_sample() -> None:
    assert _accounting(_run(_plan(8), overlapped=True), solo_known=True) == (True, False)


def test_prompt_rows_riding_the_graph_are_no_sample_but_alone_are_charged_their_time() -> None:
    plan = _plan(5, prompt_tokens=128, graphed=True)
    assert _shape(plan).prefill_tokens == 0  # a decode step to the scheduler
    assert _accounting(_run(plan), solo_known=True) == (False, False)
    assert _accounting(_run(plan, overlapped=True), solo_known=True) == (True, False)


@pytest.mark.parametrize("known", [True, False])
def test_a_confined_decode_step_is_charged_the_whole_gpus_cost_once_known(known: bool) -> None:
    # Before any solo cost is measured its time is all there is: charged and sampled as measured.
    assert _accounting(_run(_plan(8), confined=True), solo_known=known) == ((True, False) if known else (False, True))


def test_an_eager_prompt_step_samples_alone_and_is_shared_beside_another_model() -> None:
    plan = _plan(0, prompt_tokens=128)
    assert _shape(plan).prefill_tokens == 128
    assert _accounting(_run(plan, overlapped=True), solo_known=True) == (False, True)  # beside its own decodes
    assert _accounting(_run(plan, overlapped=True, beside_others=True), solo_known=True) == (True, False)


# An engine with one request waiting for its prompt step (core._next_shape reads its scheduler).
WITH_A_PROMPT = SimpleNamespace(scheduler=SimpleNamespace(running=[], waiting=[object()]))


def _take_ok(name: str, running: list[_Running], turns: PromptTurns | None, now: float = 0.0) -> bool:
    fake_core = cast(Any, type("Core", (), {"_prompt_turns": turns})())
    with patch("time.perf_counter", lambda: now):
        return bool(HostCore._may_take_prompt(fake_core, name, "cuda:0", running, cast(Any, WITH_A_PROMPT)))


def test_with_turns_a_step_takes_prompt_tokens_while_no_other_models_are_in_flight() -> None:
    plain, carrying = _plan(8), _plan(5, prompt_tokens=128, graphed=True)
    eager = _plan(0, prompt_tokens=512)
    others_plain = [_Running("b", cast(Any, None), plain, _shape(plain), 0.0)]
    assert _take_ok("a", others_plain, PromptTurns())
    for prompt in (carrying, eager):
        beside = [*others_plain, _Running("c", cast(Any, None), prompt, _shape(prompt), 0.0)]
        assert not _take_ok("a", beside, PromptTurns())
        assert _take_ok("a", beside, None)  # LLMHOST_ONE_PROMPT unset: no turns
    own = [_Running("a", cast(Any, None), carrying, _shape(carrying), 0.0)]
    assert _take_ok("a", own, PromptTurns())  # its own prompt rows in flight hold nothing back
    turns = PromptTurns(max_wait_s=0.04)
    beside = [_Running("c", cast(Any, None), carrying, _shape(carrying), 0.0)]
    assert not _take_ok("a", beside, turns, now=1.0)
    assert _take_ok("a", beside, turns, now=1.05)  # waited its longest
