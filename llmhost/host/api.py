"""Host: the Python API over the host core, for scripts and notebooks (the server uses HostClient directly).

    with Host.from_config("models.toml") as host:
        print(host.generate("llama3-8b", "The capital of France is", max_tokens=8))
        for text in host.stream("qwen", "Hello", chat=True):
            print(text, end="")
        print(host.ps())

The host runs in a thread of this process, driving every model from one loop exactly as under `llmhost serve`;
a private asyncio loop in another thread carries the client's queues, so the methods here are plain blocking calls
and may be used from several threads at once (requests from different threads are batched together).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from llmhost.config import Config, load_config
from llmhost.engine.sampling_params import SamplingParams
from llmhost.engine.text_stream import TextStream
from llmhost.engine.tokenizer import Tokenizer
from llmhost.errors import RequestError
from llmhost.host.client import HostClient
from llmhost.host.messages import ModelStatus, TokenEvent
from llmhost.memory.estimate import ModelSpec
from llmhost.memory.inventory import Inventory, detect_inventory, parse_gpu_spec
from llmhost.model_files import open_checkpoint

START_TIMEOUT_S = 600.0  # the first status from the host (planning done), not the loads


class Host:
    def __init__(
        self,
        config: Config,
        inventory: Inventory | None = None,
        runtime: Any = None,
        specs: Sequence[ModelSpec] | None = None,
    ) -> None:
        """runtime, specs: replace the engine runtime and the planner's reading of the checkpoints (benches with
        random weights at real shapes; see HostClient.start)."""
        self.config = config
        self.inventory = inventory or detect_inventory()
        self.tokenizers: dict[str, Tokenizer] = {}  # loaded on first text request: token-id requests need none
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="llmhost-api-loop", daemon=True)
        self._thread.start()
        self.client = HostClient(config, self.inventory)
        self.client.start(in_process=True, runtime=runtime, specs=specs)
        if not self.client.status_changed.wait(START_TIMEOUT_S) or self.client.stopped is not None:
            reason = self.client.stopped.reason if self.client.stopped else "no answer"
            self.close()
            raise RuntimeError(f"the host did not start: {reason}")

    @classmethod
    def from_config(cls, path: str | Path, gpus: str = "auto", runtime: Any = None) -> Host:
        """`gpus`: "auto" (NVML, or the CPU when there is no GPU) or a simulated list like "1x80GiB"."""
        inventory = detect_inventory() if gpus == "auto" else parse_gpu_spec(gpus)
        return cls(load_config(path), inventory, runtime)

    # -- requests -----------------------------------------------------------------------------------------------

    def generate(self, model: str, prompt: str | list[int], *, chat: bool = False, **sampling: Any) -> str:
        """The whole completion as text. `sampling`: SamplingParams fields (max_tokens, temperature, top_p, seed,
        stop, ...)."""
        return "".join(self.stream(model, prompt, chat=chat, **sampling))

    def stream(self, model: str, prompt: str | list[int], *, chat: bool = False, **sampling: Any) -> Iterator[str]:
        """Text deltas as they come; stop strings end it. Closing the iterator early aborts the request.
        `logit_bias` may be a dict {token id: bias}."""
        tok = self._tokenizer(model)
        if isinstance(bias := sampling.get("logit_bias"), Mapping):
            sampling["logit_bias"] = tuple(bias.items())
        params = SamplingParams(**sampling)
        text = TextStream.for_request(tok, params)
        for ev in self.stream_tokens(model, self._prompt_ids(tok, prompt, chat), params):
            delta = text.feed(ev)
            if delta.text:
                yield delta.text
            if delta.finish_reason is not None:
                return

    def stream_tokens(self, model: str, prompt_ids: list[int], params: SamplingParams) -> Iterator[TokenEvent]:
        """The host's token events for one request (ids, logprobs, finish reason)."""
        self._check(model)
        agen: AsyncGenerator[TokenEvent, None] = self.client.generate(model, prompt_ids, params)
        try:
            while True:
                try:
                    ev = asyncio.run_coroutine_threadsafe(agen.__anext__(), self._loop).result()
                except StopAsyncIteration:
                    return
                yield ev
        finally:
            asyncio.run_coroutine_threadsafe(agen.aclose(), self._loop).result()

    # -- models -------------------------------------------------------------------------------------------------

    def ps(self) -> list[ModelStatus]:
        reply = asyncio.run_coroutine_threadsafe(self.client.query(), self._loop).result()
        return list(reply.models)

    def load(self, model: str) -> ModelStatus:
        return self._admin("load", model)

    def unload(self, model: str, force: bool = False) -> ModelStatus:
        """Unload `model` once its requests finish (its status says `unloading` until then); `force`: fail them
        and unload at once."""
        return self._admin("unload", model, force)

    def _admin(self, action: Literal["load", "unload"], model: str, force: bool = False) -> ModelStatus:
        self._check(model)
        reply = asyncio.run_coroutine_threadsafe(self.client.admin(action, model, force), self._loop).result()
        return next(m for m in reply.models if m.name == model)

    def _check(self, model: str) -> None:
        names = [m.name for m in self.config.models]
        if model not in names:
            raise RequestError(f"model '{model}' is not configured; configured: {', '.join(names)}", "model")

    def _tokenizer(self, model: str) -> Tokenizer:
        self._check(model)
        if model not in self.tokenizers:
            self.tokenizers[model] = Tokenizer.from_checkpoint(open_checkpoint(self.config.model(model).path))
        return self.tokenizers[model]

    @staticmethod
    def _prompt_ids(tok: Tokenizer, prompt: str | list[int], chat: bool) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        if chat:
            return tok.encode_chat([{"role": "user", "content": prompt}])
        return tok.encode(prompt)

    # -- life cycle ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        self.client.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> Host:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
