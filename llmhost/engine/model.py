"""Llama-family decoder (Llama 1/2/3/3.1, Mistral, Qwen2/2.5, Qwen3, SmolLM2, Yi) over a paged KV cache, and
`DecoderModel`, what every model class shares (loading, byte count, the attention step over the cache).

Weights live in plain tensors allocated once at their final size (q/k/v and gate/up fused), so device memory is
exactly the estimate's `weights` term; loading copies each streamed tensor into its slice.

A model may be split into stages (placement.py): each layer's tensors live on its stage's device, the embedding on
the first, the final norm and head on the last (a tied head copied there when split). `forward_stages` runs the
stages in order and hands the hidden state from one to the next with an asynchronous device-to-device copy.
"""

from __future__ import annotations

import abc
import contextlib
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
import torch.nn.functional as F

from llmhost.engine.attention import AttentionBatch, paged_attention, write_kv
from llmhost.engine.kv_cache import KVCache
from llmhost.engine.placement import LayerPlacement
from llmhost.engine.rope import apply_rope, cos_sin, inv_frequencies
from llmhost.engine.slices import Slices, drain, each_in
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


@dataclass(frozen=True)
class StageInputs:
    """One stage's view of a step, on the stage's device."""

    positions: torch.Tensor  # [T] int64
    batch: AttentionBatch
    cache: KVCache  # holds this stage's layers


L = TypeVar("L", bound="LayerWeights")


