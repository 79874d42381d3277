"""The history of measured memory: what a load really took, per category, so later plans use it.

The host records after every load of a model (or of one stage of a split model), with the same key the planner
will look up, built by `history_key`:

    key = history_key(spec, spec.fingerprint, device, stage.start, stage.end, plan.block_size)
    History().record(key, Measured(weights=r.weights, kv=r.kv, workspace=r.workspace, graphs=r.graphs))

`record` never raises: a history that cannot be written logs one warning and is skipped. Record GPU stages only,
measured after the largest step has run once (else the workspace figure undercounts what serving will need);
the planner ignores records for the CPU, where the engine cannot measure a workspace. The planner reads the
history through `plan_models(..., history=History())`; `lookup` returns None for anything it does not hold.

A record is keyed by everything that decides its bytes: the checkpoint (`model_fingerprint`: shape, tensor table
and file sizes, no tensor data read), the memory-relevant config fields (`config_digest`), the GPU kind
(`Device.name`), the torch version, and the layer range with the ends it holds. The newest measurement of a key
wins. Storage is one sqlite file: `$LLMHOST_HISTORY`, else `<cache dir>/history.sqlite`; LLMHOST_HISTORY=off
turns the history off. A corrupt or unwritable file acts as an empty history after one warning: planning never
fails because of it. Several processes may record at once (sqlite's locking, with a timeout).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llmhost.config import ModelConfig, default_cache_dir
from llmhost.memory.inventory import Device
from llmhost.model_files.checkpoint import Checkpoint

if TYPE_CHECKING:  # estimate.py imports model_fingerprint from here; the type alone is needed at run time
    from llmhost.memory.estimate import ModelSpec

log = logging.getLogger("llmhost.history")

HISTORY_ENV = "LLMHOST_HISTORY"
HISTORY_OFF = "off"
HISTORY_FILE = "history.sqlite"
LOCK_TIMEOUT_S = 5.0  # how long a writer waits for another process's write before giving up (one warning)

# One table per schema version: a later layout gets a new table, and an older llmhost keeps reading its own.
_TABLE = "measured_v1"
_KEY_COLUMNS = ("fingerprint", "config", "gpu_kind", "torch_version", "layer_start", "layer_end", "is_first", "is_last")
_VALUE_COLUMNS = ("weights", "kv", "workspace", "graphs", "recorded_at")
_CREATE = f"""CREATE TABLE IF NOT EXISTS {_TABLE} (
    fingerprint TEXT NOT NULL, config TEXT NOT NULL, gpu_kind TEXT NOT NULL, torch_version TEXT NOT NULL,
    layer_start INTEGER NOT NULL, layer_end INTEGER NOT NULL, is_first INTEGER NOT NULL, is_last INTEGER NOT NULL,
    weights INTEGER NOT NULL, kv INTEGER NOT NULL, workspace INTEGER NOT NULL, graphs INTEGER NOT NULL,
    recorded_at REAL NOT NULL,
    PRIMARY KEY ({", ".join(_KEY_COLUMNS)}))"""
# The newest measurement wins, by its own timestamp: a slow writer with an older measurement does not overwrite.
_UPSERT = f"""INSERT INTO {_TABLE} ({", ".join(_KEY_COLUMNS + _VALUE_COLUMNS)})
    VALUES ({", ".join("?" * (len(_KEY_COLUMNS) + len(_VALUE_COLUMNS)))})
    ON CONFLICT ({", ".join(_KEY_COLUMNS)}) DO UPDATE SET
    {", ".join(f"{c} = excluded.{c}" for c in _VALUE_COLUMNS)}
    WHERE excluded.recorded_at >= {_TABLE}.recorded_at"""
_SELECT = f"""SELECT {", ".join(_KEY_COLUMNS + _VALUE_COLUMNS)} FROM {_TABLE}
    WHERE fingerprint = ? AND gpu_kind = ? AND torch_version = ?"""


@dataclass(frozen=True)
class HistoryKey:
    """What decides a load's bytes. Build it with `history_key` so host and planner agree."""

    fingerprint: str  # model_fingerprint(checkpoint)
    config: str  # config_digest(model config, block size): the memory-relevant fields as canonical text
    gpu_kind: str  # Device.name, e.g. "NVIDIA H100 80GB HBM3"
    torch_version: str | None  # importlib.metadata's version of torch; None where torch is not installed
    start: int  # first decoder layer of the stage
    end: int  # one past its last
    first: bool  # holds the embedding
    last: bool  # holds the final norm and LM head


@dataclass(frozen=True)
class Measured:
    """Bytes one load took on its device, by category (as the engine's memory report counts them)."""

    weights: int
    kv: int
    workspace: int
    graphs: int
    recorded_at: float = field(default_factory=time.time)  # Unix seconds


def model_fingerprint(ckpt: Checkpoint) -> str:
    """A digest of the checkpoint's shape, tensor table (names, stored dtypes, shapes) and file sizes; cheap (no
    tensor data read) and stable across opens. File names count, the directory does not: a moved model keeps
    its history."""
    sizes: dict[str, int] = {}
    for t in ckpt.tensors:
        if t.file.name not in sizes:
            try:
                sizes[t.file.name] = t.file.stat().st_size
            except OSError:
                sizes[t.file.name] = -1  # vanished since it was read: the load will say so, not the digest
    doc = {
        "format": ckpt.format,
        "shape": dataclasses.asdict(ckpt.shape),
        "tensors": [[t.name, t.stored_dtype, list(t.shape)] for t in ckpt.tensors],
        "files": sorted(sizes.items()),
    }
    text = json.dumps(doc, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=256)
