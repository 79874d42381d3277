"""The eager step's matmul warm-up (engine/matmul_warmup.py): which token counts it covers, and that it leaves a
CPU model alone. Its effect (no wait on a new shape's first launch) is GPU-only: bench/kernels_check.py."""

from __future__ import annotations

from typing import Any

from engine_fixtures import TinyModels, tiny_models  # noqa: F401

from llmhost.config import ModelConfig
from llmhost.engine.engine import Engine
from llmhost.engine.matmul_warmup import DENSE_TOKENS, STRIDE, token_counts, warm_matmuls


def test_every_count_up_to_the_dense_limit_then_a_stride() -> None:
    assert token_counts(5) == [1, 2, 3, 4, 5]
    counts = token_counts(DENSE_TOKENS + 3 * STRIDE + 1)
    assert counts[:DENSE_TOKENS] == list(range(1, DENSE_TOKENS + 1))
    assert counts[DENSE_TOKENS:] == [DENSE_TOKENS + k * STRIDE for k in (1, 2, 3)]


def test_a_cpu_model_runs_nothing(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("llama")
    eng: Any = Engine.load(ModelConfig("t", path, dtype="float32", max_seq_len=64, max_batch=2), "cpu")
    assert warm_matmuls(eng.model, 64, 2) == 0