class DecoderModel(abc.ABC):
    """Weights allocated once at their final size and filled by `load`; `forward` runs a flat token batch over
    the paged cache and returns float32 logits of the rows that sample. Subclasses allocate their layers in
    __init__ (each on `device_of(i)`), name them in `destinations`, and run one stage's layers in
    `stage_slices` (a layer per slice)."""

    shape: ModelShape
    dtype: torch.dtype
    device: torch.device  # the first stage's: where token ids enter (the whole model's when not split)
    placement: LayerPlacement
    layers: Sequence[LayerWeights]  # set by the subclass: one per decoder layer, each on its stage's device
    fused = False  # the forward runs the fused GPU kernels (LlamaModel on a GPU), attention over flat contexts

    def __init__(
        self,
        shape: ModelShape,
        dtype: torch.dtype,
        device: torch.device,
        max_seq_len: int,
        placement: LayerPlacement | None = None,
    ) -> None:
        """placement: the stages; None puts every layer on `device`."""
        if shape.o_bias or shape.mlp_bias:
            raise UnsupportedModelError(
                "o_proj or MLP biases (attention_bias / mlp_bias in config.json) are not supported"
            )
        self.shape = shape
        self.dtype = dtype
        self.placement = placement if placement is not None else LayerPlacement.single(device, shape.num_layers)
        self.device = self.placement.first
        self.max_seq_len = max_seq_len
        s = shape
        first, last = self.placement.first, self.placement.last
        self.embed = self.empty(s.vocab_size, s.hidden_size, device=first)
        self.norm = self.empty(s.hidden_size, device=last)
        # A tied head reads the embedding; a split model's last stage needs its own copy of it, filled at load
        # (memory/estimate.py stage_weights counts that copy). Stages, not devices, decide: the CPU tests run the
        # split path with every stage on "cpu".
        self.own_head = not s.tie_embeddings or self.placement.split
        self.lm_head = self.empty(s.vocab_size, s.hidden_size, device=last) if self.own_head else self.embed

    def empty(self, *dims: int, device: torch.device | None = None) -> torch.Tensor:
        return torch.empty(dims, dtype=self.dtype, device=self.device if device is None else device)

    def device_of(self, layer: int) -> torch.device:
        return self.placement.device_of(layer)

    def alloc_layer(self, i: int, cls: type[L], *extra_norms: str) -> L:
        """Layer i's tensors on its stage's device: the projections and norms every decoder layer here holds,
        plus `extra_norms`, more [hidden] norms a subclass of LayerWeights adds (Gemma 3's around the MLP)."""
        s, dev = self.shape, self.device_of(i)
        q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim

        def empty(*dims: int) -> torch.Tensor:
            return self.empty(*dims, device=dev)

        tensors: dict[str, Any] = {
            "input_norm": empty(s.hidden_size),
            "qkv": empty(q + 2 * kv, s.hidden_size),
            "qkv_bias": empty(q + 2 * kv) if s.qkv_bias else None,
            "q_norm": empty(s.head_dim) if s.qk_norm else None,
            "k_norm": empty(s.head_dim) if s.qk_norm else None,
            "o": empty(s.hidden_size, q),
            "post_attn_norm": empty(s.hidden_size),
            "gate_up": empty(2 * s.intermediate_size, s.hidden_size),
            "down": empty(s.hidden_size, s.intermediate_size),
        }
        return cls(**tensors, **{name: empty(s.hidden_size) for name in extra_norms})

    def per_stage(self, t: torch.Tensor) -> list[torch.Tensor]:
        """A small constant (e.g. RoPE frequencies) copied once onto each stage's device, in stage order."""
        return [t.to(st.device) for st in self.placement.stages]

    @abc.abstractmethod
    def destinations(self) -> dict[str, torch.Tensor]:
        """HF tensor name -> the view of our storage it fills."""

    @abc.abstractmethod
    def layer_tensors(self, layer: int) -> list[torch.Tensor]:
        """Every tensor of one decoder layer."""

    @abc.abstractmethod
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [T] on the first stage's device -> hidden states [T, hidden]."""

    def run_stage(self, stage: int, h: torch.Tensor, inputs: StageInputs) -> torch.Tensor:
        """The layers of stage `stage` over h: [T, hidden] on that stage's device -> [T, hidden]."""
        return drain(self.stage_slices(stage, h, inputs))

    @abc.abstractmethod
    def stage_slices(self, stage: int, h: torch.Tensor, inputs: StageInputs) -> Slices[torch.Tensor]:
        """run_stage a layer at a time (slices.py): each slice queues one layer's kernels."""

    @abc.abstractmethod
    def head(self, h: torch.Tensor) -> torch.Tensor:
        """h: [R, hidden] on the last stage's device -> float32 logits [R, vocab]."""

    def stage_tensors(self, k: int) -> list[torch.Tensor]:
        """Every tensor stage k owns: its layers, the embedding on the first, the norm and own head on the last."""
        st = self.placement.stages[k]
        tensors = [self.embed] if k == 0 else []
        for i in st.layers:
            tensors += self.layer_tensors(i)
        if k == len(self.placement.stages) - 1:
            tensors += [self.norm] + ([self.lm_head] if self.own_head else [])
        return tensors

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this model owns, each once (an unsplit tied head is the embedding)."""
        return [t for k in range(len(self.placement.stages)) for t in self.stage_tensors(k)]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        cache: KVCache,
        logits_rows: torch.Tensor,
    ) -> torch.Tensor:
        """An unsplit model's step: input_ids, positions: [T]; logits_rows: [R] indices into T -> float32 logits
        [R, vocab]."""
        return self.forward_stages(input_ids, [StageInputs(positions, batch, cache)], logits_rows)

    def forward_stages(
        self, input_ids: torch.Tensor, stages: Sequence[StageInputs], logits_rows: torch.Tensor
    ) -> torch.Tensor:
        """input_ids: [T] on the first stage's device; stages: one StageInputs per stage, each on its device;
        logits_rows: [R] indices into T, on the last stage's device -> float32 logits [R, vocab] there."""
        return drain(self.forward_slices(input_ids, stages, logits_rows))

    @torch.inference_mode()  # around each slice (torch enters it on every resumption of a generator)
    def forward_slices(
        self, input_ids: torch.Tensor, stages: Sequence[StageInputs], logits_rows: torch.Tensor, head: bool = True
    ) -> Slices[torch.Tensor]:
        """forward_stages a layer at a time (slices.py): the embedding goes with the first layer, the head with
        the last. head=False: the rows' final hidden states [R, hidden] instead, for a caller that runs the head
        on them in pieces."""
        if len(stages) != len(self.placement.stages):
            raise ValueError(f"{len(stages)} stage inputs for a model of {len(self.placement.stages)} stages")
        h = self.embed_tokens(input_ids)  # [T, hidden]
        for k, st in enumerate(self.placement.stages):
            # The hand-off: a device-to-device copy ordered on the streams of both devices, with no host sync
            # (when both stages share a device it returns h itself; the path is the same).
            h = h.to(st.device, non_blocking=True)
            # Each stage runs with its GPU current: Triton launches on the current device, not the tensors'
            # (with the first stage's current, a split model's later stages gave other tokens on 2x H200).
            h = yield from each_in(self.stage_slices(k, h, stages[k]), functools.partial(_current, st.device))
        # Only rows that sample reach the head: logits for a whole prompt would cost vocab x T floats.
        return self.head(h[logits_rows]) if head else h[logits_rows]

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
        if self.shape.tie_embeddings and self.own_head:
            self.lm_head.copy_(self.embed)  # the split model's tied head: the embedding, on the last device

    def weight_devices(self) -> dict[str, torch.device]:
        """HF tensor name -> the device its destination lives on, so streaming places each tensor there directly.
        Names with no destination (a tied checkpoint's stored head, inv_freq buffers) are absent."""
        return {name: t.device for name, t in self.destinations().items()}

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
    def __init__(
        self,
        shape: ModelShape,
        dtype: torch.dtype,
        device: torch.device,
        max_seq_len: int,
        placement: LayerPlacement | None = None,
    ) -> None:
        if shape.architecture not in LLAMA_FAMILY:
            raise UnsupportedModelError(
                f"architecture {shape.architecture!r} is not a Llama-family model ({', '.join(LLAMA_FAMILY)})"
            )
        if shape.hidden_activation != "silu":
            raise UnsupportedModelError(
                f"{shape.architecture} with hidden_act {shape.hidden_activation!r} is not supported (only silu)"
            )
        super().__init__(shape, dtype, device, max_seq_len, placement)
        s = shape
        self.layers = [self.alloc_layer(i, LayerWeights) for i in range(s.num_layers)]
        self.stage_inv_freq = self.per_stage(inv_frequencies(s.head_dim, s.rope_theta, s.rope_scaling))
        self.inv_freq = self.stage_inv_freq[0]  # the first stage's (the decode runner's, unsplit)
        self.scale = s.head_dim**-0.5
        # On a GPU the forward runs the decode path's fused Triton kernels (norm + residual, RoPE + KV write,
        # SiLU x up): a 2048-token prefill chunk otherwise spends a fifth of its time in ~35 elementwise launches
        # per layer. They round op by op as this reference does; tests switch them on under Triton's interpreter.
        self.fused = self.device.type == "cuda"

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

    def layer_tensors(self, layer: int) -> list[torch.Tensor]:
        return [t for t in vars(self.layers[layer]).values() if t is not None]

    # -- forward ------------------------------------------------------------------------------------------------

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed)

    def stage_slices(self, stage: int, h: torch.Tensor, inputs: StageInputs) -> Slices[torch.Tensor]:
        if self.fused and not any(inputs.cache.in_window_pool(i) for i in self.placement.stages[stage].layers):
            return (yield from self._fused_slices(stage, h, inputs))
        eps = self.shape.rms_norm_eps
        batch, cache = inputs.batch, inputs.cache
        cos, sin = cos_sin(inputs.positions, self.stage_inv_freq[stage], self.dtype)
        for n, i in enumerate(self.placement.stages[stage].layers):
            if n:
                yield
            lw = self.layers[i]
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
        return h

    def _fused_slices(self, stage: int, h: torch.Tensor, inputs: StageInputs) -> Slices[torch.Tensor]:
        """stage_slices with the fused kernels: the same arithmetic in the same rounding order, fewer launches."""
        from llmhost.engine.kernels.fused import add_rms_norm, rope_write_kv, silu_mul
        from llmhost.engine.kernels.fused import rms_norm as rms_norm_fused
        from llmhost.engine.kernels.varlen_attention import varlen_attention, varlen_ok

        s = self.shape
        eps = s.rms_norm_eps
        q_dim, kv_dim = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        t = h.shape[0]
        h = h.clone()  # updated in place below; the caller's tensor stays as it was
        layers = self.placement.stages[stage].layers
        x = rms_norm_fused(h, self.layers[layers[0]].input_norm, eps)
        for i in layers:
            if i != layers[0]:
                yield
            lw = self.layers[i]
            qkv = F.linear(x, lw.qkv, lw.qkv_bias)
            if lw.q_norm is not None and lw.k_norm is not None:
                q = qkv[:, :q_dim].view(t, s.num_heads, s.head_dim)
                k = qkv[:, q_dim : q_dim + kv_dim].view(t, s.num_kv_heads, s.head_dim)
                q.copy_(rms_norm(q, lw.q_norm, eps))
                k.copy_(rms_norm(k, lw.k_norm, eps))
            kc, vc = inputs.cache.layer_k(i), inputs.cache.layer_v(i)
            rope_write_kv(
                qkv, inputs.positions, self.stage_inv_freq[stage], inputs.batch.slot_mapping, kc, vc,
                s.num_heads, s.num_kv_heads,
            )  # fmt: skip
            q = qkv[:, :q_dim].view(t, s.num_heads, s.head_dim)
            flat = inputs.batch.flat
            if flat is not None and s.attn_logit_softcap is None and varlen_ok(q, kc):
                a = varlen_attention(q, kc, vc, flat, self.scale)
            else:
                a = paged_attention(q, kc, vc, inputs.batch, self.scale, None, s.attn_logit_softcap)
            x = add_rms_norm(F.linear(a.reshape(t, q_dim), lw.o), h, lw.post_attn_norm, eps)
            down = F.linear(silu_mul(F.linear(x, lw.gate_up)), lw.down)
            if i + 1 < layers.stop:
                x = add_rms_norm(down, h, self.layers[i + 1].input_norm, eps)
            else:
                h.add_(down)  # the head (or the next stage) norms h itself
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm(h, self.norm, self.shape.rms_norm_eps), self.lm_head).float()


def _current(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """`device` as the current GPU (Triton launches on the current device, not the tensors'); nothing on a CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
