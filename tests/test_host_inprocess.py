"""The in-process host's hooks for benches, on the CPU: models planned from shapes alone (no checkpoint on disk),
engines built by a runtime of the caller's (EngineRuntime.build), the core reached through HostClient.core and
on_start, and a request served end to end."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from llmhost.config import Config, HostConfig, ModelConfig
from llmhost.engine.engine import Engine
from llmhost.engine.kv_cache import KVCache
from llmhost.engine.model import LlamaModel
from llmhost.engine.sampling_params import SamplingParams
from llmhost.host.client import HostClient
from llmhost.host.coordinator import Slot
from llmhost.host.core import HostCore
from llmhost.host.model_runtime import EngineRuntime
from llmhost.memory.estimate import ModelSpec
from llmhost.memory.inventory import cpu_inventory
from llmhost.model_files.shape import ModelShape

SHAPE = ModelShape("llama", 2, 64, 4, 2, 16, 128, 256, False, 512)


class RandomRuntime(EngineRuntime):
    """Random weights at SHAPE instead of a checkpoint."""

    def build(self, slot: Slot) -> Engine:
        torch.manual_seed(0)
        model = LlamaModel(SHAPE, torch.float32, torch.device("cpu"), slot.config.max_seq_len)
        for name, t in model.destinations().items():
            t.fill_(1.0) if "norm" in name else t.normal_(0.0, 0.02)
        blocks = -(-slot.plan.kv_tokens // self.block_size)
        cache = KVCache(SHAPE, blocks, self.block_size, torch.float32, torch.device("cpu"))
        return Engine(model, cache, slot.config)


def test_host_planned_from_shapes_with_a_runtime_of_its_own() -> None:
    models = tuple(
        ModelConfig(n, Path("/nonexistent") / n, dtype="float32", max_seq_len=64, max_batch=2) for n in ("a", "b")
    )
    config = Config(HostConfig(), models)
    inventory = cpu_inventory()
    seen: list[HostCore] = []
    client = HostClient(config, inventory)
    specs = [ModelSpec.from_shape(m, SHAPE) for m in models]
    client.start(in_process=True, runtime=RandomRuntime(inventory, 16), specs=specs, on_start=seen.append)
    try:
        assert client.status_changed.wait(60)

        async def generate() -> list[int]:
            params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
            return [ev.token for ev in [e async for e in client.generate("b", [1, 2, 3], params)]]

        tokens = asyncio.run(generate())
        assert len(tokens) == 5
        assert seen and client.core is seen[0]
        assert {n: s.state for n, s in client.core.slots.items()} == {"a": "loaded", "b": "loaded"}
        assert client.core.gpu.gpu_seconds("b") > 0.0
    finally:
        client.stop()


def test_specs_must_name_the_configured_models() -> None:
    models = (ModelConfig("a", Path("/nonexistent/a"), dtype="float32", max_seq_len=64, max_batch=2),)
    other = ModelConfig("z", Path("/nonexistent/z"), dtype="float32", max_seq_len=64, max_batch=2)
    with pytest.raises(ValueError, match="config order"):
        HostCore(Config(HostConfig(), models), cpu_inventory(), None, specs=[ModelSpec.from_shape(other, SHAPE)])  # type: ignore[arg-type]


def test_on_start_only_for_an_in_process_host() -> None:
    client = HostClient(Config(HostConfig(), ()), cpu_inventory())
    with pytest.raises(ValueError, match="in-process"):
        client.start(in_process=False, on_start=print)


def test_spawned_host_with_a_runtime_of_its_own_reports_loads_and_gpu_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The benches' throughput phases: the host in its own process (as the server runs it), its runtime pickled
    into it; every load comes back in a status reply, and each model's charged GPU seconds in its status. With
    LLMHOST_STEP_TRACE set, the host writes every step's launch and collection when it stops."""
    trace = tmp_path / "steps.jsonl"
    monkeypatch.setenv("LLMHOST_STEP_TRACE", str(trace))
    models = tuple(
        ModelConfig(n, Path("/nonexistent") / n, dtype="float32", max_seq_len=64, max_batch=2) for n in ("a", "b")
    )
    config = Config(HostConfig(), models)
    inventory = cpu_inventory()
    client = HostClient(config, inventory)
    specs = [ModelSpec.from_shape(m, SHAPE) for m in models]
    client.start(in_process=False, runtime=RandomRuntime(inventory, 16), specs=specs)
    try:

        async def run() -> tuple[list[int], dict[str, float]]:
            params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
            tokens = [ev.token for ev in [e async for e in client.generate("b", [1, 2, 3], params)]]
            reply = await client.query()
            return tokens, {m.name: m.gpu_seconds for m in reply.models}

        tokens, seconds = asyncio.run(run())
        assert len(tokens) == 5
        assert seconds["b"] > 0.0 and seconds["a"] == 0.0
        assert [(r.model, r.action) for r in client.loads] == [("a", "load"), ("b", "load")]
    finally:
        client.stop()
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    steps = [(r["ev"], r["model"]) for r in records]
    assert steps.count(("launch", "b")) == steps.count(("collect", "b")) >= 5  # prompt + one per token after it
    assert {r["model"] for r in records if r["ev"] in ("launch", "collect")} == {"b"}
    assert all(r["model"] == "" for r in records if r["ev"] not in ("launch", "collect"))  # passes, gc, sends
    assert sum(r["tokens"].get("b", 0) for r in records if r["ev"] == "send") == 5  # every token's send traced
    passes = [r["pass_no"] for r in records]
    assert passes == sorted(passes) and passes[-1] > 1
