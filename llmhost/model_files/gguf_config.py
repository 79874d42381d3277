"""Convert GGUF metadata (llama.cpp's key names) into our ModelShape."""

from __future__ import annotations

from typing import Any

from llmhost.errors import ModelFileError, UnsupportedModelError
from llmhost.model_files.gguf_file import GgufFile
from llmhost.model_files.shape import LayerKind, ModelShape, all_sliding, every_nth_full

# general.architecture -> our family. Mistral GGUFs say "llama".
_FAMILIES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}
SUPPORTED_GGUF_ARCHITECTURES = tuple(sorted(_FAMILIES))


def shape_from_gguf(g: GgufFile) -> ModelShape:
    md = g.metadata
    arch = md.get("general.architecture")
    if arch not in _FAMILIES:
        raise UnsupportedModelError(
            f"{g.path}: GGUF architecture {arch!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    family = _FAMILIES[arch]

    def req(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in md:
            raise ModelFileError(f"{g.path}: GGUF metadata has no '{full}', which a {arch} model needs")
        return md[full]

    hidden = int(req("embedding_length"))
    heads = int(req("attention.head_count"))
    layers = int(req("block_count"))
    kv_heads = _per_layer_scalar(md.get(f"{arch}.attention.head_count_kv", heads), g, "attention.head_count_kv")
    head_dim = int(md.get(f"{arch}.attention.key_length", hidden // heads))
    names = {t.name for t in g.tensors}
    vocab = md.get(f"{arch}.vocab_size")
    if vocab is None:
        tokens = md.get("tokenizer.ggml.tokens")
        embd = next((t for t in g.tensors if t.name == "token_embd.weight"), None)
        vocab = len(tokens) if isinstance(tokens, list) else (embd.shape[1] if embd else 0)
    window = md.get(f"{arch}.attention.sliding_window")
    layer_types: tuple[LayerKind, ...] = ()
    if family == "gemma3" and window:
        # llama.cpp's Gemma 3: every 6th layer is global, the others local (sliding).
        layer_types = every_nth_full(layers, 6)
    elif window:
        layer_types = all_sliding(layers)
    gemma = family == "gemma3"
    # What llama.cpp assumes for Gemma 3 where the GGUF is silent: local layers' RoPE base 10000 (newer files
    # write rope.freq_base_swa), and the attention scale 1/sqrt(head_dim) except for the 27B model (62 layers),
    # whose query_pre_attn_scalar is hidden / heads.
    local_theta = md.get(f"{arch}.rope.freq_base_swa", 10000.0) if gemma else None
    pre_attn_scalar = (hidden // heads if layers == 62 else head_dim) if gemma else None
    return ModelShape(
        architecture=family,
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=head_dim,
        intermediate_size=_per_layer_scalar(req("feed_forward_length"), g, "feed_forward_length"),
        vocab_size=int(vocab),
        tie_embeddings="output.weight" not in names,
        max_position_embeddings=int(md.get(f"{arch}.context_length", 2048)),
        rope_theta=float(md.get(f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(md.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        qkv_bias="blk.0.attn_q.bias" in names,
        o_bias="blk.0.attn_output.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        sliding_window=int(window) if window else None,
        layer_types=layer_types,
        norms_per_layer=4 if family == "gemma3" else 2,
        rope_scaling=_rope_scaling(md, arch),
        rope_local_theta=float(local_theta) if local_theta is not None else None,
        query_pre_attn_scalar=float(pre_attn_scalar) if pre_attn_scalar is not None else None,
        attn_logit_softcap=_positive_float(md.get(f"{arch}.attn_logit_softcapping")),
        final_logit_softcap=_positive_float(md.get(f"{arch}.final_logit_softcapping")),
        hidden_activation="gelu_pytorch_tanh" if gemma else "silu",
        hf_architecture=str(md.get("general.name", arch)),
    )


def _per_layer_scalar(v: Any, g: GgufFile, key: str) -> int:
    # Some GGUFs store per-layer arrays; llmhost supports uniform layers only.
    if isinstance(v, list):
        if not v or len(set(v)) != 1:
            raise UnsupportedModelError(f"{g.path}: GGUF '{key}' varies per layer ({v[:4]}...); not supported")
        return int(v[0])
    return int(v)


def _rope_scaling(md: dict[str, Any], arch: str) -> dict[str, Any] | None:
    kind = md.get(f"{arch}.rope.scaling.type")
    if not kind or kind == "none":
        return None
    return {"rope_type": kind, "factor": md.get(f"{arch}.rope.scaling.factor", 1.0)}


def _positive_float(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and v > 0 else None
