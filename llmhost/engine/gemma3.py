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

from llmhost.engine.model import DecoderModel, LayerWeights, StageInputs
from llmhost.engine.placement import LayerPlacement
from llmhost.engine.rope import apply_rope, cos_sin, inv_frequencies
from llmhost.engine.slices import Slices
from llmhost.errors import UnsupportedModelError
from llmhost.model_files.shape import ModelShape

# HF activation names -> the gate activation; Gemma 3 checkpoints say gelu_pytorch_tanh.
_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}


@dataclass
class Gemma3Layer(LayerWeights):
    """LayerWeights (input_norm before attention, post_attn_norm on the attention output before the residual
    add), plus the norms around the MLP."""

    pre_ffn_norm: torch.Tensor  # before the MLP
    post_ffn_norm: torch.Tensor  # on the MLP output, before the residual add


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's order of rounding: normalise and scale by (1 + w) in float32, then cast back."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + weight.float())).to(x.dtype)


class Gemma3Model(DecoderModel):
    layers: list[Gemma3Layer]

    def __init__(
        self,
        shape: ModelShape,
        dtype: torch.dtype,
        device: torch.device,
        max_seq_len: int,
        placement: LayerPlacement | None = None,
    ) -> None:
        if shape.architecture != "gemma3":
            raise UnsupportedModelError(f"architecture {shape.architecture!r} is not Gemma 3")
        if shape.hidden_activation not in _ACTIVATIONS:
            raise UnsupportedModelError(
                f"Gemma 3 with hidden_activation {shape.hidden_activation!r} is not supported "
                f"(supported: {', '.join(_ACTIVATIONS)})"
            )
        super().__init__(shape, dtype, device, max_seq_len, placement)
        s = shape
        self.layers = [self.alloc_layer(i, Gemma3Layer, "pre_ffn_norm", "post_ffn_norm") for i in range(s.num_layers)]
        # Global layers: rope_theta with the configured scaling; local layers: their own base, unscaled unless the
        # config scales them too. One copy per stage's device.
        self.stage_inv_freq = self.per_stage(inv_frequencies(s.head_dim, s.rope_theta, s.rope_scaling))
        local_theta = s.rope_local_theta if s.rope_local_theta is not None else s.rope_theta
        self.stage_local_inv_freq = self.per_stage(inv_frequencies(s.head_dim, local_theta, s.rope_local_scaling))
        self.inv_freq, self.local_inv_freq = self.stage_inv_freq[0], self.stage_local_inv_freq[0]
        self.scale = s.attention_scale
        self.approximate = _ACTIVATIONS[s.hidden_activation]
        # transformers multiplies by sqrt(hidden) rounded to the weights' dtype (bf16: 25.25 for 640, not 25.30).
        self.embed_scale = torch.tensor(s.hidden_size**0.5, dtype=dtype, device=self.device)

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

    def layer_tensors(self, layer: int) -> list[torch.Tensor]:
        return [t for t in vars(self.layers[layer]).values() if t is not None]

    # -- forward ------------------------------------------------------------------------------------------------

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed) * self.embed_scale

    def stage_slices(self, stage: int, h: torch.Tensor, inputs: StageInputs) -> Slices[torch.Tensor]:
        s = self.shape
        eps = s.rms_norm_eps
        batch, cache = inputs.batch, inputs.cache
        rope = {
            "full": cos_sin(inputs.positions, self.stage_inv_freq[stage], self.dtype),
            "sliding": cos_sin(inputs.positions, self.stage_local_inv_freq[stage], self.dtype),
        }
        for n, i in enumerate(self.placement.stages[stage].layers):
            if n:
                yield
            lw = self.layers[i]
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
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        logits = F.linear(gemma_rms_norm(h, self.norm, self.shape.rms_norm_eps), self.lm_head)
        cap = self.shape.final_logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()