def config_digest(config: ModelConfig, block_size: int) -> str:
    """The config fields that change a load's bytes, as canonical text (readable in the file). kv_tokens is the
    configured setting, not the resolved count: "fill" pools resize with every plan, and the planner's trial
    placements must find what the host recorded for the final one."""
    kv = "default" if config.kv_tokens is None else str(config.kv_tokens)
    return (
        f"dtype={config.dtype} kv_dtype={config.kv_dtype_resolved} max_seq_len={config.max_seq_len} "
        f"max_batch={config.max_batch} kv_tokens={kv} prefill_chunk={config.prefill_chunk} "
        f"cuda_graphs={int(config.cuda_graphs)} prompt_rows={config.prompt_rows} block_size={block_size}"
    )


@functools.cache
def installed_torch_version() -> str | None:
    """Without importing torch (memory/ never does); None where it is not installed."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def history_key(
    spec: ModelSpec, ckpt_fingerprint: str, device: Device, start: int, end: int, block_size: int
) -> HistoryKey:
    """The key of layers [start, end) of `spec` on `device`, as both the host (recording) and planner (looking
    up) build it."""
    return HistoryKey(
        fingerprint=ckpt_fingerprint,
        config=config_digest(spec.config, block_size),
        gpu_kind=device.name,
        torch_version=installed_torch_version(),
        start=start,
        end=end,
        first=start == 0,
        last=end == spec.shape.num_layers,
    )


def history_path() -> Path | None:
    """$LLMHOST_HISTORY (read now, not at import), else <cache dir>/history.sqlite; None when it says "off"."""
    env = os.environ.get(HISTORY_ENV, "").strip()
    if env.lower() == HISTORY_OFF:
        return None
    return Path(env).expanduser() if env else default_cache_dir() / HISTORY_FILE


class History:
    """The measured-memory history in one sqlite file. Reads are cached per (fingerprint, GPU kind, torch
    version): one query each, however many lookups a plan makes; a new History reads afresh."""

    def __init__(self, path: Path | None = None) -> None:
        self.path: Path | None = path if path is not None else history_path()  # None: turned off
        self._broken = False  # after the one warning, every call is a no-op
        self._read: dict[tuple[str, str, str], dict[HistoryKey, Measured]] = {}

    @property
    def enabled(self) -> bool:
        return self.path is not None and not self._broken

    def record(self, key: HistoryKey, measured: Measured) -> bool:
        """Store a measurement (an older one of the same key is replaced; a newer one kept). False when it could
        not be stored; never raises."""
        if self.path is None or self._broken:
            return False
        row = (*_key_row(key), measured.weights, measured.kv, measured.workspace, measured.graphs)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with closing(sqlite3.connect(self.path, timeout=LOCK_TIMEOUT_S)) as conn, conn:
                conn.execute(_CREATE)
                conn.execute(_UPSERT, (*row, measured.recorded_at))
        except (sqlite3.Error, OSError) as e:
            self._fail(e)
            return False
        cached = self._read.get(_group(key))
        if cached is not None:
            old = cached.get(key)
            if old is None or measured.recorded_at >= old.recorded_at:
                cached[key] = measured
        return True

    def lookup(self, key: HistoryKey) -> Measured | None:
        if self.path is None or self._broken:
            return None
        group = _group(key)
        if group not in self._read:
            try:
                self._read[group] = self._load(group)
            except (sqlite3.Error, OSError) as e:
                self._fail(e)
                return None
        return self._read[group].get(key)

    def _load(self, group: tuple[str, str, str]) -> dict[HistoryKey, Measured]:
        assert self.path is not None
        if not self.path.exists():
            return {}  # nothing recorded yet; reading must not create the file
        # Read-only: planning never writes, and a read-only open cannot damage a file another process writes.
        uri = self.path.absolute().as_uri() + "?mode=ro"
        with closing(sqlite3.connect(uri, uri=True, timeout=LOCK_TIMEOUT_S)) as conn:
            exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (_TABLE,))
            if exists.fetchone() is None:
                return {}
            rows = conn.execute(_SELECT, group).fetchall()
        out: dict[HistoryKey, Measured] = {}
        for fp, cfg, gpu, version, start, end, first, last, weights, kv, workspace, graphs, at in rows:
            key = HistoryKey(fp, cfg, gpu, version or None, int(start), int(end), bool(first), bool(last))
            out[key] = Measured(int(weights), int(kv), int(workspace), int(graphs), float(at))
        return out

    def _fail(self, e: BaseException) -> None:
        self._broken = True
        log.warning(
            "measured-memory history %s is unusable (%s); planning from estimates only. Delete the file to start "
            "a new history, or set %s=off",
            self.path,
            e,
            HISTORY_ENV,
        )


def _group(key: HistoryKey) -> tuple[str, str, str]:
    return key.fingerprint, key.gpu_kind, key.torch_version or ""


def _key_row(key: HistoryKey) -> tuple[str, str, str, str, int, int, int, int]:
    # sqlite compares NULLs as distinct in a primary key: "no torch" is stored as "".
    return (
        key.fingerprint,
        key.config,
        key.gpu_kind,
        key.torch_version or "",
        key.start,
        key.end,
        int(key.first),
        int(key.last),
    )
