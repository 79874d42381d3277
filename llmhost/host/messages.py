"""Messages between the API process and the host-core process. Small, typed, picklable; never tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llmhost.engine.prompt_scores import PromptLogprob
from llmhost.engine.sampling_params import SamplingParams
from llmhost.engine.sequence import FinishReason
from llmhost.host.ledger import Reconciliation

ModelState = Literal["loading", "loaded", "parked", "unloaded", "failed"]

# -- API -> host ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submit:
    request_id: str
    model: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Query:
    """Ask for every model's status; answered with a StatusReply carrying the same query_id."""

    query_id: int


@dataclass(frozen=True)
class AdminCommand:
    query_id: int
    action: Literal["load", "unload"]
    model: str
    force: bool = False  # unload: abort the model's requests instead of letting them finish first


@dataclass(frozen=True)
class Shutdown:
    pass


ToHost = Submit | Abort | Query | AdminCommand | Shutdown

# -- host -> API ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: FinishReason | None
    # with the first token of a request that asked for them: each prompt token's (logprob, top), None for the first
    prompt_logprobs: list[PromptLogprob | None] | None = None


@dataclass(frozen=True)
class TokenBatch:
    """Every token of one loop iteration, sent together: one pickle per iteration, not one per token."""

    events: tuple[TokenEvent, ...]


@dataclass(frozen=True)
class RequestFailed:
    request_id: str
    kind: Literal["invalid", "model_not_found", "model_not_loaded", "queue_full", "internal"]
    message: str
    param: str | None = None


@dataclass(frozen=True)
class ModelStatus:
    name: str
    state: ModelState
    device: str  # "cuda:0", "cpu", or "" when not resident
    max_seq_len: int
    memory: dict[str, int] = field(default_factory=dict)  # bytes by kind: weights, kv, workspace, graphs
    since: float = 0.0  # wall-clock time the state began
    keep_alive_s: float = 0.0
    running: int = 0  # sequences in the batch
    waiting: int = 0  # sequences queued
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    error: str = ""  # why a load failed
    host_copy_bytes: int = 0  # pinned host RAM holding its weights (parked, or kept to park again without a copy)
    gpu_share: float = 0.0  # fraction of its device's measured GPU time it used since it became resident
    gpu_seconds: float = 0.0  # the GPU seconds it was charged since it became resident (the scheduler's figure)
    swaps_in: int = 0  # times it came back from pinned RAM
    last_swap_s: float | None = None  # seconds the last swap-in took
    unloading: bool = False  # an admin unload waits for the requests in the model to finish
    prefix_queried_tokens: int = 0  # prompt tokens the prefix cache looked up since the engine was built
    prefix_hit_tokens: int = 0  # of those, found cached (their K/V not computed again)


@dataclass(frozen=True)
class LoadRecord:
    """One load or swap-in and the ledger's reconciliation with the driver right after it, per device."""

    model: str
    action: Literal["load", "unpark"]
    seconds: float
    reconciliations: tuple[Reconciliation, ...]
    at: float = 0.0  # wall-clock time it ended


@dataclass(frozen=True)
class StatusReply:
    query_id: int  # 0 for an unsolicited update (a model finished loading, failed, was unloaded)
    models: tuple[ModelStatus, ...]
    ok: bool = True
    message: str = ""
    loads: tuple[LoadRecord, ...] = ()  # loads and swap-ins since the previous reply, oldest first


@dataclass(frozen=True)
class HostStopped:
    reason: str


FromHost = TokenBatch | RequestFailed | StatusReply | HostStopped
