"""Llama-family decoder (Llama 1/2/3/3.1, Mistral, Qwen2/2.5, Qwen3, SmolLM2, Yi) over a paged KV cache, and
`DecoderModel`, what every model class shares (loading, byte count, the attention step over the cache).

Weights live in plain tensors allocated once at their final size (q/k/v and gate/up fused), so device memory is
exactly the estimate's `weights` term; loading copies each streamed tensor into its slice.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from llmhost.engine.attention import AttentionBatch, paged_attention, write_kv
from llmhost.engine.kv_cache import KVCache
from llmhost.engine.rope import apply_rope, cos_sin, inv_frequencies
from llmhost.errors import ModelFileError, UnsupportedModelError
from llmhost.model_files.shape import ModelShape

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")


class Projections(Protocol):
    """The projections every decoder layer here holds, whatever its norms."""

    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's order of rounding: normalise in float32, cast back, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class DecoderModel(abc.ABC):
    """Weights allocated once at their final size and filled by `load`; `forward` runs a flat token batch over
    the paged cache and returns float32 logits of the rows that sample. Subclasses allocate their tensors in
    __init__ and name them in `destinations`."""

    shape: ModelShape
    dtype: torch.dtype
    device: torch.device

    def __init__(self, shape: ModelShape, dtype: torch.dtype, device: torch.device, max_seq_len: int) -> None:
        if shape.o_bias or shape.mlp_bias:
            raise UnsupportedModelError(
                "o_proj or MLP biases (attention_bias / mlp_bias in config.json) are not supported"
            )
        self.shape = shape
        self.dtype = dtype
        self.device = device
        self.max_seq_len = max_seq_len

    def empty(self, *dims: int) -> torch.Tensor:
        return torch.empty(dims, dtype=self.dtype, device=self.device)

    @abc.abstractmethod
    def destinations(self) -> dict[str, torch.Tensor]:
        """HF tensor name -> the view of our storage it fills."""

    @abc.abstractmethod
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this model owns, each once (a tied head is the embedding)."""

    @abc.abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        cache: KVCache,
        logits_rows: torch.Tensor,
    ) -> torch.Tensor:
        """input_ids, positions: [T]; logits_rows: [R] indices into T -> float32 logits [R, vocab]."""

    def load(self, weights: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
        """Copy streamed tensors into place; every destination must be filled exactly once."""
        dest = self.destinations()
        filled: set[str] = set()
        tied_head: torch.Tensor | None = None
        for name, tensor in weights:
            if name == "lm_head.weight" and self.shape.tie_embeddings:
                tied_head = tensor  # some tied checkpoints store the head anyway; it must equal the embedding
                continue
            target = dest.get(name)
            if target is None:
                continue  # e.g. rotary inv_freq buffers saved by old exporters: derived, not loaded
            if tuple(tensor.shape) != tuple(target.shape):
                raise ModelFileError(
                    f"{where}: tensor '{name}' has shape {list(tensor.shape)}, expected {list(target.shape)}"
                )
            target.copy_(tensor)
            filled.add(name)
        missing = [n for n in dest if n not in filled]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ModelFileError(f"{where}: tensor '{missing[0]}' is missing{more}; the checkpoint is incomplete")
        del tied_head

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    # -- shared pieces of a layer --------------------------------------------------------------------------------

    def projection_destinations(self, prefix: str, lw: Projections) -> dict[str, torch.Tensor]:
        s = self.shape
        q, kv, inter = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.intermediate_size
        dest = {
            prefix + "self_attn.q_proj.weight": lw.qkv[:q],
            prefix + "self_attn.k_proj.weight": lw.qkv[q : q + kv],
            prefix + "self_attn.v_proj.weight": lw.qkv[q + kv :],
            prefix + "self_attn.o_proj.weight": lw.o,
            prefix + "mlp.gate_proj.weight": lw.gate_up[:inter],
            prefix + "mlp.up_proj.weight": lw.gate_up[inter:],
            prefix + "mlp.down_proj.weight": lw.down,
        }
        if lw.qkv_bias is not None:
            dest[prefix + "self_attn.q_proj.bias"] = lw.qkv_bias[:q]
            dest[prefix + "self_attn.k_proj.bias"] = lw.qkv_bias[q : q + kv]
            dest[prefix + "self_attn.v_proj.bias"] = lw.qkv_bias[q + kv :]
        if lw.q_norm is not None and lw.k_norm is not None:
            dest[prefix + "self_attn.q_norm.weight"] = lw.q_norm
            dest[prefix + "self_attn.k_norm.weight"] = lw.k_norm
        return dest

    def qkv_heads(self, x: torch.Tensor, lw: Projections) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [T, hidden] -> q: [T, heads, head_dim], k, v: [T, kv_heads, head_dim]."""
        s = self.shape
        t = x.shape[0]
        q_dim, kv_dim = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        q, k, v = torch.split(F.linear(x, lw.qkv, lw.qkv_bias), [q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(t, s.num_heads, s.head_dim)
        k = k.view(t, s.num_kv_heads, s.head_dim)
        return q, k, v.view(t, s.num_kv_heads, s.head_dim)

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: AttentionBatch,
        cache: KVCache,
        scale: float,
    ) -> torch.Tensor:
        """Write the new tokens' K/V into the layer's pool and attend over it: [T, heads * head_dim]. A layer in
        the window pool reads that pool's slots and tables and sees only the window."""
        windowed = cache.in_window_pool(layer)
        b = batch.for_pool(windowed)
        kc, vc = cache.layer_k(layer), cache.layer_v(layer)
        write_kv(kc, vc, k, v, b.slot_mapping)
        window = cache.window if windowed else None
        a = paged_attention(q, kc, vc, b, scale, window, self.shape.attn_logit_softcap)
        return a.reshape(q.shape[0], -1)


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(heads + 2 kv_heads) * head_dim, hidden]: q, k, v projections stacked
    qkv_bias: torch.Tensor | None  # Qwen2 only
    q_norm: torch.Tensor | None  # Qwen3 only: [head_dim]
    k_norm: torch.Tensor | None
    o: torch.Tensor  # [hidden, heads * head_dim]
    post_attn_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]: gate and up stacked
    down: torch.Tensor  # [hidden, intermediate]


