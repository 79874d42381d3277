"""SmSteering: which model's decode graphs lose or regain SMs, from the time fair sharing held each back; the host
core's wiring of it (fake runners and green contexts on a simulated GPU)."""

from __future__ import annotations

from collections.abc import Mapping
from multiprocessing import Pipe
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
from engine_fixtures import TinyModels, tiny_models  # noqa: F401
from test_coordinator import FakeRuntime

from llmhost.config import load_config
from llmhost.engine import sm_partition
from llmhost.engine.scheduler import StepPlan
from llmhost.host.coordinator import Slot
from llmhost.host.core import DECODE_STREAM_PRIORITY, HostCore, _Running
from llmhost.host.gpu_scheduler import StepShape
from llmhost.host.sm_confinement import SmConfinement
from llmhost.host.sm_steering import (
    ALONE_WINDOWS,
    SETTLE_QUIET_WINDOWS,
    SETTLE_WINDOW_S,
    WINDOW_S,
    SmSteering,
    confined_levels,
    near_sms,
)
from llmhost.host.step_trace import StepTrace
from llmhost.memory.inventory import parse_gpu_spec


def window(
    st: SmSteering, t: float, held: dict[str, float], ready: tuple[str, ...] = (), by: Mapping[str, str] = {}
) -> dict[str, int]:
    """One 0.5 s window in which each model had work all along and was held back `held[name]` of it, waiting for
    model `by[name]` (not named: by a model on the whole GPU)."""
    for name in ready or tuple(held):
        st.observe(name, 0.5 * (1.0 - held.get(name, 0.0)), False)
        st.observe(name, 0.5 * held.get(name, 0.0), True, by.get(name))
    return st.decide(t)


def steering(*models: str) -> SmSteering:
    """Steering of a 132-SM GPU whose models have been ready together for one window already."""
    st = SmSteering(132)
    for m in models:
        st.add(m)
    assert st.decide(0.0) == {}  # the first call starts the first window
    assert window(st, 0.5, {m: 0.5 for m in models}) == {}  # the set of ready models changed: no decision
    return st


LEVELS_UP = [72, 80, 88, 96, 104, 112]  # the confined sets a GPU of 132 SMs captures, in the order captured


def test_levels_are_multiples_of_eight_below_the_whole_gpu() -> None:
    assert confined_levels(132) == (112, 104, 96, 88, 80, 72)
    assert confined_levels(132, deep=False) == (112, 104, 96, 88)
    assert SmSteering(132).levels == (132, 112, 104, 96, 88, 80, 72)


def test_a_far_group_leaves_a_whole_number_of_granules_at_the_start() -> None:
    assert near_sms(132, 44) == 88  # 44 left at the far end: the steering levels of 88 SMs and below stay apart
    assert near_sms(132, 40) == 88  # rounded so that at least 40 are left (44)
    assert near_sms(132, 28) == 104
    assert near_sms(132, 130) == 0  # nothing left to split off
    assert near_sms(132, 0) == 0
    assert sm_partition.far_stream("cpu", 88) is None  # a CPU has no SMs to split


def test_the_most_held_model_moves_down_a_level_per_five_percent_held() -> None:
    st = steering("7b", "14b")
    assert window(st, 1.0, {"7b": 0.0, "14b": 0.10}) == {"14b": 104}  # two levels
    assert window(st, 1.5, {"7b": 0.0, "14b": 0.06}) == {"14b": 96}  # the next window decides again
    assert st.sms("14b") == 96 and st.sms("7b") == 132


def test_near_its_share_nothing_moves() -> None:
    st = steering("a", "b")
    for k in range(3, 8):
        assert window(st, 0.5 * k, {"a": 0.04, "b": 0.01}) == {}
    assert st.sms("a") == st.sms("b") == 132


def test_a_newcomers_start_decides_nothing() -> None:
    st = steering("a", "b")
    st.add("c")
    # c's first window: a was held as c started; the set of ready models changed, so nothing moves.
    assert window(st, 1.0, {"a": 0.3, "b": 0.0, "c": 0.0}) == {}
    assert window(st, 1.5, {"a": 0.3, "b": 0.0, "c": 0.0}) == {"a": 104}


def test_an_overshoot_gives_sms_back_and_sets_a_floor() -> None:
    st = steering("7b", "14b")
    assert window(st, 1.0, {"14b": 0.20, "7b": 0.0}) == {"14b": 104}  # two levels at most
    assert window(st, 1.5, {"14b": 0.05, "7b": 0.0}) == {"14b": 96}
    # Now the 7B is ahead and held: the confined 14B gets SMs back rather than the 7B losing any...
    assert window(st, 2.0, {"7b": 0.06, "14b": 0.0}, by={"7b": "14b"}) == {"14b": 104}
    # ...and the 14B, held again, is not confined below where it was given SMs back.
    assert window(st, 2.5, {"14b": 0.10, "7b": 0.0}) == {}
    assert st.sms("14b") == 104


