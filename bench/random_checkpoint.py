"""Write a random-weights HF checkpoint at a real model shape (bench/shapes.py), so benches can run the whole
serving path (`llmhost serve` loads checkpoints from disk) at Llama-3-8B size without downloading weights.

The directory holds config.json, one bf16 model.safetensors and a word-level tokenizer.json whose tokens are
`t0 .. t{vocab-1}` (no EOS: generation runs to max_tokens). Weights repeat one 32 MiB block of N(0, 0.02) values
(norms are ones): decode speed and memory do not depend on the values, and writing stays at disk speed with
little RAM. Written once per shape and reused (a `.complete` marker guards against half-written directories).

Usage: python bench/random_checkpoint.py llama-3-8b /tmp/llmhost-bench/llama-3-8b
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shapes import SHAPES

from llmhost.model_files.shape import ModelShape

BLOCK_BYTES = 32 * 1024**2
_HF_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def hf_config(shape: ModelShape) -> dict[str, object]:
    if shape.architecture not in _HF_ARCH:
        raise ValueError(f"random checkpoints support {', '.join(_HF_ARCH)}, not {shape.architecture}")
    return {
        "architectures": [_HF_ARCH[shape.architecture]],
        "model_type": shape.architecture,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "num_hidden_layers": shape.num_layers,
        "vocab_size": shape.vocab_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "rope_theta": shape.rope_theta,
        "rms_norm_eps": shape.rms_norm_eps,
        "tie_word_embeddings": shape.tie_embeddings,
        "sliding_window": None,
        "torch_dtype": "bfloat16",
    }


def tensor_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    h, q, kv = shape.hidden_size, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    inter = shape.intermediate_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab_size, h)}
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
        if shape.qkv_bias:
            out |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,)}
            out |= {p + "self_attn.v_proj.bias": (kv,)}
    out["model.norm.weight"] = (h,)
    if not shape.tie_embeddings:
        out["lm_head.weight"] = (shape.vocab_size, h)
    return out


def _bf16(values: np.ndarray) -> bytes:
    # bfloat16 is the top half of a float32 (truncation is fine for random data).
    return (values.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    rng = np.random.default_rng(0)
    block = _bf16(rng.standard_normal(BLOCK_BYTES // 2, dtype=np.float32) * 0.02)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shp in shapes.items():
        n = 2 * int(np.prod(shp))
        header[name] = {"dtype": "BF16", "shape": list(shp), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    ones = _bf16(np.ones(max(s[0] for s in shapes.values() if len(s) == 1), dtype=np.float32))
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shp in shapes.items():
            n = 2 * int(np.prod(shp))
            if len(shp) == 1:
                f.write(ones[:n] if "norm" in name else bytes(n))  # norms 1, biases 0
                continue
            while n > 0:
                f.write(block[: min(n, len(block))])
                n -= min(n, len(block))


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
    }
    (directory / "tokenizer.json").write_text(json.dumps(tok))
    (directory / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))


def random_checkpoint(name: str, directory: Path) -> Path:
    """The directory of a random checkpoint at shape `name`, written unless already complete."""
    shape = SHAPES[name]
    marker = directory / ".complete"
    if marker.is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config(shape), indent=2))
    write_tokenizer(directory, shape.vocab_size)
    write_safetensors(directory / "model.safetensors", tensor_shapes(shape))
    marker.touch()
    return directory


if __name__ == "__main__":
    print(random_checkpoint(sys.argv[1], Path(sys.argv[2])))
