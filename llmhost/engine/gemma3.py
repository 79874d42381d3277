"""Gemma 3 decoder (text): interleaved local (sliding-window) and global attention layers, each kind with its own
RoPE base; q/k norms; norms before and after both attention and MLP; GeGLU with tanh GELU; embeddings scaled by
sqrt(hidden); attention scale query_pre_attn_scalar ** -0.5; optional attention and final logit softcapping.

Numerics follow transformers' Gemma3ForCausalLM: RMSNorm computes x * (1 + w) in float32 and casts back; the
embedding scale is rounded to the model dtype before it multiplies. Sliding layers' K/V live in the cache's window
pool, which keeps only each sequence's window (kv_cache.py, block_manager.py).

One deliberate difference: a config's attn_logit_softcapping is applied (DecoderModel.attend), as Gemma 2 applies
it, while transformers 5's Gemma3Attention stores the value and never passes it on. Published Gemma 3 checkpoints
set it to null, so the two agree on every real model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmhost.engine.attention import AttentionBatch
from llmhost.engine.kv_cache import KVCache
from llmhost.engine.model import DecoderModel
from llmhost.engine.rope import apply_rope, cos_sin, inv_frequencies
from llmhost.errors import UnsupportedModelError
from llmhost.model_files.shape import ModelShape

# HF activation names -> the gate activation; Gemma 3 checkpoints say gelu_pytorch_tanh.
_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}


@dataclass
class Gemma3Layer:
    input_norm: torch.Tensor  # [hidden], before attention
    qkv: torch.Tensor  # [(heads + 2 kv_heads) * head_dim, hidden]: q, k, v projections stacked
    qkv_bias: torch.Tensor | None  # attention_bias only
    q_norm: torch.Tensor | None  # [head_dim]
    k_norm: torch.Tensor | None
    o: torch.Tensor  # [hidden, heads * head_dim]
    post_attn_norm: torch.Tensor  # on the attention output, before the residual add
    pre_ffn_norm: torch.Tensor  # before the MLP
    post_ffn_norm: torch.Tensor  # on the MLP output, before the residual add
    gate_up: torch.Tensor  # [2 * intermediate, hidden]: gate and up stacked
    down: torch.Tensor  # [hidden, intermediate]


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's order of rounding: normalise and scale by (1 + w) in float32, then cast back."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + weight.float())).to(x.dtype)


class Gemma3Model(DecoderModel):
    def __init__(self, shape: ModelShape, dtype: torch.dtype, device: torch.device, max_seq_len: int) -> None:
        if shape.architecture != "gemma3":
            raise UnsupportedModelError(f"architecture {shape.architecture!r} is not Gemma 3")
        if shape.hidden_activation not in _ACTIVATIONS:
            raise UnsupportedModelError(
                f"Gemma 3 with hidden_activation {shape.hidden_activation!r} is not supported "
                f"(supported: {', '.join(_ACTIVATIONS)})"
            )
        super().__init__(shape, dtype, device, max_seq_len)
        s = shape
        q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        empty = self.empty
        self.embed = empty(s.vocab_size, s.hidden_size)
        self.norm = empty(s.hidden_size)
        self.lm_head = self.embed if s.tie_embeddings else empty(s.vocab_size, s.hidden_size)
        self.layers = [
            Gemma3Layer(
                input_norm=empty(s.hidden_size),
                qkv=empty(q + 2 * kv, s.hidden_size),
                qkv_bias=empty(q + 2 * kv) if s.qkv_bias else None,
                q_norm=empty(s.head_dim) if s.qk_norm else None,
                k_norm=empty(s.head_dim) if s.qk_norm else None,
                o=empty(s.hidden_size, q),
                post_attn_norm=empty(s.hidden_size),
                pre_ffn_norm=empty(s.hidden_size),
                post_ffn_norm=empty(s.hidden_size),
                gate_up=empty(2 * s.intermediate_size, s.hidden_size),
                down=empty(s.hidden_size, s.intermediate_size),
            )
            for _ in range(s.num_layers)
        ]
        # Global layers: rope_theta with the configured scaling; local layers: their own base, unscaled unless the
        # config scales them too.
        self.inv_freq = inv_frequencies(s.head_dim, s.rope_theta, s.rope_scaling).to(device)
        local_theta = s.rope_local_theta if s.rope_local_theta is not None else s.rope_theta
        self.local_inv_freq = inv_frequencies(s.head_dim, local_theta, s.rope_local_scaling).to(device)
        self.scale = s.attention_scale
        self.approximate = _ACTIVATIONS[s.hidden_activation]
        # transformers multiplies by sqrt(hidden) rounded to the weights' dtype (bf16: 25.25 for 640, not 25.30).
        self.embed_scale = torch.tensor(s.hidden_size**0.5, dtype=dtype, device=device)

    # -- loading ------------------------------------------------------------------------------------------------

    def destinations(self) -> dict[str, torch.Tensor]:
        dest: dict[str, torch.Tensor] = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        if not self.shape.tie_embeddings:
            dest["lm_head.weight"] = self.lm_head
        for i, lw in enumerate(self.layers):
            p = f"model.layers.{i}."
            dest[p + "input_layernorm.weight"] = lw.input_norm
            dest[p + "post_attention_layernorm.weight"] = lw.post_attn_norm
            dest[p + "pre_feedforward_layernorm.weight"] = lw.pre_ffn_norm
            dest[p + "post_feedforward_layernorm.weight"] = lw.post_ffn_norm
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
        s = self.shape
        eps = s.rms_norm_eps
        h = F.embedding(input_ids, self.embed) * self.embed_scale  # [T, hidden]
        rope = {
            "full": cos_sin(positions, self.inv_freq, self.dtype),
            "sliding": cos_sin(positions, self.local_inv_freq, self.dtype),
        }
        for i, lw in enumerate(self.layers):
            cos, sin = rope[s.layer_kind(i)]
            x = gemma_rms_norm(h, lw.input_norm, eps)
            q, k, v = self.qkv_heads(x, lw)
            if lw.q_norm is not None and lw.k_norm is not None:
                q = gemma_rms_norm(q, lw.q_norm, eps)
                k = gemma_rms_norm(k, lw.k_norm, eps)
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
            a = F.linear(self.attend(i, q, k, v, batch, cache, self.scale), lw.o)
            h = h + gemma_rms_norm(a, lw.post_attn_norm, eps)
            x = gemma_rms_norm(h, lw.pre_ffn_norm, eps)
            gate, up = F.linear(x, lw.gate_up).chunk(2, dim=-1)
            m = F.linear(F.gelu(gate, approximate=self.approximate) * up, lw.down)
            h = h + gemma_rms_norm(m, lw.post_ffn_norm, eps)
        # Only rows that sample reach the head: logits for a whole prompt would cost vocab x T floats.
        h = gemma_rms_norm(h[logits_rows], self.norm, eps)
        logits = F.linear(h, self.lm_head)
        cap = s.final_logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()