SHORT = 1.01 * SETTLE_WINDOW_S  # a settling window, clear of rounding in the sums of times


def _short(st: SmSteering, t: float, held: dict[str, float], by: Mapping[str, str] = {}) -> dict[str, int]:
    """A window of SHORT ending at `t` in which each model was held `held[name]` of it."""
    for name, h in held.items():
        st.observe(name, SHORT * (1.0 - h), False)
        st.observe(name, SHORT * h, True, by.get(name))
    return st.decide(t)


def test_while_settling_a_short_window_decides_then_settled_ones_are_longer() -> None:
    st = SmSteering(132, settle_window_s=SETTLE_WINDOW_S)
    for m in ("1b", "8b"):
        st.add(m)
    assert st.decide(0.0) == {} and not st.settled
    held = {"1b": 0.0, "8b": 0.15}
    assert _short(st, SHORT, held) == {}  # the newcomers' window decides nothing
    t = SHORT
    levels = []
    for _ in range(3):  # 132 -> 104 -> 88 -> 72 SMs within 0.6 s of the start, not 2 s
        t += SHORT
        levels.append(_short(st, t, held).get("8b"))
    assert levels == [104, 88, 72]
    for _ in range(SETTLE_QUIET_WINDOWS):  # at the deepest level: nothing moves
        t += SHORT
        assert _short(st, t, held) == {}
    assert st.settled
    # Settled, a short window no longer decides: the 8B, now holding the 1B, gets SMs back after a whole WINDOW_S.
    t += SHORT
    assert _short(st, t, {"1b": 0.3, "8b": 0.0}, by={"1b": "8b"}) == {}
    t += WINDOW_S - SHORT
    assert st.decide(t) == {"8b": 80}  # 0.3 of the short part: 9% of the window, one level
    assert not st.settled  # it moved: short windows again until it is quiet


def test_a_new_model_unsettles_the_steering() -> None:
    st = steering("a", "b")
    t = 0.5
    for _ in range(SETTLE_QUIET_WINDOWS):
        t += WINDOW_S
        assert window(st, t, {"a": 0.0, "b": 0.0}) == {}
    assert st.settled
    st.add("c")
    assert not st.settled


def test_without_settling_every_window_is_as_long() -> None:
    st = SmSteering(132)  # the default: no settling windows
    for m in ("1b", "8b"):
        st.add(m)
    st.decide(0.0)
    assert _short(st, SHORT, {"1b": 0.0, "8b": 0.15}) == {}  # not a window yet
    assert st.decide(WINDOW_S) == {}  # the newcomers' window
    assert _short(st, 2 * SHORT + WINDOW_S, {"1b": 0.0, "8b": 0.15}) == {}


def test_never_below_the_deepest_level() -> None:
    st = steering("a", "b")
    for k in range(2, 30):
        window(st, 0.5 * k, {"a": 0.5, "b": 0.0})
    assert st.sms("a") == 72 and st.sms("b") == 132


def test_a_model_decoding_alone_gets_the_whole_gpu_back() -> None:
    st = steering("a", "b")
    assert window(st, 1.0, {"a": 0.10, "b": 0.0}) == {"a": 104}
    t = 1.0
    changes: dict[str, int] = {}
    for _ in range(ALONE_WINDOWS + 1):
        t += 0.5
        changes |= window(st, t, {"a": 0.0}, ready=("a",))
    assert changes == {"a": 132}


def test_four_models_the_two_held_by_smaller_ones_move_down_together() -> None:
    st = steering("1b", "3b", "8b-1", "8b-2")
    assert window(st, 1.0, {"1b": 0.0, "3b": 0.02, "8b-1": 0.17, "8b-2": 0.17}) == {"8b-1": 104, "8b-2": 104}
    assert window(st, 1.5, {"1b": 0.0, "3b": 0.02, "8b-1": 0.05, "8b-2": 0.06}) == {"8b-1": 96, "8b-2": 96}
    # 8b-1 is now behind: 8b-2 waits for it. It gets SMs back; 8b-2, held by a confined model, stays.
    assert window(st, 2.0, {"1b": 0.0, "3b": 0.0, "8b-1": 0.0, "8b-2": 0.10}, by={"8b-2": "8b-1"}) == {"8b-1": 112}
    # Held by the 1B again, 8b-1 goes no deeper than its floor; 8b-2 goes on down.
    assert window(st, 2.5, {"1b": 0.0, "3b": 0.0, "8b-1": 0.10, "8b-2": 0.10}) == {"8b-2": 80}
    assert (st.sms("1b"), st.sms("3b"), st.sms("8b-1"), st.sms("8b-2")) == (132, 132, 112, 80)


