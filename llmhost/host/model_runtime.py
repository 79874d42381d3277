"""EngineRuntime: the coordinator's tensor work on real engines (load from disk, park to pinned RAM, unpark,
release), and the driver readings its ledger reconciles with."""

from __future__ import annotations

import gc
import logging
import os
from typing import Any

import torch

from llmhost.engine.engine import Engine
from llmhost.engine.placement import LayerPlacement
from llmhost.engine.sampling_params import SamplingParams
from llmhost.engine.tokenizer import Tokenizer
from llmhost.errors import LlmhostError
from llmhost.host import parking
from llmhost.host.coordinator import ByDevice, Slot
from llmhost.host.ledger import Reading
from llmhost.memory.inventory import Inventory, nvml_processes
from llmhost.model_files import open_checkpoint

log = logging.getLogger("llmhost.host")


def run_largest_step(engine: Engine) -> None:
    """Run the largest step a request can cause once, at the deepest position: a dummy prompt of max_seq_len - 1
    tokens (its last chunk attends to the whole context), one output token. The caching allocator then holds
    that step's activations, so the workspace the ledger and the history record is measured, not the estimate."""
    n = engine.config.max_seq_len - 1
    rid = engine.add_request([0] * n, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    while rid in engine.seqs:
        engine.step()


class DriverProbe:
    """Device-wide used bytes (NVML, as the inventory reads the device; cudaMemGetInfo without NVML) and other
    processes' bytes (NVML per-process accounting).

    Other processes' share is the inventory's figure at start (what was in use before this process) plus whatever
    other processes gained since. Where NVML cannot attribute memory to processes (no per-process accounting, or
    a container whose PIDs NVML does not see), the figure at start is kept."""

    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory
        self._nvml: Any = None
        self._others_at_start: dict[int, int] = {}
        if not inventory.has_gpus or inventory.source != "nvml":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            for d in inventory.devices:
                self._others_at_start[d.index] = self._others(d.index) or 0
        except Exception as e:  # NVML missing or refusing: readings fall back to the start figures
            log.info("NVML per-process accounting unavailable (%s): other processes' memory is the start figure", e)
            self._nvml = None

    def _others(self, index: int) -> int | None:
        if self._nvml is None:
            return None
        procs = nvml_processes(self._nvml, self.inventory.devices[index].nvml)
        if procs is None:
            return None
        me = os.getpid()
        initialized: bool = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
        if procs and initialized and not any(pid == me for pid, _ in procs):
            return None  # our own PID is invisible (PID namespace): attribution is unreliable
        return sum(used for pid, used in procs if pid != me)

    def reading(self, device: int) -> Reading | None:
        if not self.inventory.has_gpus or self.inventory.source != "nvml" or not torch.cuda.is_available():
            return None
        used = self._nvml_used(device)
        if used is None:
            free, total = torch.cuda.mem_get_info(device)
            used = int(total - free)
        external = self.inventory.devices[device].external
        others = self._others(device)
        if others is not None:
            external += max(0, others - self._others_at_start.get(device, 0))
        return Reading(used=used, external=int(external))

    def _nvml_used(self, index: int) -> int | None:
        """NVML's device-wide used bytes: the same accounting as the inventory's total and external (NVML), so
        the ledger compares like with like. cudaMemGetInfo's total leaves out what the driver reserves (on the
        H100 480 MiB: NVML's total minus cudaMemGetInfo's equals NVML's used on the idle GPU, and it is in the
        inventory's external): its total - free read that much below the ledger's prediction after every load,
        up to 2.7% on a first load (an early H100 run of bench/multi_model.py)."""
        if self._nvml is None:
            return None
        nv = self._nvml
        try:
            return int(nv.nvmlDeviceGetMemoryInfo(self._handle(index)).used)
        except Exception:
            return None

    def _handle(self, index: int) -> Any:
        """NVML's handle of the inventory's device `index` (NVML numbers every GPU; CUDA_VISIBLE_DEVICES renumbers
        those this process sees)."""
        return self._nvml.nvmlDeviceGetHandleByIndex(self.inventory.devices[index].nvml)


class EngineRuntime:
    """Loads engines from their checkpoints where the slot's plan puts them."""

    def __init__(self, inventory: Inventory, block_size: int) -> None:
        self.inventory = inventory
        self.block_size = block_size
        self.probe = DriverProbe(inventory)
        self._kv_bytes: dict[str, list[int]] = {}
        self._workspace: dict[str, dict[str, int]] = {}  # model -> device -> bytes its largest step took

    def __getstate__(self) -> dict[str, Any]:
        """Pickled into a spawned host process: the driver probe (an NVML session) is opened anew there."""
        state = self.__dict__.copy()
        del state["probe"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.probe = DriverProbe(self.inventory)

    def load(self, slot: Slot) -> None:
        gpus = [torch.device(n) for n in slot.device_names if n.startswith("cuda")]
        before = {}
        for d in gpus:
            torch.cuda.synchronize(d)
            before[str(d)] = torch.cuda.memory_reserved(d)
        slot.engine = self.build(slot)
        if gpus:
            # Per GPU, what the load and the largest step left reserved beyond weights, KV and the runner's static
            # buffers: activations and the CUDA-graph pool (the estimate's workspace and pool terms).
            run_largest_step(slot.engine)
            reports = slot.engine.memory_by_device()
            self._workspace[slot.name] = {
                str(d): max(
                    0,
                    torch.cuda.memory_reserved(d)
                    - before[str(d)]
                    - reports[str(d)].weights
                    - reports[str(d)].kv
                    - reports[str(d)].graphs,
                )
                for d in gpus
            }

    def build(self, slot: Slot) -> Engine:
        """The slot's engine from its checkpoint, where its plan puts it (a bench overrides this to build random
        weights at a real shape; load's measuring stays the same)."""
        ckpt = open_checkpoint(slot.config.path)
        try:
            eos: tuple[int, ...] = tuple(Tokenizer.from_checkpoint(ckpt).eos_token_ids)
        except LlmhostError as e:  # token-id clients (Host.stream_tokens) need no tokenizer; text clients fail earlier
            log.warning("model '%s': no tokenizer (%s); it stops only at max_tokens or stop ids", slot.name, e)
            eos = ()
        return Engine.load(
            slot.config,
            slot.device_names[0],
            kv_tokens=slot.plan.kv_tokens,
            block_size=self.block_size,
            checkpoint=ckpt,
            eos_token_ids=eos,
            # the plan's stages on their devices: a model split across GPUs holds each stage's layers and KV there
            stages=LayerPlacement.from_plan(
                slot.plan.stages,
                {st.device: name for st, name in zip(slot.plan.stages, slot.device_names, strict=True)},
                ckpt.shape.num_layers,
            ),
        )

    def park(self, slot: Slot) -> int:
        engine: Engine = slot.engine
        self._kv_bytes[slot.name] = parking.kv_pool_bytes(engine)
        slot.parked = parking.park(engine, slot.parked)
        return int(slot.parked.nbytes)

    def unpark(self, slot: Slot) -> None:
        parking.unpark(slot.engine, slot.parked, self._kv_bytes[slot.name])

    def release(self, slot: Slot) -> None:
        slot.engine = None
        self._free()

    def drop_parked(self, slot: Slot) -> None:
        if slot.parked is not None:
            slot.parked.release()  # unpinned now, freed with the last reference
        slot.parked = None
        if slot.state == "parked":
            slot.engine = None  # a parked engine without its host copy has nothing to come back from
        self._free()

    def measure(self, slot: Slot) -> ByDevice:
        """Weights, KV and the decode runner's static buffers per device, from the tensors held there; workspace
        as the profile step at load measured it (0 on the CPU)."""
        engine: Engine = slot.engine
        reports = engine.memory_by_device()
        workspace = self._workspace.get(slot.name, {})
        out: ByDevice = {}
        for st, name in zip(slot.plan.stages, slot.device_names, strict=True):
            key = str(torch.device(name))
            r = reports[key]
            out[st.device] = {"weights": r.weights, "kv": r.kv, "workspace": workspace.get(key, 0), "graphs": r.graphs}
        return out

    def reading(self, device: int) -> Reading | None:
        return self.probe.reading(device)

    def can_park(self) -> bool:
        return self.inventory.has_gpus and self.inventory.source != "cpu"

    @staticmethod
    def _free() -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
