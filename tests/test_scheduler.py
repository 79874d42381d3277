"""Scheduler and BlockManager as pure logic: fake sequences, no model. A simulated model appends one token per
sampled chunk, which is all the scheduler sees of a forward pass."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmhost.engine.block_manager import BlockManager, blocks_for
from llmhost.engine.sampling_params import SamplingParams
from llmhost.engine.scheduler import Scheduler, StepPlan
from llmhost.engine.sequence import SeqStatus, Sequence

_ids = itertools.count()


def make_seq(prompt_len: int, max_new: int = 4, name: str | None = None) -> Sequence:
    return Sequence(
        id=name or f"s{next(_ids)}",
        prompt_ids=[(7 * i) % 100 for i in range(prompt_len)],
        params=SamplingParams(max_tokens=max_new, temperature=0.0),
        generator=torch.Generator(),
        max_new_tokens=max_new,
    )


def make_scheduler(num_blocks: int, block_size: int = 4, max_batch: int = 4, budget: int = 8) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), max_batch, budget)


def run_model(sched: Scheduler, plan: StepPlan, seqs: Iterable[Sequence]) -> list[Sequence]:
    """What the engine does after a forward pass: mark the KV computed, append a token to each sampled sequence,
    finish the ones that reached max_new_tokens. Returns the finished ones."""
    by_id = {s.id: s for s in seqs}
    sched.advance(plan)
    finished = []
    for c in plan.chunks:
        if c.sample:
            seq = by_id[c.seq_id]
            seq.output_ids.append(len(seq.output_ids) % 5)
            if len(seq.output_ids) >= seq.max_new_tokens:
                sched.finish(seq)
                finished.append(seq)
    return finished


def step(sched: Scheduler, seqs: Iterable[Sequence]) -> StepPlan:
    seqs = list(seqs)
    plan = checked_schedule(sched, seqs)
    run_model(sched, plan, seqs)
    check_invariants(sched, seqs)
    return plan


def checked_schedule(sched: Scheduler, seqs: list[Sequence]) -> StepPlan:
    """schedule(), checking the plan against the policy in scheduler.py's docstring."""
    running_before = list(sched.running)
    waiting_before = list(sched.waiting)
    decoding_before = [s for s in running_before if s.num_tokens - s.num_computed == 1]
    computed_before = {s.id: s.num_computed for s in seqs}
    plan = sched.schedule()
    bs = sched.blocks.block_size
    chunk_of = {c.seq_id: c for c in plan.chunks}
    by_id = {s.id: s for s in seqs}
    assert len(chunk_of) == len(plan.chunks), "a sequence got two chunks in one step"
    assert plan.num_tokens <= sched.token_budget
    assert len(plan.chunks) <= sched.max_batch
    assert len(sched.running) <= sched.max_batch
    for c in plan.chunks:
        seq = by_id[c.seq_id]
        assert seq.status is SeqStatus.RUNNING and seq in sched.running
        assert c.token_ids and c.start == computed_before[seq.id]
        assert list(c.token_ids) == seq.token_ids(c.start, c.end)
        assert c.sample == (c.end == seq.num_tokens)
        assert len(c.block_table) * bs >= c.end and list(c.block_table) == seq.block_table
    # Every decode gets its one token unless it was preempted to make room.
    for seq in decoding_before:
        if seq.id in plan.preempted:
            assert seq.id not in chunk_of
        else:
            assert len(chunk_of[seq.id].token_ids) == 1
    # Preempted sequences are at the front of the queue, the last preempted first, with nothing cached.
    assert [s.id for s in list(sched.waiting)[: len(plan.preempted)]] == list(reversed(plan.preempted))
    for sid in plan.preempted:
        seq = by_id[sid]
        assert seq.status is SeqStatus.WAITING and seq.num_computed == 0 and seq.block_table == []
    # Admission is FIFO, and a step that preempted admits nothing.
    admitted = [s for s in waiting_before if s.id in chunk_of]
    assert admitted == waiting_before[: len(admitted)]
    if plan.preempted:
        assert not admitted
    return plan


