"""Read a GGUF file's metadata and tensor table without reading tensor data (own parser, no dependency)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from llmhost.errors import ModelFileError

# GGML tensor types: name, elements per block, bytes per block.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    30: ("BF16", 1, 2),
}

# Metadata value types: struct format for scalars; 8 = string, 9 = array.
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GgufTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: fastest-varying dimension first (the reverse of torch's)
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class GgufFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: tuple[GgufTensor, ...]


class _Reader:
    def __init__(self, f: BinaryIO, path: Path) -> None:
        self.f = f
        self.path = path

    def take(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise ModelFileError(f"{self.path}: truncated GGUF file (header ends early); re-download the file")
        return b

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > 1 << 30:
            raise ModelFileError(f"{self.path}: corrupt GGUF header (a string of {n} bytes)")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            item_type = self.scalar("<I")
            count = self.scalar("<Q")
            if count > 1 << 28:
                raise ModelFileError(f"{self.path}: corrupt GGUF header (an array of {count} items)")
            if item_type in _SCALARS:
                # Read arrays of numbers in one unpack: token score tables hold 100k+ entries.
                fmt = _SCALARS[item_type]
                size = struct.calcsize(fmt)
                return list(struct.unpack(f"<{count}{fmt[1]}", self.take(size * count)))
            return [self.value(item_type) for _ in range(count)]
        raise ModelFileError(f"{self.path}: corrupt GGUF header (unknown metadata value type {vtype})")


def read_gguf(path: Path) -> GgufFile:
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            return _parse(_Reader(f, path), size)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read: {e.strerror}") from None


def _parse(r: _Reader, size: int) -> GgufFile:
    if r.f.read(4) != _GGUF_MAGIC:
        raise ModelFileError(f"{r.path}: not a GGUF file (bad magic)")
    version = r.scalar("<I")
    if version not in (2, 3):
        raise ModelFileError(f"{r.path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors = r.scalar("<Q")
    n_kv = r.scalar("<Q")
    if n_tensors > 1 << 20 or n_kv > 1 << 20:
        raise ModelFileError(f"{r.path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string()
        metadata[key] = r.value(r.scalar("<I"))
    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.scalar("<I")
        if n_dims > 8:
            raise ModelFileError(f"{r.path}: corrupt GGUF tensor table ('{name}' has {n_dims} dimensions)")
        shape = tuple(r.scalar("<Q") for _ in range(n_dims))
        ggml_type = r.scalar("<I")
        offset = r.scalar("<Q")
        infos.append((name, shape, ggml_type, offset))
    alignment = metadata.get("general.alignment", 32)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0:
        raise ModelFileError(f"{r.path}: corrupt GGUF header (general.alignment = {alignment!r})")
    data_start = -(-r.f.tell() // alignment) * alignment
    tensors = []
    for name, shape, ggml_type, offset in infos:
        if ggml_type not in GGML_TYPES:
            raise ModelFileError(f"{r.path}: tensor '{name}' has GGML type {ggml_type}, which llmhost cannot read")
        _, block, block_bytes = GGML_TYPES[ggml_type]
        numel = 1
        for d in shape:
            numel *= d
        nbytes = -(-numel // block) * block_bytes
        if data_start + offset + nbytes > size:
            raise ModelFileError(
                f"{r.path}: tensor '{name}' lies past the end of the file ({size} bytes); the file is truncated"
            )
        tensors.append(GgufTensor(name, shape, ggml_type, data_start + offset, nbytes))
    return GgufFile(r.path, version, metadata, tuple(tensors))
