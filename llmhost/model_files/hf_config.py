"""Convert an HF config.json (a dict) into our ModelShape, once, at the edge."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmhost.errors import ModelFileError, UnsupportedModelError
from llmhost.model_files.shape import LayerKind, ModelShape, all_sliding, every_nth_full

# model_type -> our family. SmolLM2 and Yi ship model_type "llama".
_FAMILIES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}
SUPPORTED_MODEL_TYPES = tuple(sorted(_FAMILIES))


def shape_from_hf_config(cfg: dict[str, Any], where: str) -> ModelShape:
    model_type = cfg.get("model_type")
    if model_type == "gemma3" and isinstance(cfg.get("text_config"), dict):
        # Multimodal Gemma 3 wraps the language model's numbers in text_config.
        cfg = {**cfg["text_config"], "architectures": cfg.get("architectures", [])}
        model_type = "gemma3_text"
    if model_type not in _FAMILIES:
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    family = _FAMILIES[model_type]

    def req(key: str) -> int:
        if key not in cfg:
            raise ModelFileError(f"{where}: config.json has no '{key}', which a {model_type} model needs")
        return _positive(cfg[key], key)

    def opt(key: str, default: int) -> int:
        return _positive(cfg[key], key) if cfg.get(key) is not None else default

    def _positive(value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelFileError(f"{where}: config.json '{key}' must be a positive integer, got {value!r}")
        return value

    hidden = req("hidden_size")
    heads = req("num_attention_heads")
    layers = req("num_hidden_layers")
    kv_heads = opt("num_key_value_heads", heads)
    head_dim = opt("head_dim", hidden // heads)
    archs = cfg.get("architectures") or [""]
    sliding_window = cfg.get("sliding_window")
    layer_types: tuple[LayerKind, ...] = ()
    norms_per_layer = 2
    qk_norm = family == "qwen3"
    # Which projections carry biases differs by family: Qwen2 has q/k/v biases only; Mistral none; Llama, Qwen3
    # and Gemma 3 put `attention_bias` on q/k/v and o; Llama's `mlp_bias` on gate/up/down.
    attention_bias = bool(cfg.get("attention_bias", False))
    qkv_bias = family == "qwen2" or (attention_bias and family != "mistral")
    o_bias = attention_bias and family in ("llama", "qwen3", "gemma3")
    mlp_bias = bool(cfg.get("mlp_bias", False)) and family == "llama"
    tie_default = False
    gemma = _Gemma3Extras()
    if family == "gemma3":
        norms_per_layer = 4
        qk_norm = True
        tie_default = True
        layer_types = _gemma3_layer_types(cfg, layers)
        gemma = _gemma3_extras(cfg, where)
    elif family in ("mistral", "qwen2", "qwen3"):
        # Mistral v0.1 and Qwen configs carry sliding_window but only use it when use_sliding_window is set
        # (Mistral: a non-null window applies to every layer).
        if family != "mistral" and not cfg.get("use_sliding_window", False):
            sliding_window = None
        if sliding_window:
            layer_types = all_sliding(layers)
    else:
        sliding_window = None
    if heads % kv_heads:
        raise ModelFileError(
            f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    return ModelShape(
        architecture=family,
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=req("intermediate_size"),
        vocab_size=req("vocab_size"),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", tie_default)),
        max_position_embeddings=opt("max_position_embeddings", 2048),
        rope_theta=_rope_theta(cfg, 1e6 if family == "gemma3" else 10000.0),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6 if family == "gemma3" else 1e-5)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        qk_norm=qk_norm,
        sliding_window=int(sliding_window) if sliding_window else None,
        layer_types=layer_types,
        norms_per_layer=norms_per_layer,
        rope_scaling=_rope_scaling(cfg),
        rope_local_theta=gemma.rope_local_theta,
        rope_local_scaling=gemma.rope_local_scaling,
        query_pre_attn_scalar=gemma.query_pre_attn_scalar,
        attn_logit_softcap=gemma.attn_logit_softcap,
        final_logit_softcap=gemma.final_logit_softcap,
        hidden_activation=str(cfg.get("hidden_activation") or cfg.get("hidden_act") or gemma.hidden_activation),
        hf_architecture=str(archs[0]),
    )


def _rope_parameters(cfg: dict[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    """transformers >= 5 writes `rope_parameters` (theta and scaling together); older configs write `rope_theta`
    and `rope_scaling`. Gemma 3 nests one entry per layer type: "full_attention" (global layers, whose theta and
    scaling describe long context) and "sliding_attention" (local layers)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):
        params = params.get(layer_type)
    return params if isinstance(params, dict) else {}


def _rope_theta(cfg: dict[str, Any], default: float) -> float:
    return float(cfg.get("rope_theta") or _rope_parameters(cfg).get("rope_theta") or default)


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    return _scaling_of(cfg.get("rope_scaling") or _rope_parameters(cfg))


def _scaling_of(scaling: Any) -> dict[str, Any] | None:
    if not isinstance(scaling, dict):
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    return {k: v for k, v in scaling.items() if k != "rope_theta"} | {"rope_type": kind}


@dataclass(frozen=True)
class _Gemma3Extras:
    """Gemma 3's numbers beyond the Llama family's; the defaults are what the other families mean."""

    rope_local_theta: float | None = None
    rope_local_scaling: dict[str, Any] | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    hidden_activation: str = "silu"


def _gemma3_extras(cfg: dict[str, Any], where: str) -> _Gemma3Extras:
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedModelError(
            f"{where}: use_bidirectional_attention is set (an embedding model such as EmbeddingGemma); "
            "llmhost runs causal language models only"
        )
    # transformers' defaults when a key is absent: local theta 10000, query_pre_attn_scalar 256.
    local = _rope_parameters(cfg, "sliding_attention")
    local_theta = local.get("rope_theta") or cfg.get("rope_local_base_freq") or 10000.0

    def cap(key: str) -> float | None:
        v = cfg.get(key)
        return float(v) if v else None

    return _Gemma3Extras(
        rope_local_theta=float(local_theta),
        rope_local_scaling=_scaling_of(local),
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or 256),
        attn_logit_softcap=cap("attn_logit_softcapping"),
        final_logit_softcap=cap("final_logit_softcapping"),
        hidden_activation="gelu_pytorch_tanh",
    )


def _gemma3_layer_types(cfg: dict[str, Any], layers: int) -> tuple[LayerKind, ...]:
    names = cfg.get("layer_types")
    if isinstance(names, list) and len(names) == layers:
        kinds: list[LayerKind] = ["sliding" if n == "sliding_attention" else "full" for n in names]
        return tuple(kinds)
    # Older configs: every `sliding_window_pattern`-th layer is global, the rest local.
    pattern = int(cfg.get("sliding_window_pattern", 6))
    return every_nth_full(layers, pattern)
