"""The host core through the Python API, in-process on the CPU: two real tiny models served concurrently (requests
from several threads, batched together in one loop) give exactly what each gives alone; GPU-time shares are
reported; unknown models are refused; the real SmolLM2 answers through Host.generate."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from checkpoint_files import smollm2_gguf
from engine_fixtures import TinyModels, tiny_models  # noqa: F401

from llmhost.config import ModelConfig
from llmhost.engine.engine import Engine
from llmhost.engine.sampling_params import SamplingParams
from llmhost.errors import RequestError
from llmhost.host.api import Host
from llmhost.memory.estimate import steered_graphs
from llmhost.memory.inventory import cpu_inventory

PROMPTS = [[1, 5, 9, 2, 7, 11], [3, 3, 8], [200, 100, 50, 25, 12, 6, 3, 1, 9]]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True)


def _config(tmp: Path, models: dict[str, Path]) -> Path:
    text = "".join(
        f'[models.{name}]\npath = "{path}"\ndtype = "float32"\nmax_seq_len = 128\nmax_batch = 4\n\n'
        for name, path in models.items()
    )
    cfg = tmp / "models.toml"
    cfg.write_text(text)
    return cfg


def _alone(path: Path, params: SamplingParams) -> list[list[int]]:
    cfg = ModelConfig("alone", path, dtype="float32", max_seq_len=128, max_batch=4, cuda_graphs=False)
    engine = Engine.load(cfg, "cpu")
    return [c.output_ids for c in engine.generate(PROMPTS, params)]


def test_two_models_served_concurrently_match_each_alone(tiny_models: TinyModels, tmp_path: Path) -> None:  # noqa: F811
    paths = {"a": tiny_models("llama")[1], "b": tiny_models("qwen3")[1]}
    expected = {(n, kind): _alone(p, sp) for n, p in paths.items() for kind, sp in (("g", GREEDY), ("s", SEEDED))}
    got: dict[tuple[str, str, int], list[int]] = {}
    errors: list[BaseException] = []

    with Host.from_config(_config(tmp_path, paths), gpus="auto") as host:

        def client(model: str, kind: str, i: int) -> None:
            try:
                params = GREEDY if kind == "g" else SEEDED
                got[(model, kind, i)] = [ev.token for ev in host.stream_tokens(model, PROMPTS[i], params)]
            except BaseException as e:  # surfaced below: a thread's exception would otherwise vanish
                errors.append(e)

        threads = [threading.Thread(target=client, args=(m, k, i)) for m in paths for k in ("g", "s") for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        status = {m.name: m for m in host.ps()}
        assert {m.state for m in status.values()} == {"loaded"}
        assert sum(m.gpu_share for m in status.values()) == pytest.approx(1.0)
        assert all(m.gpu_share > 0.1 for m in status.values()), "both models stepped"
        with pytest.raises(RequestError, match="not configured"):
            host.generate("nope", "hi")
    for (model, kind, i), tokens in got.items():
        assert tokens == expected[(model, kind)][i], (model, kind, i)
    assert len(got) == 12


def test_host_generate_text_with_the_real_smollm2(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[models.smol]\npath = "{smollm2_gguf()}"\ndtype = "float32"\nmax_seq_len = 256\nmax_batch = 2\n')
    with Host.from_config(cfg) as host:
        text = host.generate("smol", "What is the capital of France?", chat=True, max_tokens=16, temperature=0.0)
        assert "Paris" in text
        assert host.unload("smol").state == "unloaded"
        # an unloaded model comes back for the next request
        assert "Paris" in host.generate(
            "smol", "What is the capital of France?", chat=True, max_tokens=16, temperature=0.0
        )
        assert [m.state for m in host.ps()] == ["loaded"]
        # logit_bias as a dict, as a Python caller writes it: token 28 forced
        forced = host.generate("smol", "Hi", max_tokens=2, temperature=0.0, logit_bias={28: 100.0})
        assert forced == host.tokenizers["smol"].decode([28, 28])


def test_inventory_is_the_cpu_here() -> None:
    assert not cpu_inventory().has_gpus


def test_host_records_measured_bytes_in_the_history_and_plans_use_them(
    tiny_models: TinyModels,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a load on a (simulated) GPU the host stores what was measured per stage, keyed as the planner looks
    it up; the next plan of the same model on the same GPU kind takes those figures."""
    from multiprocessing import Pipe

    from test_coordinator import FakeRuntime

    from llmhost.config import load_config
    from llmhost.host.core import HostCore
    from llmhost.memory.history import History, history_key
    from llmhost.memory.inventory import parse_gpu_spec

    monkeypatch.setenv("LLMHOST_HISTORY", str(tmp_path / "h.sqlite"))
    config = load_config(_config(tmp_path, {"a": tiny_models("llama")[1]}))
    inventory = parse_gpu_spec("1x24GiB")

    class Measuring(FakeRuntime):
        def measure(self, slot):  # type: ignore[no-untyped-def]
            planned = super().measure(slot)
            return {d: {**k, "workspace": 12345, "graphs": 678} for d, k in planned.items()}

    ours, theirs = Pipe()
    core = HostCore(config, inventory, theirs, Measuring())
    core._send_status = lambda query_id: None  # type: ignore[method-assign]  # fake engines have no status
    assert core._bring_in("a") is not None and core.slots["a"].state == "loaded"
    spec, stage = core.specs["a"], core.slots["a"].plan.stages[0]
    key = history_key(spec, spec.fingerprint or "", inventory.devices[0], stage.start, stage.end, 16)
    got = History().lookup(key)
    assert got is not None and (got.workspace, got.graphs) == (12345, 678)
    assert got.weights == stage.need.weights
    again = HostCore(config, inventory, theirs, Measuring())
    need = again.slots["a"].plan.stages[0].need
    # (with [host] sm_steering, the default, the confined graphs' executables on top of the measured tensors)
    expected = (12345, 678 + steered_graphs(spec, on_gpu=True))
    assert (need.workspace, need.graphs) == expected, "the next plan uses the measured figures"
    ours.close()
