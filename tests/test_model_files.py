"""model_files: shapes from real configs, tiny random checkpoints, the real SmolLM2 GGUF, broken inputs."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from checkpoint_files import (
    BAD_INPUTS,
    REAL_PARAM_COUNTS,
    bad_input_params,
    config_fixtures,
    hf_tensor_shapes,
    smollm2_gguf,
    tiny_config,
    tiny_llama_gguf_metadata,
    tiny_llama_gguf_tensors,
    write_gguf,
    write_hf_checkpoint,
)

from llmhost.errors import ModelFileError, UnsupportedModelError
from llmhost.model_files import Checkpoint, ModelShape, open_checkpoint
from llmhost.model_files.gguf_config import SUPPORTED_GGUF_ARCHITECTURES
from llmhost.model_files.hf_config import SUPPORTED_MODEL_TYPES, shape_from_hf_config

FIXTURE_NAMES = sorted(REAL_PARAM_COUNTS)


@pytest.fixture(scope="module")
def smollm2() -> Checkpoint:
    return open_checkpoint(smollm2_gguf())


def shape_of(name: str) -> ModelShape:
    return shape_from_hf_config(config_fixtures()[name], f"{name}/config.json")


# -- shapes from the real config.json files ---------------------------------------------------------------


def test_every_fixture_has_a_known_count() -> None:
    assert sorted(config_fixtures()) == FIXTURE_NAMES


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_param_count_of_real_configs_is_exact(name: str) -> None:
    assert shape_of(name).param_count() == REAL_PARAM_COUNTS[name]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_analytic_count_matches_hf_tensor_table(name: str) -> None:
    # The helper's tensor table (transformers' names and shapes) agrees with ModelShape at full size too.
    cfg = config_fixtures()[name]
    shape = shape_of(name)
    tensors = hf_tensor_shapes(cfg, tie=shape.tie_embeddings)
    total = 0
    for dims in tensors.values():
        n = 1
        for d in dims:
            n *= d
        total += n
    assert total == REAL_PARAM_COUNTS[name]


# bf16 KV bytes per token, all layers: layers x 2 (K and V) x kv_heads x head_dim x 2 bytes.
KV_BF16 = {
    "llama-3-8b": 32 * 2 * 8 * 128 * 2,  # 131072
    "llama-3-70b": 80 * 2 * 8 * 128 * 2,
    "llama-3.1-8b": 32 * 2 * 8 * 128 * 2,
    "mistral-7b-v0.1": 32 * 2 * 8 * 128 * 2,
    "qwen2.5-7b": 28 * 2 * 4 * 128 * 2,
    "qwen3-8b": 36 * 2 * 8 * 128 * 2,
    "yi-34b": 60 * 2 * 8 * 128 * 2,
    "smollm2-135m": 30 * 2 * 3 * 64 * 2,
    "gemma-3-270m": 18 * 2 * 1 * 256 * 2,
}


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_kv_bytes_per_token(name: str) -> None:
    shape = shape_of(name)
    assert shape.kv_bytes_per_token(2) == KV_BF16[name]
    assert shape.kv_bytes_per_token(4) == 2 * KV_BF16[name]
    assert shape.kv_bytes_per_token_layer(2) * shape.num_layers == KV_BF16[name]


def test_llama3_8b_kv_bytes_literal() -> None:
    assert shape_of("llama-3-8b").kv_bytes_per_token(2) == 131072


def test_family_details_from_real_configs() -> None:
    llama = shape_of("llama-3-8b")
    assert (llama.architecture, llama.hf_architecture) == ("llama", "LlamaForCausalLM")
    assert (llama.num_kv_heads, llama.head_dim, llama.rope_theta) == (8, 128, 500000.0)
    assert not llama.tie_embeddings and llama.sliding_window is None and llama.rope_scaling is None

    mistral = shape_of("mistral-7b-v0.1")
    assert mistral.architecture == "mistral"
    assert mistral.sliding_window == 4096 and mistral.num_sliding_layers == 32

    qwen2 = shape_of("qwen2.5-7b")
    assert qwen2.qkv_bias and not qwen2.qk_norm
    assert qwen2.sliding_window is None  # use_sliding_window is false although sliding_window is set

    qwen3 = shape_of("qwen3-8b")
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.head_dim == 128

    yi = shape_of("yi-34b")
    assert (yi.architecture, yi.num_heads, yi.num_kv_heads, yi.head_dim) == ("llama", 56, 8, 128)

    smol = shape_of("smollm2-135m")
    assert smol.tie_embeddings and smol.head_params() == 576


def test_llama31_rope_scaling_is_kept() -> None:
    shape = shape_of("llama-3.1-8b")
    assert shape.rope_scaling == {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    }
    assert shape.max_position_embeddings == 131072


def test_gemma3_270m_shape() -> None:
    shape = shape_of("gemma-3-270m")
    assert shape.architecture == "gemma3"
    assert (shape.hidden_size, shape.num_layers, shape.num_heads, shape.num_kv_heads) == (640, 18, 4, 1)
    assert (shape.head_dim, shape.intermediate_size, shape.vocab_size) == (256, 2048, 262144)
    assert shape.tie_embeddings and shape.qk_norm and shape.norms_per_layer == 4
    assert shape.sliding_window == 512
    assert shape.num_sliding_layers == 15
    assert [shape.layer_kind(i) for i in range(6)] == ["sliding"] * 5 + ["full"]
    assert shape.layer_kind(17) == "full"


def test_gemma3_pattern_without_layer_types() -> None:
    cfg = config_fixtures()["gemma-3-270m"]
    del cfg["layer_types"]
    cfg["sliding_window_pattern"] = 6
    shape = shape_from_hf_config(cfg, "config.json")
    assert shape.layer_types == shape_of("gemma-3-270m").layer_types


def test_multimodal_gemma3_wrapper_reads_text_config() -> None:
    text = config_fixtures()["gemma-3-270m"]
    wrapped: dict[str, Any] = {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": text,
    }
    shape = shape_from_hf_config(wrapped, "config.json")
    assert shape.param_count() == REAL_PARAM_COUNTS["gemma-3-270m"]
    assert shape.hf_architecture == "Gemma3ForConditionalGeneration"


# -- tiny random checkpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_tiny_checkpoint_param_count(tmp_path: Path, name: str, shards: int) -> None:
    cfg = tiny_config(name)
    ckpt = open_checkpoint(write_hf_checkpoint(tmp_path / name, cfg, shards=shards))
    assert ckpt.format == "safetensors"
    assert ckpt.shape == shape_from_hf_config(cfg, "config.json")
    assert ckpt.param_count == ckpt.shape.param_count()
    assert ckpt.stored_bytes == 4 * ckpt.param_count
    assert ckpt.stored_dtypes() == {"F32": ckpt.param_count}
    assert len({t.file for t in ckpt.tensors}) == shards


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_params_by_part(tmp_path: Path, name: str) -> None:
    ckpt = open_checkpoint(write_hf_checkpoint(tmp_path / name, tiny_config(name)))
    shape = ckpt.shape
    parts = ckpt.params_by_part()
    assert parts.pop("embed") == shape.embed_params()
    assert parts.pop("head") == shape.head_params()
    assert parts == dict.fromkeys(range(shape.num_layers), shape.layer_params())  # nothing left in "other"


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_half_precision_stored_bytes(tmp_path: Path, dtype: str) -> None:
    ckpt = open_checkpoint(write_hf_checkpoint(tmp_path / "m", tiny_config("qwen3-8b"), dtype=dtype))
    assert ckpt.param_count == ckpt.shape.param_count()
    assert ckpt.stored_bytes == 2 * ckpt.param_count
    assert ckpt.stored_dtypes() == {dtype: ckpt.param_count}


@pytest.mark.parametrize("tie", [True, False])
def test_tie_override(tmp_path: Path, tie: bool) -> None:
    ckpt = open_checkpoint(write_hf_checkpoint(tmp_path / "m", tiny_config("llama-3-8b"), tie=tie))
    names = {t.name for t in ckpt.tensors}
    assert ckpt.shape.tie_embeddings is tie
    assert ("lm_head.weight" in names) is not tie
    assert ckpt.param_count == ckpt.shape.param_count()


def test_tensor_offsets_cover_each_file_exactly(tmp_path: Path) -> None:
    ckpt = open_checkpoint(write_hf_checkpoint(tmp_path / "m", tiny_config("qwen2.5-7b"), shards=2))
    for file in {t.file for t in ckpt.tensors}:
        spans = sorted((t.offset, t.offset + t.stored_bytes) for t in ckpt.tensors if t.file == file)
        for (_, end), (begin, _) in itertools.pairwise(spans):
            assert end == begin  # contiguous, no overlap
        assert spans[-1][1] == file.stat().st_size


def test_tensor_shapes_are_torch_order(tmp_path: Path) -> None:
    ckpt = open_checkpoint(write_hf_checkpoint(tmp_path / "m", tiny_config("llama-3-8b")))
    by_name = {t.name: t for t in ckpt.tensors}
    assert by_name["model.embed_tokens.weight"].shape == (256, 64)
    assert by_name["model.layers.0.mlp.down_proj.weight"].shape == (64, 96)
    assert by_name["model.layers.2.self_attn.k_proj.weight"].part == 2


def test_sharded_checkpoint_ignores_stray_files_outside_the_index(tmp_path: Path) -> None:
    d = write_hf_checkpoint(tmp_path / "m", tiny_config("llama-3-8b"), shards=2)
    write_hf_checkpoint(tmp_path / "other", tiny_config("llama-3-8b"))
    (tmp_path / "other" / "model.safetensors").rename(d / "consolidated.safetensors")
    ckpt = open_checkpoint(d)
    assert ckpt.param_count == ckpt.shape.param_count()


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("llama-3-8b", {"attention_bias": True}),  # transformers: q, k, v and o projections all get a bias
        ("llama-3-8b", {"mlp_bias": True}),  # transformers: gate, up and down projections get a bias
        ("qwen3-8b", {"attention_bias": True}),  # Qwen3 puts attention_bias on o_proj too
        ("mistral-7b-v0.1", {"attention_bias": True}),  # transformers' Mistral ignores it: no bias at all
    ],
)
def test_bias_variants_counted(tmp_path: Path, name: str, overrides: dict[str, Any]) -> None:
    ckpt = open_checkpoint(write_hf_checkpoint(tmp_path / "m", tiny_config(name, **overrides)))
    assert ckpt.param_count == ckpt.shape.param_count()
    assert ckpt.params_by_part()[0] == ckpt.shape.layer_params()


# -- GGUF ------------------------------------------------------------------------------------------------


def test_smollm2_gguf(smollm2: Checkpoint) -> None:
    shape = smollm2.shape
    assert smollm2.format == "gguf"
    assert shape.architecture == "llama"
    assert shape.num_layers == 30
    assert smollm2.param_count == 134_515_008
    assert shape.param_count() == 134_515_008
    assert shape.tie_embeddings
    assert shape.vocab_size == 49152
    assert (shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.head_dim) == (576, 9, 3, 64)
    assert shape.intermediate_size == 1536
    assert shape.kv_bytes_per_token(2) == KV_BF16["smollm2-135m"]


def test_smollm2_gguf_matches_hf_config(smollm2: Checkpoint) -> None:
    hf = shape_of("smollm2-135m")
    g = smollm2.shape
    for field in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size"):
        assert getattr(g, field) == getattr(hf, field), field
    assert (g.vocab_size, g.tie_embeddings, g.rope_theta) == (hf.vocab_size, hf.tie_embeddings, hf.rope_theta)


def test_smollm2_gguf_parts_and_dtypes(smollm2: Checkpoint) -> None:
    parts = smollm2.params_by_part()
    assert parts.pop("embed") == 49152 * 576
    assert parts.pop("head") == 576  # output_norm only: the head is tied
    assert parts == dict.fromkeys(range(30), smollm2.shape.layer_params())
    dtypes = smollm2.stored_dtypes()
    assert sum(dtypes.values()) == smollm2.param_count
    assert "Q4_1" in dtypes
    assert smollm2.stored_bytes < smollm2_gguf().stat().st_size
    # Torch order: the embedding is [vocab, hidden] although GGUF stores [hidden, vocab].
    embd = next(t for t in smollm2.tensors if t.name == "token_embd.weight")
    assert embd.shape == (49152, 576)


def test_smollm2_gguf_truncated_inside_header(tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with smollm2_gguf().open("rb") as f:
        cut.write_bytes(f.read(64 * 1024))  # the tokenizer tables alone are larger than this
    with pytest.raises(ModelFileError, match="truncated") as e:
        open_checkpoint(cut)
    assert str(cut) in str(e.value)


def test_tiny_gguf(tmp_path: Path) -> None:
    f = write_gguf(tmp_path / "tiny.gguf", tiny_llama_gguf_metadata(), tiny_llama_gguf_tensors())
    ckpt = open_checkpoint(f)
    assert ckpt.shape.vocab_size == 32  # from tokenizer.ggml.tokens
    assert ckpt.shape.tie_embeddings  # no output.weight
    assert ckpt.param_count == 64 * 32 + 2 * 64 * 64 + 64
    assert ckpt.params_by_part() == {"embed": 64 * 32, 0: 64 * 64, 1: 64 * 64, "head": 64}


def test_gguf_without_extension_is_recognised_by_magic(tmp_path: Path) -> None:
    f = write_gguf(tmp_path / "model.bin", tiny_llama_gguf_metadata(), tiny_llama_gguf_tensors())
    assert open_checkpoint(f).format == "gguf"


def test_gemma3_gguf_sliding_pattern(tmp_path: Path) -> None:
    md = tiny_llama_gguf_metadata("gemma3")
    md["gemma3.block_count"] = 12
    md["gemma3.attention.sliding_window"] = 512
    ckpt = open_checkpoint(write_gguf(tmp_path / "g.gguf", md))
    shape = ckpt.shape
    assert (shape.architecture, shape.sliding_window, shape.norms_per_layer) == ("gemma3", 512, 4)
    assert [shape.layer_kind(i) for i in range(12)] == (["sliding"] * 5 + ["full"]) * 2


# -- broken inputs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", bad_input_params())
def test_bad_input_raises_typed_error_naming_the_file(tmp_path: Path, case: str) -> None:
    bad = BAD_INPUTS[case](tmp_path)
    with pytest.raises(bad.error) as e:
        open_checkpoint(bad.path)
    message = str(e.value)
    assert str(bad.names) in message
    assert bad.says in message.lower()
    assert "\n" not in message


def test_unknown_model_type_lists_supported() -> None:
    cfg = tiny_config("llama-3-8b", model_type="mamba")
    with pytest.raises(UnsupportedModelError) as e:
        shape_from_hf_config(cfg, "/models/m/config.json")
    for model_type in SUPPORTED_MODEL_TYPES:
        assert model_type in str(e.value)
    assert "/models/m/config.json" in str(e.value)


def test_unknown_gguf_architecture_lists_supported(tmp_path: Path) -> None:
    f = write_gguf(tmp_path / "m.gguf", {"general.architecture": "mamba"})
    with pytest.raises(UnsupportedModelError) as e:
        open_checkpoint(f)
    for arch in SUPPORTED_GGUF_ARCHITECTURES:
        assert arch in str(e.value)


def test_dir_without_config_points_at_gguf_inside(tmp_path: Path) -> None:
    d = tmp_path / "downloads"
    d.mkdir()
    write_gguf(d / "model-Q4_K_M.gguf", tiny_llama_gguf_metadata(), tiny_llama_gguf_tensors())
    with pytest.raises(ModelFileError, match=r"model-Q4_K_M\.gguf"):
        open_checkpoint(d)


def test_kv_heads_must_divide_heads(tmp_path: Path) -> None:
    d = write_hf_checkpoint(tmp_path / "m", tiny_config("llama-3-8b", num_key_value_heads=3))
    with pytest.raises(ModelFileError, match="num_key_value_heads"):
        open_checkpoint(d)
