"""When a loop pass (HostCore._step) sends the tokens it collected: after it launched the next steps; under the
LLMHOST_SEND_BEFORE_LAUNCH experiment before them, so that no launch (0.4 ms each on the H100, up to 18 ms in the
slowest passes) holds them back from the client. Fakes stand in for the engines, the client's pipe and CUDA; the
GPU path itself runs in bench/multi_model.py (four/host against four/host-sendearly)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from llmhost.engine.scheduler import StepPlan
from llmhost.host import core
from llmhost.host.core import _Running
from llmhost.host.gpu_scheduler import StepShape
from llmhost.host.messages import TokenBatch, TokenEvent
from llmhost.host.step_trace import StepTrace


class Done:
    def query(self) -> bool:
        return True


class Conn:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, message: Any) -> None:
        self.sent.append(message)


class Core:
    """The parts of HostCore that _step touches: one GPU with a collected step of model "a", a CPU model "c"
    stepped (and collected) as it is launched, and a launch on the GPU that notes what the client had by then."""

    _step = core.HostCore._step
    _send = core.HostCore._send

    def __init__(self, send_early: bool, trace: StepTrace | None = None) -> None:
        self._send_early = send_early
        self.conn = Conn()
        self.trace = trace
        done = _Running("a", cast(Any, None), StepPlan(chunks=()), StepShape(8, 0), 0.0, None, cast(Any, Done()))
        self._inflight: dict[str, list[_Running]] = {"cuda:0": [done]}
        self.slots = {
            "b": SimpleNamespace(device_names=["cuda:0"]),
            "c": SimpleNamespace(device_names=["cpu"]),
        }
        self.sent_by_launch: list[TokenBatch] | None = None

    def _collect(self, run: _Running) -> list[TokenEvent]:
        return [TokenEvent(f"{run.name}-1", 7, None, None, None)]

    def _ready(self, slot: Any) -> bool:
        return True

    def _launch_gpu(self, device: str, ready: list[str], running: list[_Running]) -> bool:
        self.sent_by_launch = list(self.conn.sent)
        return True

    def _launch(self, device: str, ready: list[str]) -> _Running:
        return _Running(ready[0], cast(Any, None), StepPlan(chunks=()), StepShape(1, 0), 0.0)

    def _traced(self, run: _Running, beside: int) -> None:
        pass

    def _run_ahead(self, device: str, running: list[_Running]) -> None:
        pass

    def _launch_slices(self, running: list[_Running]) -> bool:
        return False


def ids(batches: list[Any]) -> list[list[str]]:
    return [[e.request_id for e in b.events] for b in batches]


def test_sent_early_collected_tokens_go_out_before_the_next_launch() -> None:
    fake = Core(send_early=True)
    assert core.HostCore._step(cast(Any, fake))
    assert fake.sent_by_launch is not None and ids(fake.sent_by_launch) == [["a-1"]]
    assert ids(fake.conn.sent) == [["a-1"], ["c-1"]], "the CPU's step, collected as launched, in a batch after"


def test_by_default_the_tokens_wait_for_the_launches() -> None:
    fake = Core(send_early=False)
    core.HostCore._step(cast(Any, fake))
    assert fake.sent_by_launch == []
    assert ids(fake.conn.sent) == [["a-1", "c-1"]]


def test_the_trace_records_each_send_with_its_tokens_per_model(tmp_path: Path) -> None:
    for early, sends in ((True, [{"a": 1}, {"c": 1}]), (False, [{"a": 1, "c": 1}])):
        fake = Core(send_early=early, trace=StepTrace(tmp_path / "steps.jsonl"))
        core.HostCore._step(cast(Any, fake))
        assert fake.trace is not None
        assert [r["tokens"] for r in fake.trace.records if r["ev"] == "send"] == sends
