"""Stream a checkpoint's weights onto a device one tensor at a time, named and parameterized as transformers names
them; and check a tensor table against the parameters a ModelShape implies.

`iter_weights` never holds more than one tensor's bytes in host RAM (plus one dequantization chunk for GGUF), so
loading a model never needs a second copy of it in host memory. Files are read with `readinto`, not mmap: a file
truncated while mapped kills the process with SIGBUS, while a short read becomes a ModelFileError.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from llmhost.errors import ModelFileError, UnsupportedModelError
from llmhost.model_files import Checkpoint, ModelShape, TensorInfo

# Stored dtype name (safetensors, or GGUF for the unquantized types) -> the torch dtype of its bytes.
# Both formats are little-endian; so is every machine torch runs on here.
_PLAIN_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# FP8 checkpoints carry per-block scales (weight_scale_inv) that a plain cast would ignore: refuse, don't guess.
_UNSUPPORTED_DTYPES = {"F8_E4M3", "F8_E5M2"}

# Rows of a quantized GGUF tensor are dequantized in chunks of about this many elements (16 MiB as float32), so the
# numpy intermediates of gguf's dequantizer stay small next to the tensor itself. A test lowers it.
DEQUANT_CHUNK_ELEMENTS = 4 * 1024 * 1024
# Elements of a weight checked for NaN / infinity at a time (_finite): 16 MiB of bools on the weight's device.
FINITE_CHUNK_ELEMENTS = 16 * 1024 * 1024

# llama.cpp tensor names -> HF names. Per-block names are keyed without the "blk.N." prefix and ".weight" suffix.
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 has four norms per layer; llama.cpp's "ffn_norm" is the one *before* the MLP there.
_GEMMA3_BLOCK_NAMES = {
    **_GGUF_BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# rope_freqs.weight holds llama3-style RoPE scaling factors that llama.cpp precomputes; the engine derives them
# from the rope scaling parameters instead (HF checkpoints have no such tensor).
_GGUF_SKIPPED = {"rope_freqs.weight"}
_GGUF_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# convert_hf_to_gguf.py permutes q_proj/k_proj rows (weights and biases) of these families so that llama.cpp's
# RoPE can rotate adjacent pairs; HF rotates the two halves of each head. Qwen and Gemma GGUFs are not permuted.
_PERMUTED_FAMILIES = ("llama", "mistral")


# Where each tensor goes, by HF name: a split model places each layer's tensors on its stage's device.
DeviceOf = Callable[[str], torch.device]


def iter_weights(
    ckpt: Checkpoint, dtype: torch.dtype, device: torch.device | DeviceOf
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF parameter name, tensor on its device) for every weight of `ckpt`, one at a time, in file order.
    `device` is one device for every tensor, or a function of the HF name (a split model's layers go straight to
    their stage's device, never through another GPU).

    Floating-point tensors arrive in `dtype`; integer tensors keep their stored dtype. Every yielded tensor owns
    its memory (a consumer may keep it). A GGUF's tensors are dequantized, renamed to HF names, un-permuted (Q/K of
    llama/mistral) and un-shifted (Gemma norms), so they equal what transformers loads from the same file.
    Raises ModelFileError naming the tensor when its data is truncated or its byte count does not match its shape.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"iter_weights: dtype must be a floating-point dtype, not {dtype}")
    device_of = _device_fn(device)
    # Sorted by position so each file is read front to back (sequential disk reads).
    tensors = sorted(ckpt.tensors, key=lambda t: (str(t.file), t.offset))
    with ExitStack() as stack:
        readers: dict[Path, _Reader] = {}

        def reader(info: TensorInfo) -> _Reader:
            if info.file not in readers:
                readers[info.file] = stack.enter_context(_Reader(info.file))
            return readers[info.file]

        for info in tensors:
            if ckpt.format == "safetensors":
                t = _place(_read_plain(reader(info), info), dtype, device_of(info.name))
                yield info.name, _finite(t, info)
                continue
            name = gguf_to_hf_name(info.name, ckpt.shape.architecture)
            if name is None:
                continue
            yield name, _finite(_gguf_tensor(reader(info), info, name, ckpt.shape, dtype, device_of(name)), info)


def _finite(t: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    """`t`, once every value of it is finite. A NaN or infinity in a weight (bytes overwritten on disk, a GGUF
    block's scale gone bad, a float32 value past float16's range) loaded silently before: every request then
    answered 200 with nothing but end-of-text tokens. Checked in chunks on the tensor's device (one bool per
    element of a chunk at a time, not of the whole tensor), with one read back per tensor."""
    if not t.is_floating_point() or t.numel() == 0 or t.is_meta:  # a meta tensor (tests' stand-in GPU) has no values
        return t
    flat = t.reshape(-1)
    ok = torch.ones((), dtype=torch.bool, device=t.device)
    for i in range(0, flat.numel(), FINITE_CHUNK_ELEMENTS):
        ok &= torch.isfinite(flat[i : i + FINITE_CHUNK_ELEMENTS]).all()
    if bool(ok):
        return t
    bad = int((~torch.isfinite(flat)).sum())
    overflow = ' or its values overflow float16 (use dtype = "bfloat16")' if t.dtype == torch.float16 else ""
    raise ModelFileError(
        f"{info.file}: tensor '{info.name}' holds {bad} NaN or infinite values of {flat.numel()}: the file is "
        f"corrupt{overflow}; download or convert the checkpoint again"
    )


def _device_fn(device: torch.device | DeviceOf) -> DeviceOf:
    if not isinstance(device, torch.device):
        return device
    one = device

    def same(_name: str) -> torch.device:
        return one

    return same


def weight_shapes(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    """The names and shapes `iter_weights` will yield, from the tensor table alone (no data read)."""
    if ckpt.format == "safetensors":
        return {t.name: t.shape for t in ckpt.tensors}
    out: dict[str, tuple[int, ...]] = {}
    for t in ckpt.tensors:
        name = gguf_to_hf_name(t.name, ckpt.shape.architecture)
        if name is not None:
            out[name] = t.shape
    return out


def gguf_to_hf_name(name: str, architecture: str) -> str | None:
    """The HF parameter name of a llama.cpp tensor name; None for tensors HF models do not have (rope_freqs)."""
    if name in _GGUF_SKIPPED:
        return None
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    m = _GGUF_BLOCK_RE.fullmatch(name)
    table = _GEMMA3_BLOCK_NAMES if architecture == "gemma3" else _GGUF_BLOCK_NAMES
    if m is None or m.group(2) not in table:
        raise UnsupportedModelError(
            f"GGUF tensor '{name}' has no counterpart in an HF {architecture} model that llmhost knows; "
            "the file may come from a newer llama.cpp or a different architecture"
        )
    layer, part, kind = m.groups()
    return f"model.layers.{layer}.{table[part]}.{kind}"


# -- checking a tensor table against the model's shape ------------------------------------------------------------


def expected_hf_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Every parameter (name -> shape) of the transformers model of `shape`, as its state_dict names it
    (without lm_head.weight when the head is tied to the embedding)."""
    hidden = shape.hidden_size
    q = shape.num_heads * shape.head_dim
    kv = shape.num_kv_heads * shape.head_dim
    inter = shape.intermediate_size
    gemma = shape.architecture == "gemma3"
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab_size, hidden)}
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (hidden,)
        out[p + "self_attn.q_proj.weight"] = (q, hidden)
        out[p + "self_attn.k_proj.weight"] = (kv, hidden)
        out[p + "self_attn.v_proj.weight"] = (kv, hidden)
        out[p + "self_attn.o_proj.weight"] = (hidden, q)
        if shape.qkv_bias:
            out[p + "self_attn.q_proj.bias"] = (q,)
            out[p + "self_attn.k_proj.bias"] = (kv,)
            out[p + "self_attn.v_proj.bias"] = (kv,)
        if shape.o_bias:
            out[p + "self_attn.o_proj.bias"] = (hidden,)
        if shape.qk_norm:
            out[p + "self_attn.q_norm.weight"] = (shape.head_dim,)
            out[p + "self_attn.k_norm.weight"] = (shape.head_dim,)
        out[p + "post_attention_layernorm.weight"] = (hidden,)
        if gemma:
            out[p + "pre_feedforward_layernorm.weight"] = (hidden,)
            out[p + "post_feedforward_layernorm.weight"] = (hidden,)
        out[p + "mlp.gate_proj.weight"] = (inter, hidden)
        out[p + "mlp.up_proj.weight"] = (inter, hidden)
        out[p + "mlp.down_proj.weight"] = (hidden, inter)
        if shape.mlp_bias:
            out[p + "mlp.gate_proj.bias"] = (inter,)
            out[p + "mlp.up_proj.bias"] = (inter,)
            out[p + "mlp.down_proj.bias"] = (hidden,)
    out["model.norm.weight"] = (hidden,)
    if not shape.tie_embeddings:
        out["lm_head.weight"] = (shape.vocab_size, hidden)
    return out