def check_invariants(sched: Scheduler, seqs: Iterable[Sequence]) -> None:
    bm = sched.blocks
    held = [b for s in seqs for b in s.block_table]
    assert len(held) == len(set(held)), "a block is in two tables"
    assert all(0 <= b < bm.num_blocks for b in held)
    assert bm.free_count + len(held) == bm.num_blocks
    assert bm.used_count == len(held)
    for s in seqs:
        if s.status is SeqStatus.RUNNING:
            assert s in sched.running and len(s.block_table) * bm.block_size >= s.num_computed
        else:
            assert s.block_table == [] and s not in sched.running
    # A sequence not yet added is WAITING too, so membership is checked from the queues' side.
    assert all(s.status is SeqStatus.RUNNING for s in sched.running)
    assert all(s.status is SeqStatus.WAITING for s in sched.waiting)
    assert len({id(s) for s in [*sched.running, *sched.waiting]}) == len(sched.running) + len(sched.waiting)


def run_to_completion(sched: Scheduler, seqs: list[Sequence], max_steps: int = 10_000) -> list[StepPlan]:
    plans: list[StepPlan] = []
    while sched.has_work:
        assert len(plans) < max_steps, "the scheduler does not finish its work"
        plans.append(step(sched, seqs))
    assert all(s.finished and len(s.output_ids) == s.max_new_tokens for s in seqs)
    assert sched.blocks.free_count == sched.blocks.num_blocks
    return plans


# -- BlockManager -------------------------------------------------------------------------------------------------


