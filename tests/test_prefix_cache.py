"""Prefix caching: a request that begins like an earlier one reuses its K/V blocks and computes only the rest, with
exactly the tokens it gets without the cache; blocks are shared read-only, named by a SHA-256 chain, handed out
again least recently used first, and never for requests that ask for prompt logprobs. Bookkeeping with fake
sequences, then real tiny models on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from engine_fixtures import VOCAB, TinyModels, tiny_models  # noqa: F401

from llmhost.config import ModelConfig
from llmhost.engine.block_manager import BlockManager
from llmhost.engine.engine import Engine
from llmhost.engine.sampling_params import SamplingParams
from llmhost.engine.sequence import Sequence

BS = 4


def seq(tokens: list[int], sid: str = "s", **params: Any) -> Sequence:
    return Sequence(sid, list(tokens), SamplingParams(**params), torch.Generator(), max_new_tokens=8)


def compute(bm: BlockManager, s: Sequence) -> None:
    """What the scheduler and engine do for a sequence that runs its whole prompt: match, cover, compute, collect."""
    bm.match_prefix(s)
    bm.cover(s, s.num_tokens)
    s.num_computed = s.num_tokens
    bm.register(s, s.num_computed)


# -- bookkeeping ----------------------------------------------------------------------------------------------------


def test_a_second_request_shares_the_full_blocks_of_the_same_beginning() -> None:
    bm = BlockManager(16, BS, prefix_cache=True)
    a = seq(list(range(10)))  # blocks [0-3] [4-7] and a partial [8, 9]
    compute(bm, a)
    assert bm.cache is not None and bm.cache.cached_count == 2
    b = seq([*range(8), 50, 51, 52], "b")  # the same two full blocks, then its own
    bm.match_prefix(b)
    assert b.block_table == a.block_table[:2] and b.num_computed == 8
    c = seq([0, 1, 2, 3, 9, 9, 9, 9, 9], "c")  # first block only
    bm.match_prefix(c)
    assert c.block_table == a.block_table[:1] and c.num_computed == 4
    d = seq([1, 0, 2, 3, 4, 5, 6, 7, 8], "d")  # same tokens, other order: nothing
    bm.match_prefix(d)
    assert d.block_table == [] and d.num_computed == 0


def test_the_last_token_is_always_computed_and_prompt_logprobs_skip_the_cache() -> None:
    bm = BlockManager(16, BS, prefix_cache=True)
    compute(bm, seq(list(range(8))))
    same = seq(list(range(8)), "same")  # wholly cached: its last block is left to compute (its logits sample)
    bm.match_prefix(same)
    assert same.num_computed == 4 and len(same.block_table) == 1
    scored = seq(list(range(8)), "scored", prompt_logprobs=0)
    bm.match_prefix(scored)
    assert scored.num_computed == 0 and scored.block_table == []


def test_released_blocks_stay_cached_as_free_and_go_least_recently_used_first() -> None:
    bm = BlockManager(4, BS, prefix_cache=True)
    a = seq(list(range(8)))
    compute(bm, a)
    bm.release(a)
    assert bm.free_count == 4 and bm.used_count == 0  # cached, unheld: free for anyone
    b = seq([7] * 8, "b")  # needs 2 blocks: the 2 never used before go first, nothing is evicted
    compute(bm, b)
    assert bm.cache is not None and bm.cache.cached_count == 4 and bm.free_count == 2
    bm.release(b)
    c = seq(list(range(4)) + [9] * 4, "c")
    bm.match_prefix(c)
    assert c.num_computed == 4, "a's first block outlived its second"
    bm.cover(c, 8)  # one more block: the least recently used unheld one is a's second (evicted, forgotten)
    assert bm.cache.cached_count == 3 and bm.free_count == 2  # b's two, unheld
    again = seq(list(range(8)), "again")
    bm.release(c)
    bm.match_prefix(again)
    assert again.num_computed == 4  # a's first block still named, its second was handed out


def test_a_shared_block_is_freed_only_when_its_last_holder_lets_go() -> None:
    bm = BlockManager(8, BS, prefix_cache=True)
    a = seq(list(range(9)))
    compute(bm, a)
    b = seq(list(range(9)), "b")
    compute(bm, b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert bm.used_count == 4  # two shared, one partial each
    bm.release(a)
    assert bm.used_count == 3
    bm.release(b)
    assert bm.used_count == 0 and bm.free_count == 8


def test_a_request_that_cannot_start_gives_back_what_it_matched_uncounted() -> None:
    bm = BlockManager(8, BS, prefix_cache=True)
    a = seq(list(range(12)))
    compute(bm, a)
    bm.release(a)
    assert bm.cache is not None
    counted = (bm.cache.queried_tokens, bm.cache.hit_tokens)
    b = seq(list(range(12)) + [5] * 20, "b")
    for _ in range(3):  # as the scheduler does while b waits for room, step after step
        bm.match_prefix(b)
        assert b.num_computed == 12 and bm.free_count == 5
        bm.unmatch_prefix(b)
        assert b.block_table == [] and b.num_computed == 0 and bm.free_count == 8
    assert (bm.cache.queried_tokens, bm.cache.hit_tokens) == counted


def test_block_names_are_a_sha256_chain_of_positions_and_tokens() -> None:
    bm = BlockManager(8, BS, prefix_cache=True)
    assert bm.cache is not None
    x = seq([1, 2, 3, 4, 5, 6, 7, 8])
    y = seq([9, 9, 9, 9, 5, 6, 7, 8], "y")
    nx, ny = bm.cache.names(x, 2)[:2], bm.cache.names(y, 2)[:2]
    assert len(nx[0]) == 32 and nx[0] != ny[0]
    assert nx[1] != ny[1], "the same tokens after another beginning are another block"


def test_no_cache_for_window_pools_or_when_off() -> None:
    from llmhost.engine.block_manager import WindowBlockManager

    assert BlockManager(8, BS, WindowBlockManager(8, BS, 8), prefix_cache=True).cache is None
    off = BlockManager(8, BS)
    s = seq(list(range(8)))
    compute(off, s)
    t = seq(list(range(8)), "t")
    off.match_prefix(t)
    assert t.num_computed == 0


# -- engines --------------------------------------------------------------------------------------------------------


def _engine(path: Path, kv_tokens: int | None = None, **overrides: Any) -> Engine:
    args: dict[str, Any] = dict(dtype="float32", max_seq_len=128, max_batch=4, prefill_chunk=64, cuda_graphs=False)
    args.update(overrides)
    return Engine.load(ModelConfig("tiny", path, **args), kv_tokens=kv_tokens)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _first_chunk_start(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[int, list[int]]:
    rid = engine.add_request(prompt, params)
    start: int | None = None
    out: list[int] = []
    while engine.has_work:
        plan = engine.schedule()
        if start is None:
            start = next(c.start for c in plan.chunks if c.seq_id == rid)
        engine.execute(plan)
        out += [o.token for o in engine.collect(plan) if o.seq_id == rid]
    assert start is not None
    return start, out


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_chat_turns_reuse_the_conversation_and_give_the_same_tokens(tiny_models: TinyModels, name: str) -> None:  # noqa: F811
    _, path = tiny_models(name)
    cached, plain = _engine(path), _engine(path, prefix_caching=False)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=12, temperature=0.8, seed=3, ignore_eos=True)
    system = _prompt(37, 1)
    turn1 = system + _prompt(5, 2)
    start, out1 = _first_chunk_start(cached, turn1, greedy)
    assert start == 0 and out1 == plain.generate([turn1], greedy)[0].output_ids
    # the next turn sends the conversation so far (its reply included) and more: all of it is found but the
    # partial last block
    turn2 = turn1 + out1 + _prompt(7, 3)
    start, out2 = _first_chunk_start(cached, turn2, seeded)
    assert start == (len(turn1) + len(out1)) // 16 * 16 > len(system)
    assert out2 == plain.generate([turn2], seeded)[0].output_ids
    # another user with the same system prompt: its full blocks only
    other = system + _prompt(9, 4)
    start, out3 = _first_chunk_start(cached, other, greedy)
    assert start == len(system) // 16 * 16 and out3 == plain.generate([other], greedy)[0].output_ids
    assert cached.blocks.cache is not None and cached.blocks.cache.hit_tokens > 0
    assert cached.blocks.used_count == 0 and not cached.has_work


def test_many_prompts_through_a_small_pool_evict_and_stay_correct(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("llama")
    # 10 blocks of 16: a few prompts' worth, so cached blocks are handed out again all the time
    cached, plain = _engine(path, max_seq_len=64, kv_tokens=160), _engine(path, max_seq_len=64, prefix_caching=False)
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    bases = [_prompt(33, 10 + i) for i in range(3)]
    prompts = [bases[i % 3] + _prompt(4, 100 + i) for i in range(12)]
    want = [c.output_ids for c in plain.generate(prompts, greedy)]
    for batch in range(0, 12, 4):
        got = [c.output_ids for c in cached.generate(prompts[batch : batch + 4], greedy)]
        assert got == want[batch : batch + 4]
    cache = cached.blocks.cache
    assert cache is not None and cache.hit_tokens > 0
    assert cached.blocks.free_count == cached.blocks.num_blocks


def test_a_preempted_sequence_resumes_after_its_cached_blocks(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("llama")
    prompts = [_prompt(n, 300 + n) for n in (10, 20, 14, 30)]
    params = [SamplingParams(max_tokens=40, temperature=0.0), SamplingParams(max_tokens=40, temperature=1.0, seed=3)]
    params = params * 2
    want = [c.output_ids for c in _engine(path, max_seq_len=64, prefix_caching=False).generate(prompts, params)]
    engine = _engine(path, max_seq_len=64, kv_tokens=65)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    preempted, resumed = 0, 0
    while engine.has_work:
        plan = engine.schedule()
        preempted += len(plan.preempted)
        resumed += sum(1 for c in plan.chunks if c.start > 0 and engine.seqs[c.seq_id].num_preemptions and
                       len(c.token_ids) > 1)  # fmt: skip
        engine.execute(plan)
        for o in engine.collect(plan):
            tokens[o.seq_id].append(o.token)
    assert preempted > 0 and resumed > 0, "some preempted sequence came back after its cached blocks"
    assert [tokens[i] for i in ids] == want
