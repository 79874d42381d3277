"""HostClient: the API process's handle on the host-core process.

The host runs in a spawned process (CUDA cannot be forked). One sender thread writes the pipe, so an asyncio
handler never blocks on a full pipe while the host is busy loading; one reader thread routes what comes back:
tokens to the asyncio queue of their request, status replies to the future of their query.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import queue
import threading
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal

from llmhost.config import Config
from llmhost.engine.sampling_params import SamplingParams
from llmhost.host.core import HostCore, host_main
from llmhost.host.messages import (
    Abort,
    AdminCommand,
    FromHost,
    HostStopped,
    LoadRecord,
    ModelStatus,
    Query,
    RequestFailed,
    Shutdown,
    StatusReply,
    Submit,
    ToHost,
    TokenBatch,
    TokenEvent,
)
from llmhost.memory.estimate import ModelSpec
from llmhost.memory.inventory import Inventory

KEPT_LOADS = 1000  # load records kept (the benches read them for their memory reconciliation reports)


class HostRequestError(Exception):
    """The host refused or failed a request; `failure` says why, in the host's words."""

    def __init__(self, failure: RequestFailed) -> None:
        super().__init__(failure.message)
        self.failure = failure


class HostUnavailableError(Exception):
    """The host-core process stopped (or never started)."""


@dataclass
class _Waiter:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TokenEvent | RequestFailed | HostStopped]


class _HostThread(threading.Thread):
    """The host loop in a thread, with the process API HostClient.stop uses (a thread cannot be killed: a host
    that does not stop on Shutdown is left to the interpreter's exit, as a daemon)."""

    def __init__(
        self,
        config: Config,
        inventory: Inventory,
        conn: Connection,
        runtime: Any,
        specs: Sequence[ModelSpec] | None,
        on_start: Callable[[HostCore], None] | None,
    ) -> None:
        super().__init__(
            target=host_main,
            args=(config, inventory, conn, runtime, specs, self._started),
            name="llmhost-host",
            daemon=True,
        )
        self.core: HostCore | None = None
        self._on_start = on_start

    def _started(self, core: HostCore) -> None:
        self.core = core
        if self._on_start is not None:
            self._on_start(core)

    def terminate(self) -> None:
        pass

    def kill(self) -> None:
        pass