def test_a_model_held_by_a_confined_one_is_not_confined_for_it() -> None:
    st = steering("a", "b", "c")
    assert window(st, 1.0, {"a": 0.10, "b": 0.0, "c": 0.0}) == {"a": 104}
    # b waits for the confined a (a moves up), c for a model on the whole GPU (c moves down).
    assert window(st, 1.5, {"a": 0.0, "b": 0.10, "c": 0.05}, by={"b": "a", "c": "b"}) == {"a": 132, "c": 112}


def test_a_model_that_left_is_forgotten_and_floors_reset() -> None:
    st = steering("a", "b", "c")
    assert window(st, 1.0, {"a": 0.10, "b": 0.0, "c": 0.0}) == {"a": 104}
    assert window(st, 1.5, {"a": 0.0, "b": 0.05, "c": 0.0}, by={"b": "a"}) == {"a": 112}  # SMs back: floor 112
    st.remove("c")
    window(st, 2.5, {"a": 0.0, "b": 0.0})  # the ready set changed
    assert window(st, 3.0, {"a": 0.05, "b": 0.0}) == {"a": 104}  # floor reset: a may go below 112 again
    st.observe("c", 1.0, True)  # ignored: not resident
    with pytest.raises(KeyError):
        st.sms("c")


# -- the host core's wiring: which runner set is selected, and a failed capture turns steering off ------------------


class _Runner:
    """A decode runner's steering surface: the confined graph sets captured and the one selected."""

    capture_on_demand = False  # a runner built at load captures its confined sets at once

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.captured: list[int] = []
        self.sms: int | None = None

    def capture_confined(self, streams: dict[int, object], max_rows: int) -> None:
        self.captured += sorted(streams)[:1]  # the first level's graphs, then (fail) the failure
        if self.fail:
            raise RuntimeError("CUDA out of memory (injected)")
        self.captured += sorted(streams)[1:]

    def select(self, sms: int | None) -> None:
        assert sms is None or sms in self.captured
        self.sms = sms

    def drop_confined(self) -> None:
        self.sms = None
        self.captured = []


def _steered_core(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_models: TinyModels,  # noqa: F811
    fail: str = "",
    loaded: tuple[str, ...] = ("a", "b"),
) -> HostCore:
    """A host core on a simulated 80 GiB GPU with [host] sm_steering on and three fake models configured, whose
    runners record the steering (the one named `fail` fails its capture); `loaded` loaded, the others not yet;
    green contexts faked (132 SMs), the GPU's stream gate stubbed, device synchronizations counted in
    `core.synced`."""
    monkeypatch.setenv("LLMHOST_HISTORY", "off")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    synced: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(str(device)))
    monkeypatch.setattr(sm_partition, "sm_count", lambda device: 132)
    monkeypatch.setattr(sm_partition, "confined_stream", lambda device, sms: object())
    path = tiny_models("llama")[1]
    cfg = tmp_path / "models.toml"
    body = "".join(f'[models.{n}]\npath = "{path}"\ndtype = "float32"\nmax_seq_len = 128\n' for n in ("a", "b", "c"))
    cfg.write_text("[host]\nsm_steering = true\n" + body)

    class Engine:
        has_work = False

        def __init__(self, name: str) -> None:
            self.runner = _Runner(fail=name == fail)

    class Runtime(FakeRuntime):
        def load(self, slot: Slot) -> None:
            super().load(slot)
            slot.engine = Engine(slot.name)

    _, theirs = Pipe()
    core = HostCore(load_config(cfg), parse_gpu_spec("1x80GiB"), theirs, Runtime())
    core._send_status = lambda query_id: None  # type: ignore[method-assign]
    core._gates["cuda:0"] = object()  # type: ignore[assignment]  # a real stream gate compiles a Triton kernel
    core.synced = synced  # type: ignore[attr-defined]
    for n in loaded:
        assert core._bring_in(n) is not None and core.slots[n].state == "loaded"
    return core


