"""`llmhost inspect`: the JSON document, the table, one-line errors (exit 2, no traceback) for bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from checkpoint_files import (
    BAD_INPUTS,
    bad_input_params,
    smollm2_gguf,
    tiny_config,
    tiny_llama_gguf_metadata,
    tiny_llama_gguf_tensors,
    write_gguf,
    write_hf_checkpoint,
)

from llmhost.cli import main
from llmhost.model_files import open_checkpoint


def inspect_json(path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code = main(["inspect", str(path), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err == ""
    doc: dict[str, Any] = json.loads(out)
    return doc


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    # rich wraps long cells at 80 columns when stdout is not a terminal; keep table rows on one line.
    monkeypatch.setenv("COLUMNS", "200")


def test_inspect_json_tiny_llama(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = write_hf_checkpoint(tmp_path / "llama", tiny_config("llama-3-8b"), dtype="BF16")
    shape = open_checkpoint(d).shape
    doc = inspect_json(d, capsys)
    assert doc["schema"] == "llmhost.inspect/1"
    assert doc["path"] == str(d)
    assert doc["format"] == "safetensors"
    assert doc["architecture"] == "llama"
    assert doc["hf_architecture"] == "LlamaForCausalLM"
    assert doc["parameters"] == shape.param_count()
    assert doc["stored_dtypes"] == {"BF16": shape.param_count()}
    assert doc["stored_bytes"] == 2 * shape.param_count()
    assert (doc["layers"], doc["hidden_size"], doc["attention_heads"]) == (3, 64, 4)
    assert (doc["kv_heads"], doc["head_dim"], doc["intermediate_size"], doc["vocab_size"]) == (2, 16, 96, 256)
    # 3 layers x 2 (K, V) x 2 kv heads x 16 head_dim x 2 bytes
    assert doc["kv_bytes_per_token"] == {"bfloat16": 384, "float16": 384, "float32": 768}
    assert doc["layer_parameters"] == shape.layer_params()
    assert doc["bytes_per_layer"] == {
        "bfloat16": 2 * shape.layer_params(),
        "float16": 2 * shape.layer_params(),
        "float32": 4 * shape.layer_params(),
    }
    assert doc["embedding_parameters"] == 256 * 64
    assert doc["head_parameters"] == 64 + 256 * 64  # final norm + untied lm_head
    assert doc["tied_embeddings"] is False
    assert doc["sliding_window"] is None and doc["sliding_layers"] == 0
    assert doc["rope_theta"] == 500000.0 and doc["rope_scaling"] is None


def test_inspect_json_sharded_qwen2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = write_hf_checkpoint(tmp_path / "qwen", tiny_config("qwen2.5-7b"), shards=3)
    doc = inspect_json(d, capsys)
    assert doc["architecture"] == "qwen2"
    assert doc["parameters"] == open_checkpoint(d).shape.param_count()


def test_inspect_json_gemma3_sliding_window(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = write_hf_checkpoint(tmp_path / "gemma", tiny_config("gemma-3-270m"))
    doc = inspect_json(d, capsys)
    assert doc["architecture"] == "gemma3"
    assert doc["sliding_window"] == 16
    assert doc["sliding_layers"] == 5
    assert doc["tied_embeddings"] is True
    assert doc["head_dim"] == 32
    assert doc["parameters"] == open_checkpoint(d).shape.param_count()


def test_inspect_json_llama31_rope_scaling(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = write_hf_checkpoint(tmp_path / "llama31", tiny_config("llama-3.1-8b"))
    doc = inspect_json(d, capsys)
    assert doc["rope_scaling"] == {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    }
    assert doc["max_position_embeddings"] == 131072


def test_inspect_json_smollm2_gguf(capsys: pytest.CaptureFixture[str]) -> None:
    path = smollm2_gguf()
    doc = inspect_json(path, capsys)
    assert doc["format"] == "gguf"
    assert doc["architecture"] == "llama"
    assert doc["parameters"] == 134_515_008
    assert doc["layers"] == 30
    assert (doc["kv_heads"], doc["head_dim"], doc["vocab_size"]) == (3, 64, 49152)
    assert doc["tied_embeddings"] is True
    assert doc["kv_bytes_per_token"]["bfloat16"] == 30 * 2 * 3 * 64 * 2
    assert doc["bytes_per_layer"]["bfloat16"] == 2 * doc["layer_parameters"]
    assert doc["embedding_parameters"] == 49152 * 576
    assert sum(doc["stored_dtypes"].values()) == doc["parameters"]


def test_inspect_table_tiny_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = write_hf_checkpoint(tmp_path / "qwen3", tiny_config("qwen3-8b"))
    assert main(["inspect", str(d)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "qwen3" in out and "(safetensors)" in out
    assert f"{open_checkpoint(d).param_count:,}" in out
    assert "kv bytes per token" in out


def test_inspect_table_smollm2_gguf(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(smollm2_gguf())]) == 0
    out, _ = capsys.readouterr()
    assert "134,515,008" in out
    assert "Q4_1" in out


def test_inspect_table_shows_brackets_literally(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # File names and GGUF general.name are user data, not rich markup: "[q4]" must print, "[/b]" must not
    # crash.
    md = tiny_llama_gguf_metadata()
    md["general.name"] = "Tiny [/b] v2"
    f = write_gguf(tmp_path / "tiny [q4].gguf", md, tiny_llama_gguf_tensors())
    assert main(["inspect", str(f)]) == 0
    out, _ = capsys.readouterr()
    assert "tiny [q4].gguf" in out
    assert "Tiny [/b] v2" in out


@pytest.mark.parametrize("case", bad_input_params())
@pytest.mark.parametrize("as_json", [False, True])
def test_inspect_bad_input_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, as_json: bool
) -> None:
    bad = BAD_INPUTS[case](tmp_path)
    code = main(["inspect", str(bad.path), *(["--json"] if as_json else [])])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("llmhost: error: ")
    assert str(bad.names) in lines[0]
    assert "Traceback" not in err


def test_inspect_without_path_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["inspect"])
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err
