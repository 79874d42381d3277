"""Checkpoint: a model's shape plus its tensor table, from an HF directory or a GGUF file, no data read."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llmhost.errors import ModelFileError
from llmhost.model_files.gguf_config import shape_from_gguf
from llmhost.model_files.gguf_file import read_gguf
from llmhost.model_files.hf_config import shape_from_hf_config
from llmhost.model_files.safetensors_header import read_safetensors_header
from llmhost.model_files.shape import ModelShape

# Where a tensor belongs: a decoder layer index, or one of the ends.
Part = int | Literal["embed", "head", "other"]

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|blk|h)\.(\d+)\.")
_EMBED_NAMES = {"model.embed_tokens.weight", "token_embd.weight", "model.language_model.embed_tokens.weight"}
_HEAD_NAMES = {
    "lm_head.weight",
    "output.weight",
    "model.norm.weight",
    "output_norm.weight",
    "model.language_model.norm.weight",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (rows first)
    stored_dtype: str  # "BF16", "F32", "Q4_K", ...
    stored_bytes: int
    file: Path
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def part(self) -> Part:
        m = _LAYER_RE.search(self.name)
        if m:
            return int(m.group(1))
        if self.name in _EMBED_NAMES:
            return "embed"
        if self.name in _HEAD_NAMES:
            return "head"
        return "other"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    format: Literal["safetensors", "gguf"]
    shape: ModelShape
    tensors: tuple[TensorInfo, ...]

    @property
    def param_count(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def stored_bytes(self) -> int:
        return sum(t.stored_bytes for t in self.tensors)

    def stored_dtypes(self) -> dict[str, int]:
        """Stored dtype -> parameter count, most common first."""
        counts: Counter[str] = Counter()
        for t in self.tensors:
            counts[t.stored_dtype] += t.numel
        return dict(counts.most_common())

    def params_by_part(self) -> dict[Part, int]:
        out: dict[Part, int] = {}
        for t in self.tensors:
            out[t.part] = out.get(t.part, 0) + t.numel
        return out


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFileError(f"{path}: no such file or directory; set path to an HF model directory or a .gguf file")
    if path.is_dir():
        return _open_hf_dir(path)
    if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        return _open_gguf(path)
    raise ModelFileError(f"{path}: not a model directory or a .gguf file")


def _has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _open_hf_dir(path: Path) -> Checkpoint:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" (it holds {ggufs[0].name}: point path at that file)" if ggufs else ""
        raise ModelFileError(f"{path}: no config.json; an HF model directory needs one{hint}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelFileError(f"{cfg_path}: expected a JSON object")
    shape = shape_from_hf_config(cfg, str(cfg_path))
    files = _safetensors_files(path)
    tensors = []
    for f in files:
        for raw in read_safetensors_header(f):
            tensors.append(TensorInfo(raw.name, raw.shape, raw.dtype, raw.nbytes, raw.file, raw.offset))
    return Checkpoint(path=path, format="safetensors", shape=shape, tensors=tuple(tensors))


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ModelFileError(f"{index}: corrupt shard index ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelFileError(f"{index}: corrupt shard index (weight_map must map tensor names to file names)")
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelFileError(f"{index}: names shard(s) that are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"{path}: no *.safetensors files (llmhost reads safetensors, not .bin/.pt)")
    return files


def _open_gguf(path: Path) -> Checkpoint:
    g = read_gguf(path)
    shape = shape_from_gguf(g)
    tensors = tuple(
        TensorInfo(t.name, tuple(reversed(t.shape)), t.type_name, t.nbytes, path, t.offset) for t in g.tensors
    )
    return Checkpoint(path=path, format="gguf", shape=shape, tensors=tensors)