class LlamaModel(DecoderModel):
    def __init__(self, shape: ModelShape, dtype: torch.dtype, device: torch.device, max_seq_len: int) -> None:
        if shape.architecture not in LLAMA_FAMILY:
            raise UnsupportedModelError(
                f"architecture {shape.architecture!r} is not a Llama-family model ({', '.join(LLAMA_FAMILY)})"
            )
        if shape.hidden_activation != "silu":
            raise UnsupportedModelError(
                f"{shape.architecture} with hidden_act {shape.hidden_activation!r} is not supported (only silu)"
            )
        super().__init__(shape, dtype, device, max_seq_len)
        s = shape
        q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        empty = self.empty
        self.embed = empty(s.vocab_size, s.hidden_size)
        self.norm = empty(s.hidden_size)
        self.lm_head = self.embed if s.tie_embeddings else empty(s.vocab_size, s.hidden_size)
        self.layers = [
            LayerWeights(
                input_norm=empty(s.hidden_size),
                qkv=empty(q + 2 * kv, s.hidden_size),
                qkv_bias=empty(q + 2 * kv) if s.qkv_bias else None,
                q_norm=empty(s.head_dim) if s.qk_norm else None,
                k_norm=empty(s.head_dim) if s.qk_norm else None,
                o=empty(s.hidden_size, q),
                post_attn_norm=empty(s.hidden_size),
                gate_up=empty(2 * s.intermediate_size, s.hidden_size),
                down=empty(s.hidden_size, s.intermediate_size),
            )
            for _ in range(s.num_layers)
        ]
        self.inv_freq = inv_frequencies(s.head_dim, s.rope_theta, s.rope_scaling).to(device)
        self.scale = s.head_dim**-0.5

    # -- loading ------------------------------------------------------------------------------------------------

    def destinations(self) -> dict[str, torch.Tensor]:
        dest: dict[str, torch.Tensor] = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        if not self.shape.tie_embeddings:
            dest["lm_head.weight"] = self.lm_head
        for i, lw in enumerate(self.layers):
            p = f"model.layers.{i}."
            dest[p + "input_layernorm.weight"] = lw.input_norm
            dest[p + "post_attention_layernorm.weight"] = lw.post_attn_norm
            dest |= self.projection_destinations(p, lw)
        return dest

    def tensors(self) -> list[torch.Tensor]:
        tensors = [self.embed, self.norm] + ([] if self.shape.tie_embeddings else [self.lm_head])
        for lw in self.layers:
            tensors += [t for t in vars(lw).values() if t is not None]
        return tensors

    # -- forward ------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        cache: KVCache,
        logits_rows: torch.Tensor,
    ) -> torch.Tensor:
        """input_ids, positions: [T]; logits_rows: [R] indices into T -> float32 logits [R, vocab]."""
        eps = self.shape.rms_norm_eps
        h = F.embedding(input_ids, self.embed)  # [T, hidden]
        cos, sin = cos_sin(positions, self.inv_freq, self.dtype)
        for i, lw in enumerate(self.layers):
            x = rms_norm(h, lw.input_norm, eps)
            q, k, v = self.qkv_heads(x, lw)
            if lw.q_norm is not None and lw.k_norm is not None:
                q = rms_norm(q, lw.q_norm, eps)
                k = rms_norm(k, lw.k_norm, eps)
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
            h = h + F.linear(self.attend(i, q, k, v, batch, cache, self.scale), lw.o)
            x = rms_norm(h, lw.post_attn_norm, eps)
            gate, up = F.linear(x, lw.gate_up).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, lw.down)
        # Only rows that sample reach the head: logits for a whole prompt would cost vocab x T floats.
        h = rms_norm(h[logits_rows], self.norm, eps)
        return F.linear(h, self.lm_head).float()