class HostClient:
    def __init__(self, config: Config, inventory: Inventory) -> None:
        self.config = config
        self.inventory = inventory
        self.status: dict[str, ModelStatus] = {}  # the latest status of every model, pushed by the host
        # The latest loads and swap-ins the host reported, with their reconciliations (bounded: a server that
        # swaps models in all day would otherwise keep every record).
        self.loads: deque[LoadRecord] = deque(maxlen=KEPT_LOADS)
        self.stopped: HostStopped | None = None
        self._requests: dict[str, _Waiter] = {}
        self._queries: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[StatusReply]]] = {}
        self._query_ids = itertools.count(1)
        self._outbox: queue.Queue[ToHost | None] = queue.Queue()
        self._lock = threading.Lock()
        self.status_changed = threading.Event()

    def start(
        self,
        in_process: bool = False,
        runtime: Any = None,
        specs: Sequence[ModelSpec] | None = None,
        on_start: Callable[[HostCore], None] | None = None,
    ) -> None:
        """Start the host: in a spawned process (the server, the benches' throughput phases), or in a thread of
        this process (the Python API, the benches that observe the core). `runtime` replaces the engine runtime
        (e.g. random weights; pickled into a spawned process), `specs` the planner's reading of the checkpoints
        (e.g. ModelSpec.from_shape where no checkpoint exists). In-process only: `on_start` is called with the
        core in the host thread before its first load (e.g. to observe its coordinator)."""
        self._proc: _HostThread | mp.process.BaseProcess
        if in_process:
            self._conn, child = mp.Pipe()
            self._proc = _HostThread(self.config, self.inventory, child, runtime, specs, on_start)
            self._proc.start()
        else:
            if on_start is not None:
                raise ValueError("on_start applies to an in-process host only")
            ctx = mp.get_context("spawn")
            self._conn, child = ctx.Pipe()
            self._proc = ctx.Process(
                target=host_main,
                args=(self.config, self.inventory, child, runtime, specs),
                name="llmhost-host",
                daemon=False,
            )
            self._proc.start()
            child.close()
        threading.Thread(target=self._read, name="llmhost-host-reader", daemon=True).start()
        threading.Thread(target=self._write, name="llmhost-host-writer", daemon=True).start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the host to stop; end it by force if it does not within `timeout` seconds."""
        if not hasattr(self, "_proc"):
            return
        self._outbox.put(Shutdown())
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
        self._outbox.put(None)
        self._fail_all(HostStopped("the server is shutting down"))

    @property
    def core(self) -> HostCore | None:
        """The in-process host's core once it is built (benches read its coordinator and GPU scheduler; read only,
        and only what the loop thread no longer changes); None for a host in its own process."""
        proc = getattr(self, "_proc", None)
        return proc.core if isinstance(proc, _HostThread) else None

    @property
    def alive(self) -> bool:
        return hasattr(self, "_proc") and self._proc.is_alive() and self.stopped is None

    # -- requests -----------------------------------------------------------------------------------------------

    async def generate(
        self, model: str, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncGenerator[TokenEvent, None]:
        """Yield this request's tokens one by one. Leaving the loop early (client gone) aborts it in the host,
        which frees its KV blocks."""
        async with aclosing(self.generate_batches(model, prompt_ids, params, request_id)) as batches:
            async for batch in batches:
                for ev in batch:
                    yield ev

    async def generate_batches(
        self, model: str, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncGenerator[list[TokenEvent], None]:
        """Yield this request's tokens, every token that has arrived since the last yield together: a consumer
        that falls behind (an API process serving many streams) catches up in fewer, larger steps. Leaving the
        loop early aborts the request in the host, which frees its KV blocks."""
        if not self.alive:
            raise HostUnavailableError(self.stopped.reason if self.stopped else "the host is not running")
        rid = request_id or uuid.uuid4().hex
        waiter = _Waiter(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            self._requests[rid] = waiter
        self._outbox.put(Submit(rid, model, tuple(prompt_ids), params))
        finished = False
        try:
            while True:
                items = [await waiter.queue.get()]
                while not waiter.queue.empty():
                    items.append(waiter.queue.get_nowait())
                events: list[TokenEvent] = []
                failure: RequestFailed | HostStopped | None = None
                for item in items:
                    if not isinstance(item, TokenEvent):
                        failure = item
                        break
                    events.append(item)
                    if item.finish_reason is not None:
                        break
                # Set before yielding: a consumer that stops right after the last token must not send an Abort
                # for a request the host has already finished (or failed).
                finished = failure is not None or (events[-1].finish_reason is not None if events else False)
                if events:
                    yield events
                if isinstance(failure, RequestFailed):
                    raise HostRequestError(failure)
                if isinstance(failure, HostStopped):
                    raise HostUnavailableError(failure.reason)
                if finished:
                    return
        finally:
            with self._lock:
                self._requests.pop(rid, None)
            if not finished:
                self._outbox.put(Abort(rid))

    async def query(self) -> StatusReply:
        return await self._ask(lambda qid: Query(qid))

    async def admin(self, action: Literal["load", "unload"], model: str, force: bool = False) -> StatusReply:
        return await self._ask(lambda qid: AdminCommand(qid, action, model, force))

    async def _ask(self, make: Callable[[int], ToHost]) -> StatusReply:
        if not self.alive:
            raise HostUnavailableError(self.stopped.reason if self.stopped else "the host is not running")
        qid = next(self._query_ids)
        fut: asyncio.Future[StatusReply] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._queries[qid] = (asyncio.get_running_loop(), fut)
        self._outbox.put(make(qid))
        return await fut

    # -- threads ------------------------------------------------------------------------------------------------

    def _write(self) -> None:
        while (msg := self._outbox.get()) is not None:
            try:
                self._conn.send(msg)
            except (BrokenPipeError, OSError):
                return

    def _read(self) -> None:
        while True:
            try:
                msg: FromHost = self._conn.recv()
            except (EOFError, OSError):
                self._on_stopped(HostStopped("the host process exited"))
                return
            if isinstance(msg, TokenBatch):
                self._deliver_batch(msg.events)
            elif isinstance(msg, RequestFailed):
                self._deliver(msg.request_id, msg)
            elif isinstance(msg, StatusReply):
                for st in msg.models:
                    self.status[st.name] = st
                self.loads.extend(msg.loads)
                self.status_changed.set()
                with self._lock:
                    pending = self._queries.pop(msg.query_id, None)
                if pending is not None:
                    loop, fut = pending
                    loop.call_soon_threadsafe(_resolve, fut, msg)
            elif isinstance(msg, HostStopped):
                self._on_stopped(msg)
                return

    def _deliver_batch(self, events: tuple[TokenEvent, ...]) -> None:
        """One wake-up per event loop per batch, not one per token: each call_soon_threadsafe writes the loop's
        self-pipe, and a batch holds a token for every running sequence."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Waiter, TokenEvent]]] = {}
        with self._lock:
            for ev in events:
                waiter = self._requests.get(ev.request_id)
                if waiter is not None:
                    by_loop.setdefault(waiter.loop, []).append((waiter, ev))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _deliver(self, rid: str, item: TokenEvent | RequestFailed | HostStopped) -> None:
        with self._lock:
            waiter = self._requests.get(rid)
        if waiter is not None:
            waiter.loop.call_soon_threadsafe(waiter.queue.put_nowait, item)

    def _on_stopped(self, msg: HostStopped) -> None:
        if self.stopped is None:
            self.stopped = msg
        self.status_changed.set()
        self._fail_all(msg)

    def _fail_all(self, msg: HostStopped) -> None:
        with self._lock:
            waiters = list(self._requests.values())
            queries = list(self._queries.values())
            self._queries.clear()
        for w in waiters:
            w.loop.call_soon_threadsafe(w.queue.put_nowait, msg)
        for loop, fut in queries:
            loop.call_soon_threadsafe(_fail, fut, HostUnavailableError(msg.reason))


def _put_all(items: list[tuple[_Waiter, TokenEvent]]) -> None:
    for waiter, ev in items:
        waiter.queue.put_nowait(ev)


def _resolve(fut: asyncio.Future[StatusReply], reply: StatusReply) -> None:
    if not fut.done():
        fut.set_result(reply)


def _fail(fut: asyncio.Future[StatusReply], err: Exception) -> None:
    if not fut.done():
        fut.set_exception(err)