def test_the_host_confines_the_model_fair_sharing_holds_back(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_models: TinyModels,  # noqa: F811
) -> None:
    core = _steered_core(tmp_path, monkeypatch, tiny_models)
    runners = {n: core.slots[n].engine.runner for n in ("a", "b")}
    assert runners["a"].captured == runners["b"].captured == LEVELS_UP
    confinement = core.confinement
    assert confinement is not None and confinement.steers("cuda:0")
    _b_held_back(confinement)
    assert (runners["a"].sms, runners["b"].sms) == (None, 104)
    confinement.observe("cuda:0", ["a", "b"], {"a": "b"})  # a waited for b all of the window: b gets the GPU back
    assert (runners["a"].sms, runners["b"].sms) == (None, None)


def test_green_contexts_wait_for_a_gpus_second_model(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_models: TinyModels,  # noqa: F811
) -> None:
    """A model alone on its GPU gets no confined graphs (and so no green contexts are made); the second model's
    arrival captures both, after a device synchronization (the first may have a step in flight on its runner's
    buffers); a third captures only its own, without one."""
    core = _steered_core(tmp_path, monkeypatch, tiny_models, loaded=("a",))
    confinement = core.confinement
    assert confinement is not None
    runners = {n: core.slots[n].engine.runner for n in ("a",)}
    assert runners["a"].captured == [] and not confinement.steers("cuda:0")
    assert core._bring_in("b") is not None
    runners["b"] = core.slots["b"].engine.runner
    assert runners["a"].captured == runners["b"].captured == LEVELS_UP
    assert confinement.steers("cuda:0") and core.synced == ["cuda:0"]  # type: ignore[attr-defined]
    assert core._bring_in("c") is not None
    assert core.slots["c"].engine.runner.captured == LEVELS_UP
    assert core.synced == ["cuda:0"]  # type: ignore[attr-defined]


def test_a_model_that_left_does_not_count_as_the_first_of_two(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_models: TinyModels,  # noqa: F811
) -> None:
    core = _steered_core(tmp_path, monkeypatch, tiny_models, loaded=("a",))
    confinement = core.confinement
    assert confinement is not None
    confinement.remove("a")  # as the host does when a model is parked or unloaded
    assert core._bring_in("c") is not None
    assert not confinement.steers("cuda:0")
    assert core.slots["c"].engine.runner.captured == [] and core.slots["a"].engine.runner.captured == []


def test_a_model_without_a_runner_still_shares_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model split over GPUs has no decode runner to steer, but the model beside it shares the GPU with it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(sm_partition, "sm_count", lambda device: 132)
    monkeypatch.setattr(sm_partition, "confined_stream", lambda device, sms: object())
    runners = {"a": _Runner()}
    confinement = SmConfinement(runners.get)  # type: ignore[arg-type]
    confinement.add("a", "cuda:0")
    assert runners["a"].captured == [] and not confinement.steers("cuda:0")
    confinement.add("split", "cuda:0")
    assert runners["a"].captured == LEVELS_UP and confinement.steers("cuda:0")


def test_the_host_names_the_model_each_held_one_waits_for(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_models: TinyModels,  # noqa: F811
) -> None:
    """What the loop hands the steering when fair sharing holds models back: each one's blocker, none for a model
    within every bound (it was only behind another in the loop's order)."""
    core = _steered_core(tmp_path, monkeypatch, tiny_models)
    for name, step_s in (("a", 0.002), ("b", 0.008)):
        core.gpu.observe(name, 8, 0, step_s)
    core.gpu.pick("cuda:0", ["a", "b"])
    core.gpu.charge("b", 0.020)  # b is 20 ms ahead of a, whose next step would end at 2 ms
    assert core._held_by([], ["a", "b"]) == {"b": "a"}
    core.gpu.charge("a", 0.019)
    assert core._held_by([], ["a", "b"]) == {}


def test_the_step_trace_marks_each_hold_as_it_begins_and_whom_it_waits_for(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_models: TinyModels,  # noqa: F811
) -> None:
    """A "hold" record when fair sharing starts keeping a model back, one more only when the model it waits for
    changes, and a new one after the model was let go (bench/probes/trace_holds.py reads them)."""
    core = _steered_core(tmp_path, monkeypatch, tiny_models)
    core.trace = StepTrace(tmp_path / "steps.jsonl")
    ready = ["a", "b"]
    for held in ({"b": "a"}, {"b": "a"}, {"b": "c"}, {}, {"b": "a", "a": "b"}):
        core._trace_holds(ready, held)
    marks = [(r["model"], r["by"]) for r in core.trace.records if r["ev"] == "hold"]
    assert marks == [("b", "a"), ("b", "c"), ("a", "b"), ("b", "a")]


def _b_held_back(confinement: SmConfinement) -> None:
    steering = confinement._steering["cuda:0"]
    steering.window_s = steering.settle_window_s = 0.0  # decide on every pass
    confinement.observe("cuda:0", ["a", "b"], {})  # starts the first window
    confinement.observe("cuda:0", ["a", "b"], {"b": "a"})  # the set of ready models changed: no decision
    confinement.observe("cuda:0", ["a", "b"], {"b": "a"})  # b held all of the window: two levels down