def test_blocks_for_rounds_up() -> None:
    assert [blocks_for(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_block_manager_covers_and_releases() -> None:
    bm = BlockManager(5, 4)
    a, b = make_seq(3), make_seq(3)
    assert bm.extra_blocks(a, 9) == 3 and bm.can_cover(a, 9)
    bm.cover(a, 9)
    assert len(a.block_table) == 3 and bm.free_count == 2
    bm.cover(a, 12)  # still within the third block
    assert len(a.block_table) == 3
    assert not bm.can_cover(b, 12)
    with pytest.raises(RuntimeError, match="exhausted"):
        bm.cover(b, 12)
    assert b.block_table == [] and bm.free_count == 2  # a failed cover takes nothing
    bm.release(a)
    bm.release(a)  # twice is safe
    assert a.block_table == [] and bm.free_count == 5
    bm.cover(b, 20)
    assert sorted(b.block_table) == [0, 1, 2, 3, 4]


# -- Scheduler policy ---------------------------------------------------------------------------------------------


def test_budget_below_max_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="token_budget"):
        make_scheduler(8, max_batch=4, budget=3)


def test_prompt_is_chunked_by_the_token_budget() -> None:
    sched = make_scheduler(20, block_size=4, budget=8)
    seq = make_seq(37, max_new=2)
    sched.add(seq)
    plans = run_to_completion(sched, [seq])
    chunks = [(c.start, len(c.token_ids), c.sample) for p in plans for c in p.chunks]
    assert chunks == [(0, 8, False), (8, 8, False), (16, 8, False), (24, 8, False), (32, 5, True), (37, 1, True)]
    assert [len(p.chunks[0].block_table) for p in plans] == [2, 4, 6, 8, 10, 10]


def test_decodes_always_fit_and_prefill_takes_the_rest() -> None:
    sched = make_scheduler(64, block_size=4, max_batch=4, budget=4)  # the smallest budget a batch of 4 allows
    decoders = [make_seq(1, max_new=20) for _ in range(3)]
    for s in decoders:
        sched.add(s)
    long = make_seq(30, max_new=2)
    seqs = [*decoders, long]
    step(sched, seqs)  # the three one-token prompts are prefilled and sample
    sched.add(long)
    for _ in range(10):
        plan = step(sched, seqs)
        assert {c.seq_id: len(c.token_ids) for c in plan.chunks} == {**{s.id: 1 for s in decoders}, long.id: 1}
    run_to_completion(sched, seqs)


def test_max_batch_is_respected() -> None:
    sched = make_scheduler(100, max_batch=3, budget=16)
    seqs = [make_seq(5, max_new=3) for _ in range(10)]
    for s in seqs:
        sched.add(s)
    plans = run_to_completion(sched, seqs)
    assert max(len(p.chunks) for p in plans) == 3


def test_admission_is_fifo() -> None:
    sched = make_scheduler(100, max_batch=2, budget=8)
    seqs = [make_seq(n, max_new=2) for n in (6, 1, 9, 2, 5, 3)]
    for s in seqs:
        sched.add(s)
    plans = run_to_completion(sched, seqs)
    first_seen: list[str] = []
    for p in plans:
        first_seen += [c.seq_id for c in p.chunks if c.seq_id not in first_seen]
    assert first_seen == [s.id for s in seqs]


def test_head_of_queue_that_does_not_fit_blocks_later_ones() -> None:
    sched = make_scheduler(4, block_size=4, max_batch=4, budget=16)
    hog, big, small = make_seq(11, max_new=3), make_seq(8, max_new=1), make_seq(1, max_new=1)
    seqs = [hog, big, small]
    sched.add(hog)
    step(sched, seqs)  # hog holds 3 of 4 blocks, enough for its first decode
    sched.add(big)
    sched.add(small)
    plan = step(sched, seqs)  # big needs 2 blocks; small would fit in the free one but must not overtake big
    assert [c.seq_id for c in plan.chunks] == [hog.id]
    assert list(sched.waiting) == [big, small]
    run_to_completion(sched, seqs)


def test_preemption_picks_the_newest_unscheduled_and_requeues_it_first() -> None:
    sched = make_scheduler(5, block_size=4, max_batch=4, budget=16)
    a, b, c, d = (make_seq(4, max_new=5, name=n) for n in "abcd")
    seqs = [a, b, c, d]
    for s in seqs:
        sched.add(s)
    step(sched, seqs)  # each prefilled 4 tokens into one block and sampled one: the next decode needs a new block
    assert sched.blocks.free_count == 1
    e = make_seq(2, name="e")
    sched.add(e)
    seqs.append(e)
    plan = step(sched, seqs)
    # a takes the free block; b needs one, so d (the newest not yet scheduled, c is older) gives up its block; c
    # then needs one and only itself is left unscheduled.
    assert [ch.seq_id for ch in plan.chunks] == ["a", "b"]
    assert plan.preempted == ("d", "c")
    assert list(sched.waiting) == [c, d, e]  # the preempted go first, in their old order; e is not admitted
    assert (c.num_preemptions, d.num_preemptions) == (1, 1)
    assert d.output_ids == [0]  # its sampled token is kept and will be recomputed with the prompt
    run_to_completion(sched, seqs)


def test_a_sequence_preempts_itself_when_no_other_can_give_way() -> None:
    sched = make_scheduler(3, block_size=4, max_batch=2, budget=8)
    a, b = make_seq(4, max_new=3, name="a"), make_seq(12, max_new=1, name="b")
    seqs = [a, b]
    sched.add(a)
    sched.add(b)
    first = step(sched, seqs)  # a: 4 tokens (1 block); b: the first 4 of its prompt (1 block)
    assert [(ch.seq_id, len(ch.token_ids)) for ch in first.chunks] == [("a", 4), ("b", 4)]
    plan = step(sched, seqs)  # a's decode takes the last block; b's next chunk cannot be covered
    assert [ch.seq_id for ch in plan.chunks] == ["a"]
    assert plan.preempted == ("b",)
    assert list(sched.waiting) == [b] and b.num_computed == 0
    run_to_completion(sched, seqs)


def test_finish_releases_a_sequence_wherever_it_is() -> None:
    sched = make_scheduler(10, max_batch=1)
    running, queued = make_seq(6), make_seq(6)
    sched.add(running)
    sched.add(queued)
    step(sched, [running, queued])
    sched.finish(queued)
    sched.finish(running)
    assert not sched.has_work and sched.blocks.free_count == 10
    assert running.finished and queued.finished
    assert sched.schedule().empty


# -- random workloads ---------------------------------------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 12)),
        st.tuples(st.just("step"), st.just(0), st.just(0)),
        st.tuples(st.just("abort"), st.integers(0, 1000), st.just(0)),
    ),
    max_size=80,
)


@settings(max_examples=60, deadline=None)
@given(
    ops=ops,
    block_size=st.sampled_from([1, 4, 16]),
    max_batch=st.integers(1, 5),
    extra_budget=st.integers(0, 20),
    extra_blocks=st.integers(0, 6),
)
def test_block_accounting_holds_under_random_operations(
    ops: list[tuple[str, int, int]], block_size: int, max_batch: int, extra_budget: int, extra_blocks: int
) -> None:
    max_seq_len = 52  # the longest prompt (40) plus the most new tokens (12)
    num_blocks = blocks_for(max_seq_len, block_size) + extra_blocks
    sched = make_scheduler(num_blocks, block_size, max_batch, max_batch + extra_budget)
    seqs: list[Sequence] = []
    for op, x, y in ops:
        if op == "add":
            seq = make_seq(x, max_new=y)
            seqs.append(seq)
            sched.add(seq)
        elif op == "step":
            step(sched, seqs)
        else:
            live = [s for s in seqs if not s.finished]
            if live:
                sched.finish(live[x % len(live)])
        check_invariants(sched, seqs)
    while sched.has_work:
        step(sched, seqs)
    assert sched.blocks.free_count == sched.blocks.num_blocks


