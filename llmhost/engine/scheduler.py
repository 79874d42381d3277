"""Scheduler (the batcher): picks each step's tokens. `schedule() -> StepPlan` is plain data; only the runner
builds tensors from it.

Policy, per step (vLLM v1 style: one step = one forward pass over a flat token batch):
1. every running sequence that is decoding gets its one token (the budget always admits max_batch decodes);
2. running sequences still in prefill get the next chunk of their prompt, oldest first, within the token budget;
3. waiting sequences are admitted FIFO while the batch has room, the budget lasts and blocks are free.
When the KV pool runs out, the newest running sequence not yet scheduled this step is preempted: its blocks are
freed and it goes back to the front of the queue to be recomputed later. Nothing ever crashes for lack of blocks:
a single sequence always fits, because the pool holds at least one max_seq_len sequence (checked at start-up).

Models with sliding-window layers also draw on the window pool (block_manager.py), sized for max_batch windows.
Decodes always fit there; a prefill chunk reads the window before it plus itself, so it is shortened to what the
window pool holds now rather than preempting anyone for it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from llmhost.engine.block_manager import BlockManager
from llmhost.engine.sequence import SeqStatus, Sequence


@dataclass(frozen=True)
class Chunk:
    seq_id: str
    start: int  # position of the first token processed
    token_ids: tuple[int, ...]
    block_table: tuple[int, ...]  # covers start + len(token_ids) positions
    sample: bool  # the chunk ends at the sequence's last known token, so its next token is sampled
    window_table: tuple[int, ...] = ()  # window pool: logical blocks window_start.. covering what the chunk reads
    window_start: int = 0

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        """One token that samples: a decode row (a prompt's one-token last chunk counts too)."""
        return len(self.token_ids) == 1 and self.sample


@dataclass(frozen=True)
class StepPlan:
    chunks: tuple[Chunk, ...]
    preempted: tuple[str, ...] = ()
    prompt_only: bool = False  # scheduled with decodes=False: may run beside a decode step of the same engine
    graphed: bool = False  # its prompt chunks run as rows of the decode runner's graph (Engine.schedule)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def prompt_tokens(self) -> int:
        """Tokens of its chunks that are not decode rows."""
        return sum(len(c.token_ids) for c in self.chunks if not c.is_decode)

    @property
    def num_sampled(self) -> int:
        return sum(1 for c in self.chunks if c.sample)

    @property
    def empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch: int, token_budget: int) -> None:
        if token_budget < max_batch:
            raise ValueError("token_budget must admit one decode token per sequence of a full batch")
        self.blocks = blocks
        self.max_batch = max_batch
        self.token_budget = token_budget
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the newest

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, prefill_limit: int | None = None, decodes: bool = True, short: int = 0) -> StepPlan:
        """prefill_limit: at most this many prompt tokens beside the decode tokens (the host's cap, so that this
        model's prefill does not stall another model's decode for long); None: the token budget alone.
        decodes=False: a prompt-only step, beside a decode-only step (prefill_limit 0) of the same sequences'
        batch that may still be in flight: the decoding sequences are neither scheduled nor preempted; a
        prompt with a chunk in a step still in flight is left for later.
        short > 0 (prompts of at most this many tokens left ride decode steps, Engine.schedule; not those that
        asked for prompt logprobs): a decode step takes only those, whose earlier chunks are not in flight; a
        prompt-only step leaves them to the decode steps while any sequence decodes."""
        chunks: list[Chunk] = []
        preempted: list[str] = []
        # A sequence whose pending token is its last gets no more steps (it finishes when that token is read).
        decoding = [s for s in self.running if s.num_tokens - s.num_computed == 1 and not s.awaits_last_token]
        # A prompt-only step counts every sequence out of prefill as scheduled: never preempted for its chunks.
        scheduled: set[str] = set() if decodes else {s.id for s in self.running if not s.in_prefill}
        carriers = bool(decoding)  # decode steps to carry short prompts
        decoding = decoding if decodes else []
        budget = self.token_budget if prefill_limit is None else min(self.token_budget, len(decoding) + prefill_limit)
        prefilling = [s for s in self.running if s.in_prefill and self._eligible(s, decodes, short, carriers)]
        order = decoding + prefilling
        for i, seq in enumerate(order):
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = self._fit(seq, min(seq.num_tokens - seq.num_computed, budget), len(order) - i - 1)
            if n == 0:
                continue
            if not self._make_room(seq, seq.num_computed + n, scheduled, preempted):
                continue
            chunks.append(self._chunk(seq, n))
            scheduled.add(seq.id)
            budget -= n
        # Admitting new work in a step that had to preempt would only thrash the pool.
        while self.waiting and not preempted and len(self.running) < self.max_batch and budget > 0:
            seq = self.waiting[0]
            self.blocks.match_prefix(seq)
            n = self._fit(seq, min(seq.num_tokens - seq.num_computed, budget), 0)
            if not self._eligible(seq, decodes, short, carriers) or not self.blocks.can_cover(
                seq, seq.num_computed + n
            ):
                # Waiting, it holds nothing: cached blocks it matched stay free for the running sequences.
                self.blocks.unmatch_prefix(seq)
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            chunks.append(self._chunk(seq, n))
            scheduled.add(seq.id)
            budget -= n
        return StepPlan(tuple(chunks), tuple(preempted), prompt_only=not decodes)

    def _eligible(self, seq: Sequence, decodes: bool, short: int, others_decode: bool) -> bool:
        """Whether a prompt may get a chunk in this step (see schedule: `short`)."""
        if decodes and not short:
            return True  # Engine.step(): a step run ahead follows its chunk's step on one stream
        if seq.inflight:  # its last chunk's K/V may not be written yet on this step's stream
            return False
        if not short:
            return True
        # A prompt that asked for its logprobs is scored by the eager prefill: never carried.
        rides = seq.num_tokens - seq.num_computed <= short and seq.params.prompt_logprobs is None
        return rides if decodes else not rides or not others_decode

    def _fit(self, seq: Sequence, n: int, pending: int) -> int:
        """Shorten a chunk to what the window pool holds now, leaving one block for each of the `pending` running
        sequences still to be scheduled this step (one more token needs at most one more block); never below one
        token (one that does not fit makes room by preemption like any other)."""
        room = self.blocks.window_room(seq, pending)
        return n if room is None or n == 0 else max(1, min(n, room))

    def _chunk(self, seq: Sequence, n: int) -> Chunk:
        start = seq.num_computed
        self.blocks.cover(seq, start + n)
        return Chunk(
            seq_id=seq.id,
            start=start,
            token_ids=tuple(seq.token_ids(start, start + n)),
            block_table=tuple(seq.block_table),
            sample=start + n == seq.num_tokens,
            window_table=tuple(seq.window_table),
            window_start=seq.window_start,
        )

    def _make_room(self, seq: Sequence, tokens: int, scheduled: set[str], preempted: list[str]) -> bool:
        """Preempt the newest unscheduled sequences until `seq` can cover `tokens`; preempt `seq` itself last."""
        while not self.blocks.can_cover(seq, tokens):
            victims = [s for s in self.running if s.id not in scheduled and s is not seq]
            victim = victims[-1] if victims else seq
            self._preempt(victim)
            preempted.append(victim.id)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        self.running.remove(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def advance(self, plan: StepPlan) -> None:
        """After the step ran: its tokens' K/V are now cached."""
        by_id = {s.id: s for s in self.running}
        for c in plan.chunks:
            seq = by_id.get(c.seq_id)
            if seq is not None:
                seq.num_computed = c.end
                self.blocks.advanced(seq)

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence wherever it is."""
        self.blocks.release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