def test_a_failed_confined_capture_leaves_the_gpu_unsteered_and_the_model_loaded(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_models: TinyModels,  # noqa: F811
) -> None:
    core = _steered_core(tmp_path, monkeypatch, tiny_models, fail="c")
    confinement = core.confinement
    assert confinement is not None
    _b_held_back(confinement)
    assert core.slots["b"].engine.runner.sms == 104
    assert core._bring_in("c") is not None and core.slots["c"].state == "loaded"
    assert not confinement.steers("cuda:0")
    assert [core.slots[n].engine.runner.sms for n in ("a", "b", "c")] == [None, None, None], "whole GPU again"
    assert [core.slots[n].engine.runner.captured for n in ("a", "b", "c")] == [[], [], []], "confined sets released"
    confinement.observe("cuda:0", ["a", "b", "c"], {"b": "a"})  # nothing steers it any more
    assert core.slots["b"].engine.runner.sms is None


def test_a_prompt_step_beside_others_takes_the_far_stream_only_in_the_experiment(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_models: TinyModels,  # noqa: F811
) -> None:
    """FAR_PROMPT_ENV: the far stream is made once per GPU with the split that leaves that many SMs at the far end,
    and used only while another model has work and no step in flight is on it."""
    made: list[tuple[str, int]] = []
    far = object()

    def far_stream(device: str, near: int) -> tuple[object, int]:
        made.append((device, near))
        return far, 132 - near

    monkeypatch.setattr(sm_partition, "far_stream", far_stream)
    core = _steered_core(tmp_path, monkeypatch, tiny_models)
    assert core._far_stream("a", "cuda:0", []) is None  # experiment off
    core._far_prompt_sms = 40
    assert core._far_stream("a", "cuda:0", []) is None  # b has no work: the whole GPU
    core.slots["b"].engine.has_work = True
    assert core._far_stream("a", "cuda:0", []) is far
    busy = type("Run", (), {"stream": far})()
    assert core._far_stream("a", "cuda:0", [busy]) is None  # already running a step
    assert made == [("cuda:0", 88)]


def test_a_model_alone_with_nothing_in_flight_steps_on_the_default_stream(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_models: TinyModels,  # noqa: F811
) -> None:
    """HostCore._stream: the GPU's default stream for a model alone there while every step in flight is on it too
    and, for a prompt step, no request of its own is decoding (kernels on a second stream slow the whole process
    for good); otherwise a pool stream no step in flight uses, of high priority for a decode-only step, of the
    default one for a prompt step."""
    core = _steered_core(tmp_path, monkeypatch, tiny_models)
    default = object()

    class Stream:
        def __init__(self, device: str, priority: int = 0) -> None:
            self.priority = priority

    monkeypatch.setattr(torch.cuda, "default_stream", lambda device: default)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    decode, prompt = StepShape(1, 0), StepShape(0, 16)

    def on(stream: object) -> Any:
        return type("Run", (), {"stream": stream})()

    seq = SimpleNamespace(in_prefill=True)  # a request still in its prompt
    core.slots["a"].engine.scheduler = SimpleNamespace(running=[seq])
    assert core._stream("a", "cuda:0", [], decode) is default
    assert core._stream("a", "cuda:0", [on(default)], decode) is default
    assert core._stream("a", "cuda:0", [on(default)], prompt) is default  # nothing of its own decoding
    seq.in_prefill = False
    beside = core._stream("a", "cuda:0", [on(default)], prompt)  # it would hold a decoding request back
    assert isinstance(beside, Stream) and beside.priority == 0
    assert core._stream("a", "cuda:0", [on(beside)], decode) is not default  # a step in flight on another stream
    core.slots["b"].engine.has_work = True
    first = core._stream("a", "cuda:0", [], decode)
    assert isinstance(first, Stream) and first.priority == DECODE_STREAM_PRIORITY
    second = core._stream("b", "cuda:0", [on(first)], decode)
    assert isinstance(second, Stream) and second is not first
    assert core._stream("a", "cuda:0", [on(second)], decode) is first


