"""ModelShape: the architecture numbers every other layer needs (memory estimate, engine, inspect)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

LayerKind = Literal["full", "sliding"]

# Architectures the engine runs. Inspect and plan read a few more shapes (see hf_config.READ_ONLY).
RUNNABLE = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


def every_nth_full(layers: int, n: int) -> tuple[LayerKind, ...]:
    """Gemma 3's interleaving: every n-th layer attends globally ("full"), the others to a sliding window."""
    kinds: list[LayerKind] = []
    for i in range(layers):
        kinds.append("full" if (i + 1) % n == 0 else "sliding")
    return tuple(kinds)


def all_sliding(layers: int) -> tuple[LayerKind, ...]:
    """Mistral-style: one window for every layer."""
    kind: LayerKind = "sliding"
    return (kind,) * layers


@dataclass(frozen=True)
class ModelShape:
    architecture: str  # our family name: llama, mistral, qwen2, qwen3, gemma3
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    o_bias: bool = False  # o_proj carries a bias (Llama-family configs with attention_bias)
    mlp_bias: bool = False  # gate/up/down carry biases (Llama mlp_bias)
    qk_norm: bool = False  # RMSNorm over q and k per head (Qwen3, Gemma 3)
    sliding_window: int | None = None  # tokens a sliding layer attends to
    layer_types: tuple[LayerKind, ...] = ()  # per layer; empty means every layer is "full"
    norms_per_layer: int = 2  # Gemma 3 has four (pre/post around attention and MLP)
    rope_scaling: dict[str, Any] | None = field(default=None, compare=False)
    # Sliding layers' own RoPE (Gemma 3: rope_local_base_freq, unscaled); None: the same as the full layers'.
    rope_local_theta: float | None = None
    rope_local_scaling: dict[str, Any] | None = field(default=None, compare=False)
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5; None: head_dim (Gemma sets it)
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the softmax
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    hidden_activation: str = "silu"  # the MLP gate's activation, as HF names it (Gemma: gelu_pytorch_tanh)
    hf_architecture: str = ""  # e.g. LlamaForCausalLM, as the checkpoint names it

    def layer_kind(self, i: int) -> LayerKind:
        return self.layer_types[i] if self.layer_types else "full"

    def layers_of_kind(self, kind: LayerKind) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.layer_kind(i) == kind)

    @property
    def attention_scale(self) -> float:
        scalar: float = self.query_pre_attn_scalar or float(self.head_dim)
        return math.pow(scalar, -0.5)  # as transformers computes it: query_pre_attn_scalar ** -0.5

    @property
    def num_sliding_layers(self) -> int:
        return sum(1 for i in range(self.num_layers) if self.layer_kind(i) == "sliding")

    # -- parameter counts (analytic; checked against tensor headers in tests) -------------------------------

    def layer_params(self) -> int:
        """Parameters of one decoder layer."""
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attn = self.hidden_size * (q + 2 * kv) + q * self.hidden_size  # q, k, v, o projections
        if self.qkv_bias:
            attn += q + 2 * kv
        if self.o_bias:
            attn += self.hidden_size
        if self.qk_norm:
            attn += 2 * self.head_dim
        mlp = 3 * self.hidden_size * self.intermediate_size  # gate, up, down
        if self.mlp_bias:
            mlp += 2 * self.intermediate_size + self.hidden_size
        norms = self.norms_per_layer * self.hidden_size
        return attn + mlp + norms

    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def head_params(self) -> int:
        """Final norm plus the LM head (zero extra when tied to the embedding)."""
        return self.hidden_size + (0 if self.tie_embeddings else self.vocab_size * self.hidden_size)

    def param_count(self) -> int:
        return self.embed_params() + self.num_layers * self.layer_params() + self.head_params()

    # -- KV cache ----------------------------------------------------------------------------------------

    def kv_bytes_per_token_layer(self, dtype_bytes: int) -> int:
        """Bytes one token adds to one layer's cache: K and V, each kv_heads x head_dim."""
        return 2 * self.num_kv_heads * self.head_dim * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes one token adds across all layers, ignoring sliding-window caps (the long-sequence rate is
        lower: sliding layers stop growing at the window)."""
        return self.num_layers * self.kv_bytes_per_token_layer(dtype_bytes)
