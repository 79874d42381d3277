"""bench/probes/prompt_step.py on the CPU: each prompt-only step takes every queued prompt whole (fresh prompts: none
served from the prefix cache), and its time and FLOP rate come out of the same steps."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "probes"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import prompt_step
from decode import prefill_flops


def test_each_step_takes_its_prompts_whole_and_is_timed() -> None:
    out = prompt_step.measure("tiny", prompt_step.TINY, "cpu", "float32", None)
    assert set(out["steps"]) == {str(r) for r in prompt_step.REQUESTS}
    for requests, row in out["steps"].items():
        assert row["tokens"] == int(requests) * prompt_step.PROMPT  # a prefix-cache hit would compute less
        assert row["gpu_ms"] > 0.0 and "fraction_of_gemm_peak" not in row  # no peak measured on the CPU
        flops = int(requests) * prefill_flops(prompt_step.TINY, prompt_step.PROMPT)
        assert abs(row["tflops"] - flops / (row["gpu_ms"] / 1e3) / 1e12) <= 0.01
    assert "kernels_128" not in out  # the profile is the GPU's