def test_deep_levels_let_a_model_held_at_88_sms_move_further_down() -> None:
    """With the deep levels a model held by one on the whole GPU window after window goes below 88 of 132 SMs (to
    72 at most); without them 88 is as deep as it goes."""
    for deep, deepest in ((False, 88), (True, 72)):
        st = SmSteering(132, deep=deep)
        st.add("1b")
        st.add("8b")
        st.decide(0.0)
        window(st, 0.5, {"1b": 0.5, "8b": 0.5})  # the set of ready models changed: no decision
        for k in range(2, 12):
            window(st, 0.5 * k, {"8b": 0.5, "1b": 0.0}, by={"8b": "1b"})
        assert st.sms("8b") == deepest and st.sms("1b") == 132
        assert st.step_sms("8b", ahead=True) == deepest, "nothing below the deepest level"


@pytest.mark.parametrize("on", [False, True])
def test_the_experiment_switches_reach_the_gpu_scheduler_and_the_steering(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_models: TinyModels,  # noqa: F811
    on: bool,
) -> None:
    """LLMHOST_LEAD_STEPS (2 unless set), LLMHOST_DITHER_ALL and LLMHOST_SM_DEEP_LEVELS (on unless "0"),
    LLMHOST_SM_SETTLE (off unless "1"): `on`, the settings of bench phases four/host-lead1, -shallow and -settle."""
    from llmhost.host.core import DEEP_LEVELS_ENV, DITHER_ALL_ENV, LEAD_STEPS_ENV, SM_SETTLE_ENV

    if on:
        for env in (DITHER_ALL_ENV, DEEP_LEVELS_ENV):
            monkeypatch.setenv(env, "0")
        monkeypatch.setenv(LEAD_STEPS_ENV, "1")
        monkeypatch.setenv(SM_SETTLE_ENV, "1")
    core = _steered_core(tmp_path, monkeypatch, tiny_models)
    assert core.gpu.lead_steps == (1.0 if on else 2.0)
    assert core.confinement is not None
    st = core.confinement._steering["cuda:0"]
    assert st.dither_all is not on
    assert st.levels == ((132, 112, 104, 96, 88) if on else (132, 112, 104, 96, 88, 80, 72))
    assert st.settle_window_s == (SETTLE_WINDOW_S if on else WINDOW_S)


def test_far_stream_builds_its_context_from_the_sms_left_after_the_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """far_stream's driver calls, against a fake cuda-bindings driver: the first `near` SMs are split off, the
    green context is made from the rest (not from the first group, which is what torch keeps), its stream wrapped
    for torch; a refusal anywhere gives None and a warning, never an exception."""
    import sys
    import types
    from enum import Enum

    class R(Enum):
        CUDA_SUCCESS = 0
        CUDA_ERROR_INVALID_VALUE = 1

    calls: list[tuple[object, ...]] = []
    refuse: set[str] = set()

    def result(name: str, *payload: object) -> tuple[object, ...]:
        calls.append((name, *payload))
        return (R.CUDA_ERROR_INVALID_VALUE,) if name in refuse else (R.CUDA_SUCCESS, *payload)

    def resource(n: int) -> object:
        return types.SimpleNamespace(sm=types.SimpleNamespace(smCount=n))

    def split(groups: int, whole: object, flags: int, near: int) -> tuple[object, ...]:
        return result("split", [resource(near)], groups, resource(132 - near))

    driver = types.SimpleNamespace(
        CUresult=R,
        CUdevResourceType=types.SimpleNamespace(CU_DEV_RESOURCE_TYPE_SM="sm"),
        CUgreenCtxCreate_flags=types.SimpleNamespace(CU_GREEN_CTX_DEFAULT_STREAM="default stream"),
        CUstream_flags=types.SimpleNamespace(CU_STREAM_NON_BLOCKING="non-blocking"),
        cuDeviceGet=lambda i: result("device", i),
        cuDeviceGetDevResource=lambda dev, kind: result("resource", resource(132)),
        cuDevSmResourceSplitByCount=split,
        cuDevResourceGenerateDesc=lambda res, n: result("desc", res[0].sm.smCount),
        cuGreenCtxCreate=lambda desc, dev, flags: result("green", desc),
        cuGreenCtxStreamCreate=lambda green, flags, priority: result("stream", 0xBEEF),
    )
    bindings = types.ModuleType("cuda.bindings")
    bindings.driver = driver  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setattr(torch.cuda, "get_stream_from_external", lambda ptr, dev: ("torch stream", ptr, str(dev)))
    monkeypatch.setattr(sm_partition, "_KEEP", [])

    made = sm_partition.far_stream("cuda:0", 88)
    assert made == (("torch stream", 0xBEEF, "cuda:0"), 44)
    assert [c[0] for c in calls] == ["device", "resource", "split", "desc", "green", "stream"]
    assert calls[3] == ("desc", 44), "the context is made of the 44 SMs left, not the 88 split off"
    assert len(sm_partition._KEEP) == 2, "the context and its stream live as long as the process"
    refuse.add("green")
    assert sm_partition.far_stream("cuda:0", 88) is None


