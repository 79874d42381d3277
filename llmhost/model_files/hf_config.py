"""Convert an HF config.json (a dict) into our ModelShape, once, at the edge."""

from __future__ import annotations

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

    def req(key: str) -> Any:
        if key not in cfg:
            raise ModelFileError(f"{where}: config.json has no '{key}', which a {model_type} model needs")
        return cfg[key]

    hidden = int(req("hidden_size"))
    heads = int(req("num_attention_heads"))
    layers = int(req("num_hidden_layers"))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    archs = cfg.get("architectures") or [""]
    sliding_window = cfg.get("sliding_window")
    layer_types: tuple[LayerKind, ...] = ()
    norms_per_layer = 2
    qk_norm = family == "qwen3"
    attention_bias = bool(cfg.get("attention_bias", family == "qwen2"))
    tie_default = False
    if family == "gemma3":
        norms_per_layer = 4
        qk_norm = True
        tie_default = True
        layer_types = _gemma3_layer_types(cfg, layers)
    elif family in ("mistral", "qwen2", "qwen3"):
        # Mistral v0.1 and Qwen configs carry sliding_window but only use it when use_sliding_window is set
        # (Mistral: a non-null window applies to every layer).
        if family != "mistral" and not cfg.get("use_sliding_window", False):
            sliding_window = None
        if sliding_window:
            layer_types = all_sliding(layers)
    else:
        sliding_window = None
    for dim in (hidden, heads, layers, kv_heads, head_dim):
        if dim <= 0:
            raise ModelFileError(f"{where}: config.json has a non-positive dimension ({dim})")
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
        intermediate_size=int(req("intermediate_size")),
        vocab_size=int(req("vocab_size")),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", tie_default)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6 if family == "gemma3" else 1e-5)),
        attention_bias=attention_bias,
        qk_norm=qk_norm,
        sliding_window=int(sliding_window) if sliding_window else None,
        layer_types=layer_types,
        norms_per_layer=norms_per_layer,
        rope_scaling=cfg.get("rope_scaling"),
        hf_architecture=str(archs[0]),
    )


def _gemma3_layer_types(cfg: dict[str, Any], layers: int) -> tuple[LayerKind, ...]:
    names = cfg.get("layer_types")
    if isinstance(names, list) and len(names) == layers:
        kinds: list[LayerKind] = ["sliding" if n == "sliding_attention" else "full" for n in names]
        return tuple(kinds)
    # Older configs: every `sliding_window_pattern`-th layer is global, the rest local.
    pattern = int(cfg.get("sliding_window_pattern", 6))
    return every_nth_full(layers, pattern)