@settings(max_examples=60, deadline=None)
@given(
    workload=st.lists(st.tuples(st.integers(0, 30), st.integers(1, 63), st.integers(1, 40)), min_size=1, max_size=12),
    block_size=st.sampled_from([1, 4, 16]),
    max_batch=st.integers(1, 6),
    extra_budget=st.integers(0, 30),
    extra_blocks=st.integers(0, 8),
)
def test_random_workload_always_completes(
    workload: list[tuple[int, int, int]], block_size: int, max_batch: int, extra_budget: int, extra_blocks: int
) -> None:
    """Arrivals at random steps, prompts up to max_seq_len - 1, a pool from one max_seq_len sequence up: every
    sequence gets all its tokens and every block comes back, however often the pool forces preemption."""
    max_seq_len = 64
    num_blocks = blocks_for(max_seq_len, block_size) + extra_blocks
    sched = make_scheduler(num_blocks, block_size, max_batch, max_batch + extra_budget)
    arrivals = sorted(
        ((at, make_seq(prompt, max_new=min(new, max_seq_len - prompt))) for at, prompt, new in workload),
        key=lambda a: a[0],
    )
    seqs = [s for _, s in arrivals]
    steps = 0
    pending = list(arrivals)
    while pending or sched.has_work:
        while pending and pending[0][0] <= steps:
            sched.add(pending.pop(0)[1])
        step(sched, seqs)
        steps += 1
        assert steps < 20_000, "the scheduler does not finish its work"
    assert all(s.finished and len(s.output_ids) == s.max_new_tokens for s in seqs)
    assert sched.blocks.free_count == sched.blocks.num_blocks


def test_decode_and_prompt_steps_split_between_two_plans_in_flight() -> None:
    """The host on a GPU: a decode-only step (prefill_limit 0) and a prompt-only step (decodes=False) of one
    engine in flight at once. Neither takes the other's sequences, the prompt step never preempts a decoding
    sequence, and after both ran every sequence moved on by what its plan gave it."""
    sched = make_scheduler(num_blocks=12, budget=16)
    a, b = make_seq(3, max_new=8), make_seq(3, max_new=8)
    for s in (a, b):
        sched.add(s)
    run_model(sched, sched.schedule(), [a, b])  # both prompts done: a and b decode from now on
    c = make_seq(10, max_new=2)
    sched.add(c)
    decode = sched.schedule(prefill_limit=0)
    assert {ch.seq_id for ch in decode.chunks} == {a.id, b.id} and not decode.prompt_only
    prompt = sched.schedule(prefill_limit=6, decodes=False)
    assert prompt.prompt_only and [(ch.seq_id, len(ch.token_ids)) for ch in prompt.chunks] == [(c.id, 6)]
    run_model(sched, prompt, [a, b, c])  # the prompt step ends first: its sequence stays in prefill
    run_model(sched, decode, [a, b, c])
    assert [len(s.output_ids) for s in (a, b, c)] == [2, 2, 0]
    assert c.num_computed == 6


def test_a_prompt_only_step_never_preempts_a_decoding_sequence() -> None:
    """A prompt needing more blocks than are free preempts the newest other sequence, in a step that schedules
    decodes too; in a prompt-only step the decoding ones may be in flight beside it, so it gives way itself."""
    sched = make_scheduler(num_blocks=4, block_size=4, budget=16)
    a = make_seq(4, max_new=8)
    sched.add(a)
    run_model(sched, sched.schedule(), [a])  # a decodes from now on, holding 1 block
    b = make_seq(16, max_new=2)
    sched.add(b)
    run_model(sched, sched.schedule(prefill_limit=4, decodes=False), [a, b])  # b: 4 of 16 prompt tokens, 1 block
    prompt = sched.schedule(decodes=False)  # b's other 12 tokens need 3 blocks; 2 are free
    assert a.status is SeqStatus.RUNNING and a.id not in prompt.preempted
    assert prompt.preempted == (b.id,) and not prompt.chunks