def check_weights(names_shapes: dict[str, tuple[int, ...]], shape: ModelShape, where: str) -> None:
    """Raise ModelFileError unless `names_shapes` (e.g. `weight_shapes(ckpt)`) holds exactly the parameters of
    `shape`'s HF model at their shapes. Tolerated extras: a stored lm_head.weight of a tied model (HF ignores it)
    and rotary `inv_freq` buffers some old checkpoints saved. Any other extra tensor is an error, since the engine
    would silently drop it (e.g. biases the config does not declare)."""
    expected = expected_hf_shapes(shape)
    missing = [n for n in expected if n not in names_shapes]
    if missing:
        more = f" ({len(missing)} tensors missing in all)" if len(missing) > 1 else ""
        raise ModelFileError(
            f"{where}: tensor '{missing[0]}' is missing (a {shape.architecture} model of this config needs it, "
            f"shape {list(expected[missing[0]])}){more}; the checkpoint is incomplete or does not match its config"
        )
    for name, want in expected.items():
        got = tuple(names_shapes[name])
        if got != want:
            raise ModelFileError(
                f"{where}: tensor '{name}' has shape {list(got)} but the config implies {list(want)}; "
                "the checkpoint does not match its config"
            )
    for name, got in names_shapes.items():
        if name in expected or name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and shape.tie_embeddings:
            continue
        raise ModelFileError(
            f"{where}: unexpected tensor '{name}' (shape {list(got)}), which a {shape.architecture} model of this "
            "config does not have; the checkpoint does not match its config"
        )


