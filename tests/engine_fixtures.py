"""Test helper: tiny random transformers models saved as HF checkpoints (config.json + fp32 safetensors), built
once per test session, for parity tests of the engine against transformers' own implementation.

Every parameter is random (norm weights and biases too, which transformers initialises to ones and zeros), so a
loader that skips a tensor or a model that drops a bias cannot pass by accident. The token ids (bos, eos, pad)
are unset so that `generate()` never stops early and matches an engine run with no EOS.

Use the session fixture from a test module with `from engine_fixtures import tiny_models  # noqa: F401`, then
`hf, path = tiny_models("qwen3")`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

SEED = 0
VOCAB = 256
MAX_POSITIONS = 512
COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    vocab_size=VOCAB,
    max_position_embeddings=MAX_POSITIONS,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
# Llama 3.1 rope: wavelengths longer than 64 / low_freq_factor positions are slowed 8x, shorter than 64 / 4 kept,
# the band between interpolated. With head_dim 16 and theta 10000 the 8 frequencies fall in all three bands.
LLAMA3_ROPE: dict[str, Any] = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)

# name -> (config class, model class, config arguments beyond COMMON)
_SPECS: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "llama-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=True)),
    # Mistral's default sliding window (4096) would make the checkpoint unsupported: v0.2+ configs set it to null.
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(tie_word_embeddings=False, sliding_window=None),
    ),
    "qwen2-tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    # head_dim 32 != hidden / heads (16), as Qwen3 allows.
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=32, tie_word_embeddings=False)),
    "qwen3-tied": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        dict(head_dim=32, tie_word_embeddings=True),
    ),
    "llama31": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE),
    ),
}
MODEL_NAMES: tuple[str, ...] = tuple(_SPECS)


def build_tiny_model(name: str, directory: Path, seed: int = SEED) -> tuple[Any, Path]:
    """Build the tiny model `name` (one of MODEL_NAMES) with a fixed seed, save it into `directory` as fp32
    safetensors and return (the transformers model in eval mode, directory)."""
    config_cls, model_cls, extra = _SPECS[name]
    config = config_cls(**COMMON, **extra)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.uniform_(0.5, 1.5)  # around 1, as trained norms are, but not 1: a skipped norm shows
            else:
                p.normal_(0.0, 0.1)  # biases included: zero-initialised biases would hide a dropped bias
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    model.generation_config.bos_token_id = None
    model.save_pretrained(directory)
    return model, directory


class TinyModels:
    """Builds each tiny model on first request and hands the same (hf_model, path) to every later caller.
    Tests must not modify the model or the directory: copy the directory to alter a checkpoint."""

    def __init__(self, make_dir: Callable[[str], Path]) -> None:
        self._make_dir = make_dir
        self._built: dict[str, tuple[Any, Path]] = {}

    def __call__(self, name: str) -> tuple[Any, Path]:
        if name not in self._built:
            self._built[name] = build_tiny_model(name, self._make_dir(name))
        return self._built[name]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return TinyModels(lambda name: tmp_path_factory.mktemp(f"tiny-{name}"))
