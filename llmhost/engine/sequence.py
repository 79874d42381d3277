"""Sequence: one request's tokens and progress through the engine. Plain Python; no tensors but its generator."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

import torch

from llmhost.engine.sampling_params import SamplingParams

FinishReason = Literal["stop", "length", "abort"]

PENDING_TOKEN = -1  # a token id in a chunk whose value is still on the device (Sequence.pending)


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # not started, or preempted (its KV was dropped and will be recomputed)
    RUNNING = "running"  # holds KV blocks; gets tokens every step it is scheduled
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator  # this request's own random stream: batching never changes its draws
    max_new_tokens: int  # params.max_tokens capped by max_seq_len - prompt length
    arrival: float = 0.0
    output_ids: list[int] = field(default_factory=list)
    # Tokens sampled on the device but not yet read back (0 or 1): the engine scheduled and launched the next
    # step before reading this one's tokens (engine.py, "running ahead"); position num_tokens - 1 is then one.
    pending: int = 0
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)  # full pool: logical block i -> physical block
    # Window pool (sliding-window layers): window_table[j] holds logical block window_start + j; blocks before
    # the window of the next token have been released (see block_manager.py).
    window_table: list[int] = field(default_factory=list)
    window_start: int = 0
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    # prompt position -> its token's logprob and top tokens, for a request with params.prompt_logprobs
    prompt_scores: dict[int, tuple[float, list[tuple[int, float]]]] = field(default_factory=dict)
    block_hashes: list[bytes] = field(default_factory=list)  # names of its first full blocks (prefix_cache.py)
    blocks_named: int = 0  # blocks of its table the prefix cache has looked at
    # Steps launched with a chunk of it and not yet collected: they may still write its K/V, so blocks it lets go
    # of meanwhile (it finished, was aborted or preempted) are held back until they are collected (block_manager.py)
    inflight: int = 0
    held_blocks: list[int] = field(default_factory=list)
    held_window_blocks: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + self.pending

    @property
    def in_prefill(self) -> bool:
        """More than one token still to compute: its prompt (or, after preemption, its recompute) is not done."""
        return self.num_tokens - self.num_computed > 1

    @property
    def awaits_last_token(self) -> bool:
        """Its pending token is its last by length: nothing more to schedule."""
        return self.pending > 0 and len(self.output_ids) + self.pending >= self.max_new_tokens

    def token_ids(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end) of prompt + output; PENDING_TOKEN where the token is pending."""
        known = len(self.prompt_ids) + len(self.output_ids)
        if end > known:
            return self.token_ids(start, known) + [PENDING_TOKEN] * (end - max(start, known))
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p : end - p]
        return self.prompt_ids[start:] + self.output_ids[: end - p]

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
