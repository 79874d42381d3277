"""Read safetensors headers (the JSON table of names, dtypes, shapes, offsets) without reading tensor data."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from llmhost.errors import ModelFileError

# Element sizes of the dtypes safetensors stores.
SAFETENSORS_DTYPE_BYTES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit; larger means a corrupt length field


@dataclass(frozen=True)
class RawTensor:
    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def read_safetensors_header(path: Path) -> list[RawTensor]:
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFileError(f"{path}: truncated safetensors file ({size} bytes; no header length)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise ModelFileError(
                    f"{path}: corrupt or truncated safetensors header (declares {header_len} header bytes, "
                    f"file has {size}); re-download the file"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read: {e.strerror}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: corrupt safetensors header (not JSON: {e}); re-download the file") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    tensors: list[RawTensor] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(entry["dtype"])
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{path}: corrupt safetensors header entry for tensor '{name}'") from None
        if dtype not in SAFETENSORS_DTYPE_BYTES:
            raise ModelFileError(f"{path}: tensor '{name}' has unknown dtype {dtype!r}")
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * SAFETENSORS_DTYPE_BYTES[dtype]
        if end - begin != nbytes or data_start + end > size:
            raise ModelFileError(
                f"{path}: tensor '{name}' data [{begin}, {end}) does not match its shape {list(shape)} {dtype} "
                f"or lies past the end of the file ({size} bytes); the file is truncated or corrupt"
            )
        tensors.append(RawTensor(name, dtype, shape, path, data_start + begin, nbytes))
    return tensors