def test_dithering_steps_below_the_level_only_while_ahead_and_only_when_steered() -> None:
    st = steering("7b", "14b")
    assert window(st, 1.0, {"14b": 0.20, "7b": 0.0}) == {"14b": 104}
    assert (st.step_sms("14b", ahead=True), st.step_sms("14b", ahead=False)) == (96, 104)
    assert st.step_sms("7b", ahead=True) == 132  # fair sharing never held it on the whole GPU: never confined
    for k in range(3, 30):
        window(st, 0.5 * k, {"14b": 0.5, "7b": 0.0})
    assert st.step_sms("14b", ahead=True) == 72  # nothing below the deepest level
    # Given the whole GPU back after holding the other (its floor: the whole GPU), it still dithers.
    st = steering("7b", "14b")
    assert window(st, 1.0, {"14b": 0.05, "7b": 0.0}) == {"14b": 112}
    assert window(st, 1.5, {"7b": 0.10, "14b": 0.0}, by={"7b": "14b"}) == {"14b": 132}
    assert (st.step_sms("14b", ahead=True), st.step_sms("14b", ahead=False)) == (112, 132)


def test_dither_all_lets_a_model_never_moved_step_below_the_whole_gpu_while_ahead() -> None:
    """The LLMHOST_DITHER_ALL experiment: a model the steering never confined replays a step on the first confined
    level while ahead, on the whole GPU while behind."""
    st = SmSteering(132, dither_all=True)
    st.add("7b")
    st.add("14b")
    assert (st.step_sms("7b", ahead=True), st.step_sms("7b", ahead=False)) == (112, 132)
    assert steering("7b", "14b").step_sms("7b", ahead=True) == 132, "off by default"


@pytest.mark.parametrize("dither", [True, False])
def test_dithering_holds_a_pair_at_its_fair_point_between_two_levels(dither: bool) -> None:
    """A simulated GPU: the 14B's and the 7B's speeds beside each other (fractions of solo) depend on the 14B's SM
    count, the 14B ahead at 104 SMs and behind at 96 (as the H100 pair, green_context-h100.json). Dithered by the
    GPU scheduler's lead, the two stay within a step of each other, on a mix of both levels; at the steering's level
    alone the 14B runs ahead without bound (fair sharing would hold it back, leaving the 7B alone meanwhile)."""
    from llmhost.host.gpu_scheduler import GpuScheduler

    speeds = {104: {"14b": 0.600, "7b": 0.548}, 96: {"14b": 0.530, "7b": 0.610}}
    solo = {"14b": 0.012, "7b": 0.0065}
    st = steering("7b", "14b")
    assert window(st, 1.0, {"14b": 0.20, "7b": 0.0}) == {"14b": 104}
    gpu = GpuScheduler()
    for name, step_s in solo.items():
        gpu.add(name, "cuda:0")
        gpu.observe(name, 1, 0, step_s)
    gpu.pick("cuda:0", ["7b", "14b"])
    deep = 0
    for _ in range(2000):  # one 14B step each, the 7B progressing beside it meanwhile
        lead = gpu.lead("14b", {})
        assert lead is not None
        sms = st.step_sms("14b", ahead=dither and lead > 0.0)
        deep += sms == 96
        wall = solo["14b"] / speeds[sms]["14b"]
        gpu.charge("14b", solo["14b"])
        gpu.charge("7b", wall * speeds[sms]["7b"])
    gap = abs(gpu.lead("14b", {}) or 0.0)
    if dither:
        assert gap < 2 * solo["14b"] and 0.2 < deep / 2000 < 0.8
    else:
        assert gap > 100 * solo["14b"] and deep == 0


def test_the_host_dithers_a_steered_models_steps_unless_turned_off(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_models: TinyModels,  # noqa: F811
) -> None:
    """Dithering on (the default) moves a steered model a level down while it is ahead, and every model, also one
    the steering never moved (LLMHOST_DITHER_ALL, on unless "0": then that one stays on the whole GPU)."""
    from llmhost.host.core import DITHER_ALL_ENV, SM_DITHER_ENV

    for sub, on, dither_all in (("off", False, True), ("on", True, True), ("steered", True, False)):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(SM_DITHER_ENV, "1" if on else "0")
        monkeypatch.setenv(DITHER_ALL_ENV, "1" if dither_all else "0")
        core = _steered_core(tmp_path / sub, monkeypatch, tiny_models)
        confinement = core.confinement
        assert confinement is not None
        _b_held_back(confinement)
        runner = core.slots["b"].engine.runner
        assert runner.sms == 104
        for name, step_s in (("a", 0.002), ("b", 0.008)):
            core.gpu.observe(name, 8, 0, step_s)
        core.gpu.pick("cuda:0", ["a", "b"])
        core.gpu.charge("b", 0.020)  # b ahead of a
        core._dither("b", "cuda:0", [])
        assert runner.sms == (96 if on else 104)
        core.gpu.charge("a", 0.040)  # now behind
        core._dither("b", "cuda:0", [])
        assert runner.sms == 104
        core._dither("a", "cuda:0", [])  # now ahead, never moved by the steering: dithers only with dither_all
        assert core.slots["a"].engine.runner.sms == (112 if on and dither_all else None)


