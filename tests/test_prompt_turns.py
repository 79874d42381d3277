"""PromptTurns: one model's prompt work at a time on a GPU, in the order the models began waiting, and never a
wait longer than max_wait_s (the plain rule starved one 8B's prompts for a whole bench window)."""

from __future__ import annotations

import pytest

from llmhost.host.prompt_turns import PromptTurns

DEV = "cuda:0"


def test_a_model_takes_its_prompt_while_no_other_is_in_flight() -> None:
    turns = PromptTurns(max_wait_s=0.04)
    assert turns.may_take(DEV, "1b", pending=True, others_prompting=False, now=0.0)
    assert turns.waiting(DEV) == ()


def test_beside_another_models_prompt_it_waits_and_keeps_its_place() -> None:
    turns = PromptTurns(max_wait_s=0.04)
    assert not turns.may_take(DEV, "8b-1", pending=True, others_prompting=True, now=0.000)
    assert not turns.may_take(DEV, "1b", pending=True, others_prompting=True, now=0.005)
    assert turns.waiting(DEV) == ("8b-1", "1b")
    # The other's prompt is done: the 1B asks first, but the 8B has waited longer and goes first.
    assert not turns.may_take(DEV, "1b", pending=True, others_prompting=False, now=0.010)
    assert turns.may_take(DEV, "8b-1", pending=True, others_prompting=False, now=0.011)
    assert turns.waiting(DEV) == ("1b",)
    assert not turns.may_take(DEV, "1b", pending=True, others_prompting=True, now=0.012)  # the 8B's in flight
    assert turns.may_take(DEV, "1b", pending=True, others_prompting=False, now=0.030)


def test_a_newcomer_waits_behind_those_already_waiting() -> None:
    turns = PromptTurns(max_wait_s=0.04)
    assert not turns.may_take(DEV, "8b-1", pending=True, others_prompting=True, now=0.0)
    assert not turns.may_take(DEV, "3b", pending=True, others_prompting=False, now=0.01)
    assert turns.waiting(DEV) == ("8b-1", "3b")


def test_no_wait_outlasts_max_wait_s() -> None:
    turns = PromptTurns(max_wait_s=0.04)
    assert not turns.may_take(DEV, "8b-1", pending=True, others_prompting=True, now=0.0)
    for t in (0.01, 0.02, 0.039):
        assert not turns.may_take(DEV, "8b-1", pending=True, others_prompting=True, now=t)
    assert turns.may_take(DEV, "8b-1", pending=True, others_prompting=True, now=0.04)


def test_a_model_that_stopped_asking_loses_its_place() -> None:
    turns = PromptTurns(max_wait_s=0.04)
    assert not turns.may_take(DEV, "a", pending=True, others_prompting=True, now=0.0)
    # a went idle; b asks 50 ms later with nothing in flight: a's old place holds nobody back
    assert turns.may_take(DEV, "b", pending=True, others_prompting=False, now=0.05)
    assert turns.waiting(DEV) == ()


def test_nothing_pending_never_waits_and_leaves_the_queue() -> None:
    turns = PromptTurns()
    assert not turns.may_take(DEV, "a", pending=True, others_prompting=True, now=0.0)
    assert turns.may_take(DEV, "a", pending=False, others_prompting=True, now=0.001)  # its request was cancelled
    assert turns.waiting(DEV) == ()


def test_gpus_are_independent_and_a_model_that_left_is_forgotten() -> None:
    turns = PromptTurns()
    assert not turns.may_take("cuda:0", "a", pending=True, others_prompting=True, now=0.0)
    assert turns.may_take("cuda:1", "b", pending=True, others_prompting=False, now=0.001)
    turns.forget("a")
    assert turns.waiting("cuda:0") == ()
    with pytest.raises(ValueError):
        PromptTurns(max_wait_s=-1.0)
