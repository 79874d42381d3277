"""Generation in the API process: one API request becomes one host request per choice; each choice's token events
become text pieces (detokenized, stop strings applied), and the choices are merged into one stream.

Invariant: every host request is either finished by the host or aborted. Leaving `run_choice` early (a stop string
matched, the client went away, the server is stopping) closes the host client's generate iterator, whose
`finally` sends Abort, so the host frees the sequence's KV blocks at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Iterable
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Literal

from llmhost.engine.sampling_params import SamplingParams
from llmhost.engine.text_stream import TextStream
from llmhost.engine.tokenizer import Tokenizer
from llmhost.host.client import HostClient
from llmhost.host.messages import TokenEvent
from llmhost.server.errors import ApiError, queue_full
from llmhost.server.metrics import Metrics

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class ChoiceJob:
    index: int  # the choice's index in the response: prompt number x n + choice number
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class Piece:
    """What one choice adds: new text, the token events behind it (for logprobs and usage), and the finish reason
    on its last piece. Text and tokens need not line up: text is held back while it may be the start of a stop
    string or of a multi-byte character."""

    index: int
    text: str
    tokens: tuple[TokenEvent, ...]
    finish_reason: FinishReason | None


async def run_choice(
    client: HostClient, tokenizer: Tokenizer, model: str, job: ChoiceJob, metrics: Metrics, arrival: float
) -> AsyncGenerator[Piece, None]:
    """arrival: time.perf_counter() when the HTTP request came in, so time to first token includes tokenizing.

    Takes the host's tokens in batches (all that arrived since the last look) and yields one piece per batch, so
    an API process that falls behind many streams catches up with fewer, larger chunks."""
    timer = metrics.timer(model, arrival)
    text = TextStream.for_request(tokenizer, job.params)
    pending: list[TokenEvent] = []
    async with aclosing(client.generate_batches(model, job.prompt_ids, job.params)) as batches:
        async for batch in batches:
            parts: list[str] = []
            reason: FinishReason | None = None
            for ev in batch:
                timer.on_token()
                pending.append(ev)
                delta = text.feed(ev)
                parts.append(delta.text)
                if delta.finish_reason == "abort":  # the host never sends it for a live request
                    raise ApiError(500, f"model '{model}' aborted the request", "server_error", code="internal_error")
                if delta.finish_reason is not None:
                    reason = delta.finish_reason
                    break  # a stop string: the batch's later tokens are dropped, as the host is told to stop
            out = "".join(parts)
            if not out and reason is None:
                continue
            yield Piece(job.index, out, tuple(pending), reason)
            pending = []
            if reason is not None:
                timer.on_finish()
                metrics.finished(model, reason)
                return  # after a stop string, leaving the loop aborts the request in the host


def merge(streams: list[AsyncGenerator[Piece, None]]) -> AsyncGenerator[Piece, None]:
    """The pieces of every choice, in arrival order. Closing the merged iterator cancels every choice. A single
    choice passes through as it is: every layer of async generators costs time on every token."""
    return streams[0] if len(streams) == 1 else _merge_many(streams)


async def _merge_many(streams: list[AsyncGenerator[Piece, None]]) -> AsyncGenerator[Piece, None]:
    queue: asyncio.Queue[Piece | Exception | None] = asyncio.Queue()

    async def pump(stream: AsyncGenerator[Piece, None]) -> None:
        try:
            async with aclosing(stream) as s:
                async for piece in s:
                    queue.put_nowait(piece)
            queue.put_nowait(None)
        except Exception as e:  # handed to the consumer, which raises it
            queue.put_nowait(e)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        # Cancelling a pump cancels its host request's generate iterator, which sends Abort.
        for t in tasks:
            t.cancel()


class Lease:
    """Slots a request holds in its model's gate; released exactly once."""

    def __init__(self, gate: ModelGate, model: str, count: int) -> None:
        self._gate = gate
        self.model = model
        self.count = count
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._gate.release(self.model, self.count)


class ModelGate:
    """Bounds the sequences in flight per model (running in the host or queued there), so a burst is answered with
    429 and Retry-After at once instead of queueing without limit. Also remembers when each model was last busy,
    for the keep-alive deadline `ps` shows."""

    def __init__(self, limits: dict[str, int]) -> None:
        self.limits = limits
        self.in_flight = dict.fromkeys(limits, 0)
        self.last_used: dict[str, float] = {}  # wall-clock time the model last became idle

    def acquire(self, model: str, count: int) -> Lease:
        """Callers check first that `count` fits the limit at all (ApiError 400 otherwise), so a refusal here is
        one that retrying can get past."""
        limit = self.limits[model]
        busy = self.in_flight[model]
        if busy + count > limit:
            need = f"; this request needs {count}" if count > 1 else ""
            raise queue_full(
                f"model '{model}' already has {busy} of its {limit} sequences in flight{need}; retry shortly"
            )
        self.in_flight[model] += count
        return Lease(self, model, count)

    def release(self, model: str, count: int) -> None:
        self.in_flight[model] -= count
        if self.in_flight[model] == 0:
            self.last_used[model] = time.time()


def choice_jobs(prompts: Iterable[list[int]], params: SamplingParams, n: int) -> list[ChoiceJob]:
    """n jobs per prompt. With a seed, choice i gets seed + i: the n choices differ, and the same request sent
    again returns the same n texts."""
    jobs: list[ChoiceJob] = []
    for p, prompt in enumerate(prompts):
        for i in range(n):
            seeded = params if params.seed is None or i == 0 else replace(params, seed=params.seed + i)
            jobs.append(ChoiceJob(p * n + i, prompt, seeded))
    return jobs
