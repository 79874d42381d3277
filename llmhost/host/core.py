"""HostCore: runs in the host-core process. Plans, loads every configured model, then drives all engines from
one loop: drain messages, step every engine that has work, send the tokens of the whole iteration at once.

One failing model never takes the others down: a load failure marks that model "failed", a step that raises
fails that engine's requests, and the loop goes on.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from llmhost.config import Config, ModelConfig
from llmhost.engine.engine import Engine
from llmhost.engine.tokenizer import Tokenizer
from llmhost.errors import LlmhostError, RequestError
from llmhost.host.messages import (
    Abort,
    AdminCommand,
    HostStopped,
    ModelState,
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
from llmhost.memory.plan import ModelPlan, Plan
from llmhost.memory.planner import plan_models
from llmhost.model_files import open_checkpoint

log = logging.getLogger("llmhost.host")

IDLE_WAIT_S = 0.05  # how long the loop blocks on the pipe when no engine has work


@dataclass
class _Slot:
    """One configured model: its plan, its engine when resident, and what `ps` shows."""

    config: ModelConfig
    plan: ModelPlan
    device: str
    state: ModelState = "unloaded"
    since: float = 0.0
    engine: Engine | None = None
    error: str = ""

    def status(self) -> ModelStatus:
        eng = self.engine
        memory: dict[str, int] = {}
        if eng is not None:
            r = eng.memory_report()
            memory = {"weights": r.weights, "kv": r.kv, "workspace": r.workspace, "graphs": r.graphs}
        return ModelStatus(
            name=self.config.name,
            state=self.state,
            device=self.device if eng is not None else "",
            max_seq_len=self.config.max_seq_len,
            memory=memory,
            since=self.since,
            keep_alive_s=self.config.keep_alive_s,
            running=len(eng.scheduler.running) if eng else 0,
            waiting=len(eng.scheduler.waiting) if eng else 0,
            kv_blocks_used=eng.blocks.used_count if eng else 0,
            kv_blocks_total=eng.blocks.num_blocks if eng else 0,
            error=self.error,
        )


class HostCore:
    def __init__(self, config: Config, inventory: Inventory, conn: Connection) -> None:
        self.config = config
        self.conn = conn
        specs = [ModelSpec.from_checkpoint(m, open_checkpoint(m.path)) for m in config.models]
        self.plan: Plan = plan_models(specs, inventory, config.host)
        self.slots: dict[str, _Slot] = {}
        for mp in self.plan.models:
            stage = mp.stages[0]
            device = inventory.devices[stage.device]
            if len(mp.stages) > 1:
                raise LlmhostError(f"model '{mp.name}' must be split across GPUs, which the engine cannot run yet")
            name = "cpu" if device.kind == "cpu" else f"cuda:{device.index}"
            self.slots[mp.name] = _Slot(config.model(mp.name), mp, name)
        self.stopping = False

    # -- life cycle ---------------------------------------------------------------------------------------------

    def run(self) -> None:
        for slot in self.slots.values():
            slot.state, slot.since = "loading", time.time()
        self._send_status(0)
        for name in self.slots:  # the plan's load order
            self._load(name)
            self._drain(0.0)  # answer status queries between loads
            if self.stopping:
                break
        while not self.stopping:
            busy = any(s.engine is not None and s.engine.has_work for s in self.slots.values())
            self._drain(0.0 if busy else IDLE_WAIT_S)
            if busy:
                self._step_all()
        self.conn.send(HostStopped("shutdown"))

    def _load(self, name: str) -> None:
        slot = self.slots[name]
        slot.state, slot.since, slot.error = "loading", time.time(), ""
        try:
            ckpt = open_checkpoint(slot.config.path)
            tokenizer = Tokenizer.from_checkpoint(ckpt)
            slot.engine = Engine.load(
                slot.config,
                slot.device,
                kv_tokens=slot.plan.kv_tokens,
                block_size=self.plan.block_size,
                checkpoint=ckpt,
                eos_token_ids=tokenizer.eos_token_ids,
            )
            slot.state = "loaded"
        except Exception as e:  # a broken checkpoint or an OOM must not stop the other models
            log.error("loading %s failed: %s", name, e)
            slot.engine = None
            slot.state, slot.error = "failed", str(e)
            self._free_device_memory()
        slot.since = time.time()
        self._send_status(0)

    def _unload(self, name: str) -> None:
        slot = self.slots[name]
        if slot.engine is not None:
            for seq_id in list(slot.engine.seqs):
                self.conn.send(RequestFailed(seq_id, "model_not_loaded", f"model '{name}' was unloaded"))
        slot.engine = None
        slot.state, slot.since = "unloaded", time.time()
        self._free_device_memory()
        self._send_status(0)

    @staticmethod
    def _free_device_memory() -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- messages -----------------------------------------------------------------------------------------------

    def _drain(self, timeout: float) -> None:
        while self.conn.poll(timeout):
            self._handle(self.conn.recv())
            timeout = 0.0

    def _handle(self, msg: ToHost) -> None:
        if isinstance(msg, Submit):
            self._submit(msg)
        elif isinstance(msg, Abort):
            for slot in self.slots.values():
                if slot.engine is not None and slot.engine.abort(msg.request_id):
                    break
        elif isinstance(msg, Query):
            self._send_status(msg.query_id)
        elif isinstance(msg, AdminCommand):
            if msg.model not in self.slots:
                self.conn.send(StatusReply(msg.query_id, (), ok=False, message=f"model '{msg.model}' not found"))
                return
            if msg.action == "load" and self.slots[msg.model].engine is None:
                self._load(msg.model)
            elif msg.action == "unload":
                self._unload(msg.model)
            self._send_status(msg.query_id)
        elif isinstance(msg, Shutdown):
            self.stopping = True

    def _submit(self, msg: Submit) -> None:
        slot = self.slots.get(msg.model)
        if slot is None:
            self.conn.send(RequestFailed(msg.request_id, "model_not_found", f"model '{msg.model}' does not exist"))
            return
        if slot.engine is None:
            self.conn.send(
                RequestFailed(msg.request_id, "model_not_loaded", f"model '{msg.model}' is {slot.state}", None)
            )
            return
        try:
            slot.engine.add_request(msg.prompt_ids, msg.params, msg.request_id)
        except RequestError as e:
            self.conn.send(RequestFailed(msg.request_id, "invalid", str(e), e.param))

    def _send_status(self, query_id: int) -> None:
        self.conn.send(StatusReply(query_id, tuple(s.status() for s in self.slots.values())))

    # -- the loop's work ----------------------------------------------------------------------------------------

    def _step_all(self) -> None:
        events: list[TokenEvent] = []
        for name, slot in self.slots.items():
            eng = slot.engine
            if eng is None or not eng.has_work:
                continue
            try:
                outs = eng.step()
            except Exception:  # a failing step fails this engine's requests, not the host
                log.error("step of %s failed:\n%s", name, traceback.format_exc())
                for seq_id in list(eng.seqs):
                    eng.abort(seq_id)
                    self.conn.send(RequestFailed(seq_id, "internal", f"model '{name}' failed while generating"))
                continue
            events.extend(TokenEvent(o.seq_id, o.token, o.logprob, o.top_logprobs, o.finish_reason) for o in outs)
        if events:
            self.conn.send(TokenBatch(tuple(events)))


def host_main(config: Config, inventory: Inventory, conn: Connection) -> None:
    """Entry point of the host-core process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s host %(levelname)s %(message)s")
    torch.set_grad_enabled(False)
    try:
        core = HostCore(config, inventory, conn)
    except LlmhostError as e:
        conn.send(HostStopped(str(e)))
        return
    # The API process going away (a closed pipe) or Ctrl-C reaching the process group both mean: stop quietly.
    with contextlib.suppress(EOFError, BrokenPipeError, KeyboardInterrupt):
        core.run()