def test_prompts_apart_keeps_decode_steps_off_the_far_sms_while_a_prompt_runs_there(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_models: TinyModels,  # noqa: F811
) -> None:
    """PROMPT_APART_ENV: while a prompt step is in flight on the far stream, a decode step's graphs replay on the
    near SMs (88 of 132 with 44 far: a steering level), a model steered deeper stays deeper; once the prompt step
    is collected, each model is back on its own level. Off, a far prompt step leaves the levels as they were."""
    far = object()
    monkeypatch.setattr(sm_partition, "far_stream", lambda device, near: (far, 132 - near))
    for sub, apart in (("off", False), ("on", True)):
        (tmp_path / sub).mkdir()
        core = _steered_core(tmp_path / sub, monkeypatch, tiny_models, loaded=("a", "b", "c"))
        confinement = core.confinement
        assert confinement is not None
        core._far_prompt_sms, core._prompt_apart = 44, apart
        core.slots["b"].engine.has_work = True
        assert core._far_stream("c", "cuda:0", []) is far
        steering = confinement._steering["cuda:0"]
        steering._models["c"].level = steering.deepest  # c steered to the deepest level (a decision of its own)
        core.slots["c"].engine.runner.select(steering.levels[-1])
        prompt = _Running("c", cast(Any, None), StepPlan(chunks=()), StepShape(0, 64), 0.0, cast(Any, far))
        for name in ("a", "b", "c"):
            core._dither(name, "cuda:0", [prompt])
        sms = [core.slots[n].engine.runner.sms for n in ("a", "b", "c")]
        assert sms == ([88, 88, steering.levels[-1]] if apart else [None, None, steering.levels[-1]])
        for name in ("a", "b"):
            core._dither(name, "cuda:0", [])
        assert [core.slots[n].engine.runner.sms for n in ("a", "b")] == [None, None]


def test_the_deeper_experiment_adds_levels_down_to_56_of_132_sms(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_models: TinyModels,  # noqa: F811
) -> None:
    """LLMHOST_SM_DEEPER=1 (bench phases four/host-deeper, pair/host-deeper): two levels below 72 SMs, captured for
    every model like the others; a model held all along reaches the deepest."""
    from llmhost.host.core import SM_DEEPER_ENV

    assert confined_levels(132, deeper=True) == (112, 104, 96, 88, 80, 72, 64, 56)
    assert confined_levels(132, deep=False, deeper=True) == (112, 104, 96, 88)  # shallow wins
    monkeypatch.setenv(SM_DEEPER_ENV, "1")
    core = _steered_core(tmp_path, monkeypatch, tiny_models)
    assert core.confinement is not None
    st = core.confinement._steering["cuda:0"]
    assert st.levels == (132, 112, 104, 96, 88, 80, 72, 64, 56)
    runner = core.slots["a"].engine.runner
    assert runner.captured == [56, 64, *LEVELS_UP]
    st.decide(0.0)
    for k in range(1, 12):
        window(st, 0.5 * k, {"a": 0.5, "b": 0.0})
    assert st.sms("a") == 56


def test_the_hosts_min_held_experiment_reaches_the_steering(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_models: TinyModels,  # noqa: F811
) -> None:
    """LLMHOST_SM_MIN_HELD (bench phases four/host-minheld3, -minheld2) sets the share of a window that moves a
    model; unset, sm_steering.MIN_HELD."""
    from llmhost.host.core import SM_MIN_HELD_ENV
    from llmhost.host.sm_steering import MIN_HELD

    core = _steered_core(tmp_path, monkeypatch, tiny_models)
    assert core.confinement is not None and core.confinement._steering["cuda:0"].min_held == MIN_HELD
    monkeypatch.setenv(SM_MIN_HELD_ENV, "0.03")
    (tmp_path / "again").mkdir()
    core = _steered_core(tmp_path / "again", monkeypatch, tiny_models)
    assert core.confinement is not None and core.confinement._steering["cuda:0"].min_held == 0.03
