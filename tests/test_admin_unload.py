"""An admin unload lets the requests in the model finish (Ollama's behaviour) and then unloads it; a request that
arrives meanwhile waits and loads it again; a forced unload fails the requests at once. In-process host on the
CPU with random weights (test_host_inprocess's runtime)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_host_inprocess import SHAPE, RandomRuntime

from llmhost.config import Config, HostConfig, ModelConfig
from llmhost.engine.sampling_params import SamplingParams
from llmhost.host.client import HostClient, HostRequestError
from llmhost.memory.estimate import ModelSpec
from llmhost.memory.inventory import cpu_inventory

TOKENS = 40


@pytest.fixture
def client() -> Iterator[HostClient]:
    models = (ModelConfig("b", Path("/nonexistent/b"), dtype="float32", max_seq_len=128, max_batch=2),)
    config = Config(HostConfig(), models)
    inventory = cpu_inventory()
    c = HostClient(config, inventory)
    specs = [ModelSpec.from_shape(m, SHAPE) for m in models]
    c.start(in_process=True, runtime=RandomRuntime(inventory, 16), specs=specs)
    assert c.status_changed.wait(60)
    yield c
    c.stop()


PARAMS = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)


async def _state(client: HostClient) -> tuple[str, bool]:
    st = next(m for m in (await client.query()).models if m.name == "b")
    return st.state, st.unloading


async def _until_unloaded(client: HostClient) -> None:
    for _ in range(600):
        if (await _state(client))[0] == "unloaded":
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never unloaded")


def test_an_unload_lets_the_requests_in_the_model_finish_first(client: HostClient) -> None:
    async def tokens() -> int:
        return len([e async for e in client.generate("b", [1, 2, 3], PARAMS)])

    async def scenario() -> tuple[int, tuple[str, bool], int, int]:
        got = 0
        reply_state: tuple[str, bool] = ("", False)
        meanwhile: asyncio.Task[int] | None = None
        async for _ in client.generate("b", [1, 2, 3], PARAMS):
            got += 1
            if got == 3:
                st = next(m for m in (await client.admin("unload", "b")).models if m.name == "b")
                reply_state = (st.state, st.unloading)
                meanwhile = asyncio.create_task(tokens())  # arrives while the unload waits
        assert meanwhile is not None
        waited = await meanwhile  # it waited for the unload, then loaded the model again
        # A request after the unload loads the model again and is answered in full.
        await client.admin("unload", "b")
        await _until_unloaded(client)
        return got, reply_state, waited, await tokens()

    got, reply_state, waited, again = asyncio.run(scenario())
    assert reply_state == ("loaded", True), "still serving its request, marked as unloading"
    assert got == TOKENS, "the request in the model finished"
    assert waited == TOKENS, "the request that arrived meanwhile was answered in full"
    assert again == TOKENS


def test_a_forced_unload_fails_the_requests_at_once(client: HostClient) -> None:
    async def scenario() -> tuple[int, str]:
        got = 0
        try:
            async for _ in client.generate("b", [1, 2, 3], PARAMS):
                got += 1
                if got == 3:
                    await client.admin("unload", "b", force=True)
        except HostRequestError as e:
            return got, e.failure.kind
        return got, ""

    got, code = asyncio.run(scenario())
    assert code == "model_not_loaded" and got < TOKENS
    assert asyncio.run(_state(client)) == ("unloaded", False)


def test_llmhost_ps_shows_a_model_that_is_unloading() -> None:
    from io import StringIO

    from rich.console import Console

    from llmhost.ps_command import render_ps

    entry = {
        "name": "b", "state": "loaded", "error": "", "unloading": True, "memory": {}, "memory_total": 0,
        "device": "cpu", "kv_blocks_used": 0, "kv_blocks_total": 0, "running": 1, "waiting": 0, "since": None,
        "keep_alive_s": 300.0, "expires_at": None, "in_flight": 1,
    }  # fmt: skip
    out = StringIO()
    render_ps({"models": [entry]}, Console(file=out, width=200))
    assert "loaded, unloading" in out.getvalue()
