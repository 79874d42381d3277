"""A prompt step the host core launches a layer at a time (beside other models' steps on a GPU): in flight until
its last slice is queued and its done event completed; the loop queues slices for about SLICE_S per pass; a slice
that raises fails that model's requests and leaves the others running. The GPU path itself runs in
bench/multi_model.py and bench/probes/host_trace.py; here fake events and streams stand in for CUDA's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import pytest
from engine_fixtures import TinyModels, tiny_models  # noqa: F401

from llmhost.engine.slices import Slices, drain, each_in
from llmhost.host import core
from llmhost.host.core import _Running
from llmhost.host.gpu_scheduler import StepShape


class FakeEvent:
    def __init__(self) -> None:
        self.complete = False
        self.waited = False

    def query(self) -> bool:
        return self.complete

    def synchronize(self) -> None:
        self.waited = True
        self.complete = True

    def elapsed_time(self, end: FakeEvent) -> float:
        return 2.5  # milliseconds, as CUDA's events report


def layers(n: int, queued: list[int]) -> Iterator[None]:
    """A launch of n slices that records each one it queued."""
    for i in range(n):
        if i:
            yield
        queued.append(i)


def running(slices: Iterator[None]) -> _Running:
    return _Running("m", cast(Any, None), cast(Any, None), StepShape(0, 16), 0.0, cast(Any, object()),
                    slices=slices, start=cast(Any, FakeEvent()))  # fmt: skip


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[FakeEvent]:
    made: list[FakeEvent] = []

    def event(stream: Any) -> FakeEvent:
        made.append(FakeEvent())
        return made[-1]

    monkeypatch.setattr(core, "_event", event)
    return made


def test_in_flight_until_every_slice_is_queued_and_the_step_ran(events: list[FakeEvent]) -> None:
    queued: list[int] = []
    run = running(layers(3, queued))
    assert not run.finished()
    assert run.launch(until=0.0) is False  # past its time: one slice only
    assert queued == [0] and not run.finished()
    assert run.launch(until=0.0) is False
    assert run.launch(until=0.0) is True  # the last slice: the launch is complete, `done` recorded behind it
    assert queued == [0, 1, 2] and run.slices is None and run.done is events[-1]
    assert not run.finished()  # queued, not run
    events[-1].complete = True
    assert run.finished()
    assert run.gpu_seconds() == 0.0025


def test_launch_queues_slices_while_time_is_left(events: list[FakeEvent]) -> None:
    queued: list[int] = []
    run = running(layers(5, queued))
    assert run.launch(until=float("inf")) is True
    assert queued == [0, 1, 2, 3, 4]


def test_wait_queues_the_rest_then_blocks_on_the_event(events: list[FakeEvent]) -> None:
    queued: list[int] = []
    run = running(layers(4, queued))
    run.launch(until=0.0)
    run.wait()
    assert queued == [0, 1, 2, 3] and events[-1].waited


def test_a_raising_slice_fails_only_its_model(events: list[FakeEvent], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core, "SLICE_S", -1.0)  # one slice per pass

    def broken() -> Iterator[None]:
        yield
        raise RuntimeError("launch failed")

    failed: list[str] = []
    fake_core = cast(Any, type("Core", (), {"trace": None, "_fail_engine": lambda self, n, e: failed.append(n)})())
    bad, good = running(broken()), running(layers(3, []))
    good.name = "other"
    inflight = [bad, good]
    assert core.HostCore._launch_slices(fake_core, inflight) is True  # both got a slice
    assert core.HostCore._launch_slices(fake_core, inflight) is True  # the broken one raised on its second
    assert failed == ["m"] and inflight == [good] and good.slices is not None
    assert core.HostCore._launch_slices(fake_core, inflight) is True
    assert good.slices is None and failed == ["m"]  # launched: its last slice queued


def test_slices_give_what_the_whole_launch_gives() -> None:
    def step(x: int) -> Slices[int]:
        for _ in range(3):
            x += 1
            yield
        return x * 10

    assert drain(step(1)) == 40
    entered: list[str] = []

    class Ctx:
        def __enter__(self) -> None:
            entered.append("in")

        def __exit__(self, *exc: object) -> None:
            entered.append("out")

    gen = each_in(step(1), Ctx)
    next(gen)
    assert entered == ["in", "out"]  # left while suspended: the caller launches other steps meanwhile
    assert drain(gen) == 40
    assert entered == ["in", "out"] * 4


def test_an_engine_launched_in_slices_gives_the_tokens_of_execute(tiny_models: TinyModels) -> None:  # noqa: F811
    """The same prompt through Engine.execute and through launch_slices one slice at a time, with another
    engine's step launched between slices: the same tokens."""
    from llmhost.config import ModelConfig
    from llmhost.engine.engine import Engine
    from llmhost.engine.sampling_params import SamplingParams

    _, path = tiny_models("llama")
    cfg = ModelConfig("t", path, dtype="float32", max_seq_len=64, max_batch=2, cuda_graphs=False)
    params = SamplingParams(max_tokens=6, temperature=0.0)
    prompt = [3, 14, 15, 9, 2, 6, 5, 35]
    whole = Engine.load(cfg, "cpu").generate([prompt], params)[0].output_ids

    eng, other = Engine.load(cfg, "cpu"), Engine.load(cfg, "cpu")
    eng.add_request(prompt, params)
    other.add_request(prompt[::-1], params)
    out: list[int] = []
    slices_seen = 0
    while eng.has_work:
        plan = eng.schedule()
        gen = eng.launch_slices(plan)
        while True:
            try:
                next(gen)
            except StopIteration:
                break
            slices_seen += 1
            if other.has_work:
                other.step()  # another engine's step between two slices
        out += [o.token for o in eng.collect(plan)]
    assert out == whole
    assert slices_seen > 0


def test_unloading_a_model_mid_launch_fails_its_requests_not_the_host(events: list[FakeEvent]) -> None:
    def broken() -> Iterator[None]:
        yield
        raise RuntimeError("launch failed")

    failed: list[str] = []
    run = running(broken())
    attrs = {"_inflight": {"cuda:0": [run]}, "_fail_engine": lambda self, n, e: failed.append(n)}
    fake_core = cast(Any, type("Core", (), attrs)())
    core.HostCore._finish_in_flight(fake_core, "m")  # waits: queues the rest of the launch, which raises
    assert failed == ["m"] and fake_core._inflight == {"cuda:0": []}
