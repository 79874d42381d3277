"""A step launched by the host core's launcher thread (eager steps on a GPU): in flight until its launch returned
the done event and the event completed; a failed launch is finished at once and re-raises at collection. The GPU
path itself runs in bench/multi_model.py and bench/probes/host_trace.py; here fake events stand in for CUDA's."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, cast

import pytest

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


def running(future: Future[Any]) -> _Running:
    return _Running("m", cast(Any, None), cast(Any, None), StepShape(1, 16), 0.0, cast(Any, object()), None,
                    launching=future)  # fmt: skip


def test_in_flight_until_launched_and_complete() -> None:
    future: Future[Any] = Future()
    run = running(future)
    assert not run.finished()  # still launching
    start, event = FakeEvent(), FakeEvent()
    future.set_result((start, event))
    assert not run.finished()  # launched, kernels not done
    assert run.done is event and run.start is start
    event.complete = True
    assert run.finished()
    assert run.gpu_seconds() == 0.0025


def test_failed_launch_is_finished_and_reraises_at_collection() -> None:
    future: Future[Any] = Future()
    future.set_exception(RuntimeError("launch failed"))
    run = running(future)
    assert run.finished()
    run.wait()  # does not raise: the collection does
    assert run.launching is not None
    with pytest.raises(RuntimeError, match="launch failed"):
        run.launching.result()


def test_wait_blocks_on_the_launch_then_the_event() -> None:
    future: Future[Any] = Future()
    event = FakeEvent()
    future.set_result((FakeEvent(), event))
    run = running(future)
    run.wait()
    assert event.waited and run.done is event