# -- reading --------------------------------------------------------------------------------------------------


class _Reader:
    """One open checkpoint file; `read` returns a fresh uint8 CPU tensor holding a byte range."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            # Unbuffered: large reads go straight into the tensor's memory, with no copy through a buffer.
            self.f = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by __exit__)
            self.size = os.fstat(self.f.fileno()).st_size
        except OSError as e:
            raise ModelFileError(f"{path}: cannot read: {e.strerror}") from None

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()

    def read(self, offset: int, nbytes: int, tensor: str) -> torch.Tensor:
        if offset + nbytes > self.size:
            raise self._truncated(offset, nbytes, tensor)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = buf.numpy().data
        try:
            self.f.seek(offset)
            done = 0
            # One read() call returns at most ~2 GiB on Linux: loop until the range is filled.
            while done < nbytes:
                got = self.f.readinto(view[done:])
                if not got:
                    raise self._truncated(offset, nbytes, tensor)
                done += got
        except OSError as e:
            raise ModelFileError(f"{self.path}: cannot read tensor '{tensor}': {e.strerror}") from None
        return buf

    def _truncated(self, offset: int, nbytes: int, tensor: str) -> ModelFileError:
        return ModelFileError(
            f"{self.path}: tensor '{tensor}' needs bytes [{offset}, {offset + nbytes}) but the file ends at "
            f"{self.size}; the file is truncated (re-download it)"
        )


def _read_plain(reader: _Reader, info: TensorInfo) -> torch.Tensor:
    """An unquantized tensor in its stored dtype and shape, on the CPU."""
    if info.stored_dtype in _UNSUPPORTED_DTYPES:
        raise UnsupportedModelError(
            f"{info.file}: tensor '{info.name}' is stored as {info.stored_dtype}; FP8 checkpoints need their scale "
            "tensors applied, which llmhost does not do: use a BF16/F16 checkpoint"
        )
    stored = _PLAIN_DTYPES.get(info.stored_dtype)
    if stored is None:
        raise UnsupportedModelError(f"{info.file}: tensor '{info.name}' has stored dtype {info.stored_dtype}")
    need = info.numel * stored.itemsize
    if info.stored_bytes != need:
        raise ModelFileError(
            f"{info.file}: tensor '{info.name}' holds {info.stored_bytes} bytes but its shape {list(info.shape)} "
            f"{info.stored_dtype} needs {need}; the file is corrupt"
        )
    return reader.read(info.offset, info.stored_bytes, info.name).view(stored).reshape(info.shape)


def _place(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Move the stored bytes first and convert on the device: the host never holds the converted copy as well, and
    # a GPU converts far faster than the CPU. Integer tensors (token ids, masks) are not weights to convert.
    t = t.to(device)
    return t.to(dtype) if t.is_floating_point() else t


# -- GGUF -----------------------------------------------------------------------------------------------------


def _gguf_tensor(
    reader: _Reader, info: TensorInfo, name: str, shape: ModelShape, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    # llama.cpp stores Gemma's RMSNorm weights with the +1 of HF's `x * (1 + w)` folded in (convert_hf_to_gguf:
    # `if name.endswith("norm.weight"): data_torch += norm_shift`, every norm incl. q/k and the final one).
    # Subtract it in float32: in bf16 the shift would round away most of w's bits.
    gemma_norm = shape.architecture == "gemma3" and name.endswith("norm.weight")
    work = torch.float32 if gemma_norm else dtype
    if info.stored_dtype in _PLAIN_DTYPES:
        t = _place(_read_plain(reader, info), work, device)
    else:
        t = _dequantize(reader, info, work, device)
    if gemma_norm:
        t = (t - 1.0).to(dtype)
    if shape.architecture in _PERMUTED_FAMILIES:
        if name.startswith("model.layers.") and name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            t = _unpermute(t, shape.num_heads, info)
        elif name.startswith("model.layers.") and name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            t = _unpermute(t, shape.num_kv_heads, info)
    return t


def _dequantize(reader: _Reader, info: TensorInfo, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A block-quantized GGUF tensor as `dtype` on `device`, dequantized on the CPU a chunk of rows at a time."""
    gguf = _import_gguf()
    try:
        qtype = gguf.GGMLQuantizationType[info.stored_dtype]
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    except KeyError:
        raise UnsupportedModelError(
            f"{info.file}: tensor '{info.name}' is quantized as {info.stored_dtype}, which gguf cannot dequantize"
        ) from None
    row = info.shape[-1] if info.shape else 1
    rows = info.numel // row if row else 0
    if row % block:
        raise ModelFileError(
            f"{info.file}: tensor '{info.name}' has rows of {row} elements, not a multiple of the {block}-element "
            f"blocks of {info.stored_dtype}; the file is corrupt"
        )
    row_bytes = row // block * block_bytes
    if info.stored_bytes != rows * row_bytes:
        raise ModelFileError(
            f"{info.file}: tensor '{info.name}' holds {info.stored_bytes} bytes but its shape {list(info.shape)} "
            f"{info.stored_dtype} needs {rows * row_bytes}; the file is corrupt"
        )
    out = torch.empty(info.shape, dtype=dtype, device=device)
    flat = out.view(rows, row)  # [rows, row]
    step = max(1, DEQUANT_CHUNK_ELEMENTS // max(row, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        raw = reader.read(info.offset + r0 * row_bytes, (r1 - r0) * row_bytes, info.name)
        values = gguf.quants.dequantize(raw.numpy().reshape(r1 - r0, row_bytes), qtype)  # [r1 - r0, row] float32
        flat[r0:r1].copy_(torch.from_numpy(values))
    return out


def _unpermute(w: torch.Tensor, n_head: int, info: TensorInfo) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf's `permute`: there, rows of each head go from [2, half] (HF: first halves,
    then second halves) to [half, 2] (interleaved pairs); here back. Weights [rows, hidden] and biases [rows]."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ModelFileError(
            f"{info.file}: tensor '{info.name}' has {rows} rows, not a multiple of 2 x {n_head} heads; "
            "the GGUF does not match its own head count"
        )
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _import_gguf() -> Any:
    # Imported on first use: safetensors checkpoints load without the gguf package.
    try:
        import gguf
    except ImportError:
        raise UnsupportedModelError(
            "reading a quantized GGUF needs the gguf package: pip install 'gguf>=0.10' (or llmhost[engine])"
        ) from None
    return gguf
