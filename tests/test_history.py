"""The measured-memory history: storage, keys, fingerprints, robustness, and its use by the planner and the CLI."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from checkpoint_files import tiny_config, write_hf_checkpoint

from llmhost.cli import main
from llmhost.config import HostConfig, ModelConfig, load_config
from llmhost.memory import history as history_module
from llmhost.memory.estimate import ModelSpec, stage_need, steered_graphs
from llmhost.memory.history import (
    History,
    HistoryKey,
    Measured,
    config_digest,
    history_key,
    history_path,
    installed_torch_version,
    model_fingerprint,
)
from llmhost.memory.inventory import Device, Inventory, parse_gpu_spec
from llmhost.memory.plan import Plan
from llmhost.memory.planner import plan_models
from llmhost.model_files import open_checkpoint
from llmhost.model_files.shape import ModelShape
from llmhost.units import GiB, MiB, fmt_bytes

TINY = ModelShape("llama", 4, 256, 4, 2, 64, 512, 1000, True, 8192)
H100 = Device(0, "NVIDIA H100 80GB HBM3", 80 * GiB)
T0 = 1_790_000_000.0  # a fixed "recorded at" (2026-09-21), so dates in the output are known


def spec(name: str = "m", fingerprint: str | None = "fp-m", shape: ModelShape = TINY, **cfg: Any) -> ModelSpec:
    s = ModelSpec.from_shape(ModelConfig(name=name, path=Path(f"/models/{name}"), **cfg), shape)
    return replace(s, fingerprint=fingerprint)


def key(s: ModelSpec | None = None, device: Device = H100, start: int = 0, end: int | None = None) -> HistoryKey:
    s = s or spec()
    assert s.fingerprint is not None
    return history_key(s, s.fingerprint, device, start, s.shape.num_layers if end is None else end, 16)


def measured(workspace: int = 100 * MiB, graphs: int = 20 * MiB, at: float = T0) -> Measured:
    return Measured(weights=1 * GiB, kv=2 * GiB, workspace=workspace, graphs=graphs, recorded_at=at)


@pytest.fixture
def hist(tmp_path: Path) -> History:
    return History(tmp_path / "h" / "history.sqlite")


# -- storage -------------------------------------------------------------------------------------------------


def test_round_trip_in_the_same_and_a_new_history(hist: History) -> None:
    k = key()
    assert hist.lookup(k) is None
    assert hist.record(k, measured())
    assert hist.lookup(k) == measured()
    assert History(hist.path).lookup(k) == measured()


def test_newest_measurement_wins_by_its_time(hist: History) -> None:
    k = key()
    hist.record(k, measured(workspace=1, at=T0))
    hist.record(k, measured(workspace=2, at=T0 + 10))
    hist.record(k, measured(workspace=3, at=T0 + 5))  # older than what is stored: kept out
    assert hist.lookup(k) == measured(workspace=2, at=T0 + 10)
    assert History(hist.path).lookup(k) == measured(workspace=2, at=T0 + 10)
    History(hist.path).record(k, measured(workspace=4, at=T0 + 20))  # another writer
    assert History(hist.path).lookup(k) == measured(workspace=4, at=T0 + 20)


def test_lookups_read_once_per_model_gpu_kind_and_torch(hist: History, monkeypatch: pytest.MonkeyPatch) -> None:
    hist.record(key(), measured())
    reads = count_connects(monkeypatch)
    h = History(hist.path)
    for start in range(4):
        for end in range(start + 1, 5):
            h.lookup(key(start=start, end=end))
    assert h.lookup(key()) == measured()
    assert reads() == 1
    h.lookup(key(device=replace(H100, name="NVIDIA H200")))
    assert reads() == 2
    h.record(key(start=1), measured(workspace=5))  # a write updates what was read, without reading again
    assert h.lookup(key(start=1)) == measured(workspace=5)
    assert reads() == 3


def count_connects(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Count the history's sqlite connections from now on."""
    calls = 0
    connect = sqlite3.connect

    def counting(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        nonlocal calls
        calls += 1
        return connect(*args, **kwargs)

    monkeypatch.setattr(history_module.sqlite3, "connect", counting)
    return lambda: calls


def test_measured_defaults_to_now() -> None:
    # The same clock as Measured's (time.time): datetime.now() keeps microseconds only, so a timestamp taken just
    # after could read below one taken just before at full precision (seen once in a clean-clone run).
    before = time.time()
    m = Measured(1, 2, 3, 4)
    assert before <= m.recorded_at <= time.time()


_BASE = spec()
_OTHER_KEYS: dict[str, HistoryKey] = {
    "gpu kind": key(device=replace(H100, name="NVIDIA H200")),
    "torch version": replace(key(), torch_version="0.0.1"),
    "no torch": replace(key(), torch_version=None),
    "fingerprint": key(replace(_BASE, fingerprint="fp-other")),
    "dtype": key(replace(_BASE, config=replace(_BASE.config, dtype="float16"))),
    "kv_dtype": key(replace(_BASE, config=replace(_BASE.config, kv_dtype="float32"))),
    "max_seq_len": key(replace(_BASE, config=replace(_BASE.config, max_seq_len=2048))),
    "max_batch": key(replace(_BASE, config=replace(_BASE.config, max_batch=4))),
    "kv_tokens": key(replace(_BASE, config=replace(_BASE.config, kv_tokens="fill"))),
    "prefill_chunk": key(replace(_BASE, config=replace(_BASE.config, prefill_chunk=256))),
    "cuda_graphs": key(replace(_BASE, config=replace(_BASE.config, cuda_graphs=False))),
    "block_size": replace(key(), config=config_digest(_BASE.config, 32)),
    "stage start": key(start=1),
    "stage end": key(end=3),
    "stage ends": replace(key(), first=False),
}


@pytest.mark.parametrize("what", sorted(_OTHER_KEYS))
def test_keys_differing_in_one_field_are_separate(hist: History, what: str) -> None:
    other = _OTHER_KEYS[what]
    assert other != key()
    hist.record(key(), measured(workspace=1))
    assert hist.lookup(other) is None
    assert History(hist.path).lookup(other) is None
    hist.record(other, measured(workspace=2))
    assert History(hist.path).lookup(other) == measured(workspace=2)
    assert History(hist.path).lookup(key()) == measured(workspace=1)


def test_prompt_rows_are_part_of_the_key() -> None:
    """A decode runner with prompt rows (ModelConfig.prompt_rows) holds more graph memory: a measurement taken without
    them (or before they existed) must not stand for a load with them."""
    cfg = _BASE.config
    assert config_digest(replace(cfg, graph_prompt_tokens=0), 16) != config_digest(cfg, 16)
    assert config_digest(replace(cfg, graph_prompt_tokens=cfg.prompt_rows), 16) == config_digest(cfg, 16)


def test_fields_that_do_not_change_memory_keep_the_key() -> None:
    cfg = _BASE.config
    same = replace(cfg, name="renamed", path=Path("/elsewhere"), priority=5, weight=3.0, keep_alive_s=-1, gpus=(1,))
    assert config_digest(same, 16) == config_digest(cfg, 16)
    assert key(replace(_BASE, config=same)) == key()


def test_history_key_marks_the_ends() -> None:
    s = spec()
    assert (key(s, start=0, end=2).first, key(s, start=0, end=2).last) == (True, False)
    assert (key(s, start=2, end=4).first, key(s, start=2, end=4).last) == (False, True)
    assert key(s).torch_version == installed_torch_version()
    assert key(s).gpu_kind == "NVIDIA H100 80GB HBM3"


def test_torch_version_is_none_safe(monkeypatch: pytest.MonkeyPatch, hist: History) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(history_module.importlib.metadata, "version", missing)
    installed_torch_version.cache_clear()
    try:
        k = key()
        assert k.torch_version is None
        hist.record(k, measured())
        assert History(hist.path).lookup(k) == measured()
        assert History(hist.path).lookup(replace(k, torch_version="2.11.0")) is None
    finally:
        installed_torch_version.cache_clear()


# -- fingerprints --------------------------------------------------------------------------------------------


def test_fingerprint_is_stable_across_opens_and_moves(tmp_path: Path) -> None:
    d = write_hf_checkpoint(tmp_path / "a", tiny_config("llama-3-8b"))
    fp = model_fingerprint(open_checkpoint(d))
    assert fp == model_fingerprint(open_checkpoint(d))
    moved = shutil.copytree(d, tmp_path / "elsewhere" / "b")
    assert model_fingerprint(open_checkpoint(moved)) == fp
    assert ModelSpec.from_checkpoint(ModelConfig("x", d), open_checkpoint(d)).fingerprint == fp


def test_fingerprint_changes_with_a_tensor_shape_dtype_or_file(tmp_path: Path) -> None:
    d = write_hf_checkpoint(tmp_path / "a", tiny_config("llama-3-8b"))
    ckpt = open_checkpoint(d)
    fp = model_fingerprint(ckpt)
    t = ckpt.tensors[0]
    assert (
        model_fingerprint(replace(ckpt, tensors=(replace(t, shape=(t.shape[0] + 1, *t.shape[1:])), *ckpt.tensors[1:])))
        != fp
    )
    assert model_fingerprint(replace(ckpt, tensors=(replace(t, stored_dtype="F16"), *ckpt.tensors[1:]))) != fp
    # The same names and shapes stored as bf16: another file size, another fingerprint.
    bf16 = write_hf_checkpoint(tmp_path / "b", tiny_config("llama-3-8b"), dtype="BF16")
    assert model_fingerprint(open_checkpoint(bf16)) != fp
    wider = write_hf_checkpoint(tmp_path / "c", tiny_config("llama-3-8b", intermediate_size=128))
    assert model_fingerprint(open_checkpoint(wider)) != fp


# -- where the history lives, and when it is unusable --------------------------------------------------------


def test_path_from_env_at_call_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLMHOST_HISTORY", str(tmp_path / "x.sqlite"))
    assert History().path == tmp_path / "x.sqlite"
    monkeypatch.delenv("LLMHOST_HISTORY")
    monkeypatch.setenv("LLMHOST_CACHE_DIR", str(tmp_path / "cache"))
    assert history_path() == tmp_path / "cache" / "history.sqlite"


def test_off_disables_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMHOST_HISTORY", "off")
    h = History()
    assert h.path is None
    assert not h.enabled
    assert h.record(key(), measured()) is False
    assert h.lookup(key()) is None


def test_the_suite_never_writes_the_users_history(session_history: Path) -> None:
    assert history_path() == session_history
    assert Path.home() not in session_history.parents


def test_lookup_does_not_create_the_file(hist: History) -> None:
    assert hist.path is not None
    assert hist.lookup(key()) is None
    assert not hist.path.exists()
    assert not hist.path.parent.exists()


def test_corrupt_file_warns_once_and_acts_empty(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "history.sqlite"
    garbage = b"this is not a sqlite database" * 100
    path.write_bytes(garbage)
    h = History(path)
    with caplog.at_level(logging.WARNING, logger="llmhost.history"):
        assert h.lookup(key()) is None
        assert h.lookup(key(start=1)) is None
        assert h.record(key(), measured()) is False
    warnings = [r for r in caplog.records if r.name == "llmhost.history"]
    assert len(warnings) == 1
    assert str(path) in warnings[0].getMessage()
    assert "LLMHOST_HISTORY=off" in warnings[0].getMessage()
    assert path.read_bytes() == garbage  # the user's file is never overwritten
    assert not h.enabled


def test_unwritable_location_warns_and_does_not_raise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    h = History(blocker / "history.sqlite")
    with caplog.at_level(logging.WARNING, logger="llmhost.history"):
        assert h.record(key(), measured()) is False
        assert h.lookup(key()) is None
    assert len([r for r in caplog.records if r.name == "llmhost.history"]) == 1


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from llmhost.memory.history import History, HistoryKey, Measured
    path, tag, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    for i in range(n):
        ok = History(path).record(
            HistoryKey(f"fp-{tag}-{i}", "cfg", "gpu", "2.11", 0, 4, True, True), Measured(i, i, i, i, float(i))
        )
        assert ok, i
        shared = HistoryKey("shared", "cfg", "gpu", "2.11", 0, 4, True, True)
        History(path).record(shared, Measured(i, i, i, i, float(i)))
    """
)


def test_two_processes_writing_at_once(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    n = 60
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), tag, str(n)], stderr=subprocess.PIPE)
        for tag in ("a", "b")
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    h = History(path)
    for tag in ("a", "b"):
        for i in range(n):
            assert h.lookup(HistoryKey(f"fp-{tag}-{i}", "cfg", "gpu", "2.11", 0, 4, True, True)) == Measured(
                i, i, i, i, float(i)
            )
    last = h.lookup(HistoryKey("shared", "cfg", "gpu", "2.11", 0, 4, True, True))
    assert last == Measured(n - 1, n - 1, n - 1, n - 1, float(n - 1))


# -- the planner ---------------------------------------------------------------------------------------------


def gpus(*sizes_gib: int) -> Inventory:
    return Inventory(tuple(Device(i, f"kind {s}", s * GiB) for i, s in enumerate(sizes_gib)), "simulated")


def test_plan_uses_measured_workspace_and_graphs(hist: History) -> None:
    s = spec()
    inv = gpus(24)
    est = plan_models([s], inv, HostConfig())
    assert est == plan_models([s], inv, HostConfig(), hist)  # nothing recorded: the estimate, unmarked
    (stage,) = est.models[0].stages
    assert stage.need.measured == ()
    assert stage.need.measured_at is None

    hist.record(key(s, inv.devices[0]), measured(workspace=333 * MiB, graphs=44 * MiB, at=T0))
    p = plan_models([s], inv, HostConfig(sm_steering=False), History(hist.path))
    (got,) = p.models[0].stages
    assert got.need.workspace == 333 * MiB
    assert got.need.graphs == 44 * MiB
    # The measured figure is the runner's tensors: [host] sm_steering's confined graphs' executables come on top.
    steered = plan_models([s], inv, HostConfig(), History(hist.path)).models[0].stages[0].need
    assert steered.graphs == 44 * MiB + steered_graphs(s, on_gpu=True) > 44 * MiB
    assert got.need.measured == ("workspace", "graphs")
    assert got.need.measured_at == T0
    # Weights and KV are exact arithmetic: always the estimate's, whatever was measured.
    assert (got.need.weights, got.need.kv) == (stage.need.weights, stage.need.kv)
    assert p.used_on(0) == got.need.total


def test_plan_ignores_other_configs_bare_shapes_and_the_cpu(hist: History) -> None:
    s = spec()
    inv = gpus(24)
    hist.record(key(s, inv.devices[0]), measured(workspace=333 * MiB))
    other = replace(s, config=replace(s.config, max_batch=4))
    bare = replace(s, fingerprint=None)
    for variant in (other, bare):
        (st,) = plan_models([variant], inv, HostConfig(), History(hist.path)).models[0].stages
        assert st.need.measured == ()
        assert st.need == stage_need(variant, 4096 * variant.config.max_batch, 16, 0, 4, steered=True)
    cpu = Inventory((Device(0, "kind 24", 24 * GiB, kind="cpu"),), "cpu")  # same name, but a CPU
    (st,) = plan_models([s], cpu, HostConfig(), History(hist.path)).models[0].stages
    assert st.need.measured == ()


def test_lookup_follows_the_candidate_devices_kind(hist: History) -> None:
    """GPU 0 has the most room, so the estimate places the model there; its kind's history says the model
    takes more than GPU 0 has, so the model goes to GPU 1, whose kind has no record."""
    s = spec()
    inv = gpus(40, 24)
    assert plan_models([s], inv, HostConfig()).models[0].devices == (0,)
    hist.record(key(s, inv.devices[0]), measured(workspace=39 * GiB))
    p = plan_models([s], inv, HostConfig(), History(hist.path))
    (st,) = p.models[0].stages
    assert st.device == 1
    assert st.need.measured == ()


def test_fill_keeps_the_measured_figures(hist: History) -> None:
    s = spec(kv_tokens="fill")
    inv = gpus(24)
    hist.record(key(s, inv.devices[0]), measured(workspace=500 * MiB))
    p = plan_models([s], inv, HostConfig(), History(hist.path))
    (st,) = p.models[0].stages
    assert st.need.measured == ("workspace", "graphs")
    assert st.need.workspace == 500 * MiB
    assert p.models[0].kv_tokens > s.config.max_seq_len  # the pool grew into what was left
    assert 0 <= p.free_on(0) < st.need.kv // p.models[0].kv_blocks + 1  # less than one more block is left


def test_largest_context_counts_the_measured_saving(hist: History) -> None:
    """A measurement below the estimate frees room; the largest max_seq_len grows by what that room holds."""
    s = spec(max_seq_len=2048)
    base = stage_need(s, 2048 * 8, 16, 0, 4, steered=True)
    runtime = 1024 * MiB  # an unmeasured GPU kind's runtime overhead
    dev = Device(0, "tight", runtime + base.total + 4 * MiB)
    inv = Inventory((dev,), "simulated")
    without = plan_models([s], inv, HostConfig()).models[0]
    assert without.max_seq_len_fit >= 2048
    tensors = stage_need(s, 2048 * 8, 16, 0, 4).graphs  # what a load measures: no executables
    hist.record(key(s, dev), measured(workspace=base.workspace - 64 * MiB, graphs=tensors))
    with_history = plan_models([s], inv, HostConfig(), History(hist.path)).models[0]
    assert with_history.max_seq_len_fit > without.max_seq_len_fit


def test_one_read_per_model_and_gpu_kind(hist: History, monkeypatch: pytest.MonkeyPatch) -> None:
    specs = [spec(f"m{i}", f"fp-{i}") for i in range(10)]
    inv = parse_gpu_spec("8x80GiB")
    for s in specs[:5]:
        hist.record(key(s, inv.devices[0]), measured(workspace=200 * MiB))
    reads = count_connects(monkeypatch)
    p = plan_models(specs, inv, HostConfig(), History(hist.path))
    assert reads() == 10  # one kind of GPU, ten models: one read each, however many trial placements
    marked = {m.name for m in p.models if all(st.need.measured for st in m.stages)}
    assert marked == {f"m{i}" for i in range(5)}


def test_corrupt_history_still_plans(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "history.sqlite"
    path.write_bytes(b"\x00garbage" * 1000)
    s = spec()
    with caplog.at_level(logging.WARNING, logger="llmhost.history"):
        p = plan_models([s], gpus(24), HostConfig(), History(path))
    assert p == plan_models([s], gpus(24), HostConfig())
    assert any("unusable" in r.getMessage() for r in caplog.records)


# -- llmhost plan ------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_model_config(tmp_path: Path) -> Path:
    d = write_hf_checkpoint(tmp_path / "tiny", tiny_config("llama-3-8b"))
    cfg = tmp_path / "models.toml"
    cfg.write_text(f'[models.tiny]\npath = "{d}"\nmax_seq_len = 1024\n', encoding="utf-8")
    return cfg


def record_for_config(cfg: Path, device: Device, m: Measured) -> None:
    mc = load_config(cfg).models[0]
    s = ModelSpec.from_checkpoint(mc, open_checkpoint(mc.path))
    assert s.fingerprint is not None
    assert History().record(history_key(s, s.fingerprint, device, 0, s.shape.num_layers, 16), m)


def plan_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def own_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cli-history.sqlite"
    monkeypatch.setenv("LLMHOST_HISTORY", str(path))
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at 80 columns under capture otherwise
    return path


def test_cli_plan_json_marks_history_figures(
    tiny_model_config: Path, own_history: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = plan_cli(capsys, str(tiny_model_config), "--gpus", "1x24GiB", "--json")
    assert code == 0, err
    before = json.loads(out)
    assert before["history"] == str(own_history)
    assert before["models"][0]["stages"][0]["from_history"] == []
    assert before["models"][0]["stages"][0]["history_recorded_at"] is None

    record_for_config(tiny_model_config, parse_gpu_spec("1x24GiB").devices[0], measured(12_345_678, 0, T0))
    code, out, err = plan_cli(capsys, str(tiny_model_config), "--gpus", "1x24GiB", "--json")
    assert code == 0, err
    doc = json.loads(out)
    (stage,) = doc["models"][0]["stages"]
    (row,) = doc["gpus"][0]["models"]
    for s in (stage, row):
        assert s["workspace_bytes"] == 12_345_678
        assert s["graphs_bytes"] == 0
        assert s["from_history"] == ["workspace", "graphs"]
        assert s["history_recorded_at"] == datetime.fromtimestamp(T0, UTC).isoformat(timespec="seconds")
        assert s["total_bytes"] == s["weights_bytes"] + s["kv_bytes"] + 12_345_678
    for k in ("weights_bytes", "kv_bytes"):
        assert stage[k] == before["models"][0]["stages"][0][k]

    code, out, err = plan_cli(capsys, str(tiny_model_config), "--gpus", "1x24GiB", "--json", "--no-history")
    assert code == 0, err
    ignored = json.loads(out)
    assert ignored["history"] is None
    assert ignored == {**before, "history": None}


def test_cli_plan_table_marks_history_figures(
    tiny_model_config: Path, own_history: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record_for_config(tiny_model_config, parse_gpu_spec("1x24GiB").devices[0], measured(12_345_678, 0, T0))
    code, out, err = plan_cli(capsys, str(tiny_model_config), "--gpus", "1x24GiB")
    assert code == 0, err
    when = datetime.fromtimestamp(T0).strftime("%Y-%m-%d %H:%M")
    assert f"* from measured history: tiny ({when})" in out
    (row,) = [line for line in out.splitlines() if line.lstrip("│ ").startswith("tiny")]
    assert f"{fmt_bytes(12_345_678)}*" in row  # the measured workspace
    assert "0 B*" in row  # the measured graphs
    assert row.count("*") == 2

    code, out, err = plan_cli(capsys, str(tiny_model_config), "--gpus", "1x24GiB", "--no-history")
    assert code == 0, err
    assert "*" not in out
    assert "from measured history" not in out


def test_cli_plan_with_a_corrupt_history(
    tiny_model_config: Path, own_history: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    own_history.write_bytes(b"not sqlite" * 500)
    with caplog.at_level(logging.WARNING, logger="llmhost.history"):
        code, out, err = plan_cli(capsys, str(tiny_model_config), "--gpus", "1x24GiB", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["feasible"] is True
    assert doc["models"][0]["stages"][0]["from_history"] == []
    assert next(r.getMessage() for r in caplog.records if r.name == "llmhost.history").startswith(
        f"measured-memory history {own_history} is unusable"
    )


def test_plan_default_is_unchanged_by_an_empty_history(hist: History) -> None:
    specs = [spec(f"m{i}", f"fp-{i}", kv_tokens="fill" if i % 2 else None) for i in range(4)]
    inv = parse_gpu_spec("2x24GiB")
    p: Plan = plan_models(specs, inv, HostConfig())
    assert plan_models(specs, inv, HostConfig(), hist) == p
