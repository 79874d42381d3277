"""bench/multi_model.py --trace-dir: a four-model host phase gets a folder of its own, and the host it starts next
writes its step trace there (LLMHOST_STEP_TRACE, inherited by the host process)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import multi_model

from llmhost.host import step_trace


def test_without_trace_dir_no_folder_and_no_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(multi_model.TRACE_DIR_ENV, raising=False)
    monkeypatch.delenv(step_trace.ENV, raising=False)
    assert multi_model._raw_dir("four") is None
    assert step_trace.StepTrace.from_env() is None


def test_with_trace_dir_each_phase_traces_into_its_own_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(multi_model.TRACE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(step_trace.ENV, raising=False)
    raw = multi_model._raw_dir("four-sendearly")
    assert raw == tmp_path / "four-sendearly" and raw.is_dir()
    trace = step_trace.StepTrace.from_env()
    assert trace is not None and trace.path == raw / "steps.jsonl"


def test_trace_summary_is_the_probe_s_gist(tmp_path: Path) -> None:
    """The four-model phase keeps loop_passes.py's gist in its result (the folder may not come back from the
    device): the same figures as the probe's."""
    from test_loop_passes_probe import write_trace

    write_trace(tmp_path / "four", numbered=True)
    gist = multi_model._trace_summary(tmp_path / "four")
    assert gist["slow_moments"] == 1 and gist["slow_moment_launch_ms_p50"] == [2.0]
    assert gist["models"]["a"]["top_gaps"]["slow_moment_only"] == 4
    assert gist["models"]["b"]["wait_for_send_ms"]["p50"] == pytest.approx(0.7, abs=1e-3)
    assert gist["canary"] is None and gist["slow_moment_os"] is None  # the made-up trace has neither


def test_trace_summary_of_a_missing_trace_says_so(tmp_path: Path) -> None:
    (tmp_path / "four").mkdir()
    assert "FileNotFoundError" in multi_model._trace_summary(tmp_path / "four")["error"]


def test_the_apart_phase_turns_on_far_prompts_and_keeping_decodes_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmhost.host.core import FAR_PROMPT_ENV, PROMPT_APART_ENV, SEND_EARLY_ENV

    for env in (FAR_PROMPT_ENV, PROMPT_APART_ENV, SEND_EARLY_ENV):
        monkeypatch.delenv(env, raising=False)  # and restored after: the phase sets them for its host process
    multi_model._switch_experiments("four-sendearly")
    assert FAR_PROMPT_ENV not in os.environ and PROMPT_APART_ENV not in os.environ
    multi_model._switch_experiments("four-apart")
    assert os.environ[FAR_PROMPT_ENV] == str(multi_model.FAR_PROMPT_SMS) and os.environ[PROMPT_APART_ENV] == "1"
