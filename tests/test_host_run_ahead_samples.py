"""Which decode steps run ahead (HostCore._follow) sample their model's solo step cost: only one queued while the
step ahead of it still runs, with no other step in flight on its GPU; with LLMHOST_SOLO_RUN_AHEAD=0 none (charged and
observed like an overlapped step). Fake events and streams stand in for CUDA's; the GPU path itself runs in
bench/multi_model.py."""

from __future__ import annotations

from typing import Any, cast

import pytest

from llmhost.engine.scheduler import StepPlan
from llmhost.host import core
from llmhost.host.core import _Running
from llmhost.host.gpu_scheduler import StepShape


class FakeEvent:
    def __init__(self, complete: bool = False) -> None:
        self.complete = complete

    def query(self) -> bool:
        return self.complete


class FakeEngine:
    def run_ahead(self, plan: StepPlan, stream: object, prefill_limit: int, graph_prompts: bool = False) -> StepPlan:
        assert prefill_limit == 0  # a step run ahead takes decodes only
        return StepPlan(chunks=())


def step(name: str, done: bool = False) -> _Running:
    return _Running(name, cast(Any, FakeEngine()), StepPlan(chunks=()), StepShape(1, 0), 0.0, cast(Any, object()),
                    cast(Any, FakeEvent(done)))  # fmt: skip


def follow(last: _Running, running: list[_Running], sampling: bool) -> _Running:
    fake_core = cast(Any, type("Core", (), {"_solo_run_ahead": sampling, "_fail_engine": None})())
    nxt = core.HostCore._follow(fake_core, last, running)
    assert nxt is not None and last.followed
    return nxt


@pytest.fixture(autouse=True)
def events(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core, "_event", lambda stream: FakeEvent())


def test_sampling_is_on_unless_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(core.SOLO_RUN_AHEAD_ENV, raising=False)
    assert core.solo_run_ahead_on()
    monkeypatch.setenv(core.SOLO_RUN_AHEAD_ENV, "0")
    assert not core.solo_run_ahead_on()


def test_switched_off_a_step_run_ahead_is_no_sample() -> None:
    last = step("a")
    assert follow(last, [last], sampling=False).overlapped


def test_alone_and_queued_in_time_it_samples_the_solo_cost() -> None:
    last = step("a")
    assert not follow(last, [last], sampling=True).overlapped


def test_the_step_ahead_already_done_means_the_stream_waited_for_the_host() -> None:
    last = step("a", done=True)
    assert follow(last, [last], sampling=True).overlapped


def test_any_other_step_in_flight_makes_it_overlapped() -> None:
    last = step("a")
    other = step("b")
    assert follow(last, [other, last], sampling=True).overlapped
    own_prompt = step("a")
    own_prompt.shape = StepShape(0, 128)
    last = step("a")
    assert follow(last, [own_prompt, last], sampling=True).overlapped
