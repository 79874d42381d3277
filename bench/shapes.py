"""Real model shapes for GPU benches (random weights: decode speed and memory do not depend on values)."""

from __future__ import annotations

from llmhost.model_files.shape import ModelShape

# Llama 3.2's RoPE: Llama 3.1 scaling from an 8k original context.
_LLAMA32_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

SHAPES: dict[str, ModelShape] = {
    "smollm2-135m": ModelShape("llama", 30, 576, 9, 3, 64, 1536, 49152, True, 8192, rope_theta=100000.0),
    "llama-3.2-1b": ModelShape(
        "llama", 16, 2048, 32, 8, 64, 8192, 128256, True, 131072, rope_theta=500000.0, rope_scaling=_LLAMA32_ROPE
    ),
    "llama-3.2-3b": ModelShape(
        "llama", 28, 3072, 24, 8, 128, 8192, 128256, True, 131072, rope_theta=500000.0, rope_scaling=_LLAMA32_ROPE
    ),
    "mistral-7b": ModelShape("mistral", 32, 4096, 32, 8, 128, 14336, 32000, False, 32768, rope_theta=1e6),
    "llama-3-8b": ModelShape("llama", 32, 4096, 32, 8, 128, 14336, 128256, False, 8192, rope_theta=500000.0),
    "qwen2.5-14b": ModelShape(
        "qwen2", 48, 5120, 40, 8, 128, 13824, 152064, False, 32768, rope_theta=1e6, qkv_bias=True
    ),
    "qwen2.5-7b": ModelShape("qwen2", 28, 3584, 28, 4, 128, 18944, 152064, False, 32768, rope_theta=1e6, qkv_bias=True),
    "yi-34b": ModelShape("llama", 60, 7168, 56, 8, 128, 20480, 64000, False, 4096, rope_theta=5e6),
    "llama-3-70b": ModelShape("llama", 80, 8192, 64, 8, 128, 28672, 128256, False, 8192, rope_theta=500000.0),
}
