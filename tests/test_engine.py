"""Engine: parity with transformers (CPU, fp32) on tiny random Llama, Mistral, Qwen2 and Qwen3 checkpoints, and the
engine's promises: batching, chunked prefill and preemption never change a sequence's tokens; seeded sampling is
reproducible alone and batched; stops, limits and aborts end requests and free their blocks; bad input raises a
typed error and allocates nothing; the memory report matches the planner's estimate."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_fixtures import LLAMA3_ROPE, MODEL_NAMES, VOCAB, TinyModels, tiny_models  # noqa: F401
from safetensors.torch import load_file, save_file

from llmhost.config import ModelConfig
from llmhost.engine.attention import AttentionBatch, ChunkMeta
from llmhost.engine.block_manager import blocks_for
from llmhost.engine.engine import Engine, TokenOutput
from llmhost.engine.kv_cache import KVCache
from llmhost.engine.model import LlamaModel
from llmhost.engine.rope import inv_frequencies
from llmhost.engine.sampling_params import SamplingParams
from llmhost.engine.scheduler import Chunk, StepPlan
from llmhost.engine.sequence import FinishReason
from llmhost.engine.sequence import Sequence as Seq
from llmhost.errors import LlmhostError, ModelFileError, PromptTooLongError, RequestError, UnsupportedModelError
from llmhost.memory.estimate import ModelSpec, default_kv_tokens, step_tokens, whole_need
from llmhost.model_files import open_checkpoint

ATOL = 1e-4  # fp32 logits and logprobs against transformers
BLOCK = 16  # Engine.load's default block size


# -- helpers ------------------------------------------------------------------------------------------------------


def model_config(path: Path, **overrides: Any) -> ModelConfig:
    args: dict[str, Any] = dict(dtype="float32", max_seq_len=128, max_batch=4, prefill_chunk=64, cuda_graphs=False)
    args.update(overrides)
    return ModelConfig("tiny", path, **args)


def load(path: Path, kv_tokens: int | None = None, eos_token_ids: Sequence[int] = (), **overrides: Any) -> Engine:
    return Engine.load(model_config(path, **overrides), kv_tokens=kv_tokens, eos_token_ids=eos_token_ids)


def random_prompt(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (length,), generator=g).tolist()


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def seeded(max_tokens: int, seed: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, **kw)


def hf_greedy(hf: Any, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy continuation and its raw logits per generated step: [n, vocab]."""
    out = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=n,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    assert len(tokens) == n  # no EOS is configured, so generate() never stops early
    return tokens, torch.stack(out.logits)[:, 0].float()


def hf_logits(hf: Any, ids: list[int]) -> torch.Tensor:
    """[T, vocab] logits of every position."""
    with torch.no_grad():
        logits: torch.Tensor = hf(torch.tensor([ids])).logits[0].float()
    return logits


def paged_logits(model: LlamaModel, sequences: list[list[int]], chunk: int) -> list[torch.Tensor]:
    """Run `sequences` through `model.forward` together, `chunk` tokens of each per forward pass, on a fresh KV
    pool whose blocks are handed out in shuffled order; return each sequence's logits at every position."""
    need = [blocks_for(len(s), BLOCK) for s in sequences]
    cache = KVCache(model.shape, sum(need), BLOCK, model.dtype, model.device)
    order = torch.randperm(sum(need), generator=torch.Generator().manual_seed(0)).tolist()
    tables = [order[sum(need[:i]) : sum(need[: i + 1])] for i in range(len(sequences))]
    done = [0] * len(sequences)
    pieces: list[list[torch.Tensor]] = [[] for _ in sequences]
    while any(d < len(s) for d, s in zip(done, sequences, strict=True)):
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        metas: list[ChunkMeta] = []
        owners: list[tuple[int, int, int]] = []  # sequence, first row, rows
        for i, s in enumerate(sequences):
            start, end = done[i], min(len(s), done[i] + chunk)
            if start == end:
                continue
            owners.append((i, len(ids), end - start))
            metas.append(ChunkMeta(len(ids), end - start, end, torch.tensor(tables[i][: blocks_for(end, BLOCK)])))
            ids += s[start:end]
            positions += range(start, end)
            slots += [tables[i][p // BLOCK] * BLOCK + p % BLOCK for p in range(start, end)]
            done[i] = end
        logits = model.forward(
            torch.tensor(ids),
            torch.tensor(positions),
            AttentionBatch(torch.tensor(slots), tuple(metas)),
            cache,
            torch.arange(len(ids)),
        )
        for i, row, n in owners:
            pieces[i].append(logits[row : row + n])
    return [torch.cat(p) for p in pieces]


@dataclass
class Run:
    """What driving an engine through the step contract produced, per request in the order added."""

    tokens: list[list[int]]
    reasons: list[FinishReason]
    seqs: list[Seq]
    plans: list[StepPlan] = field(default_factory=list)

    @property
    def preempted(self) -> int:
        return sum(len(p.preempted) for p in self.plans)


def drive(engine: Engine, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> Run:
    """Add the requests, then schedule/execute/collect until no work is left, checking every plan's limits."""
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    seqs = [engine.seqs[i] for i in ids]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    reasons: dict[str, FinishReason] = {}
    plans: list[StepPlan] = []
    budget = step_tokens(engine.config)
    while engine.has_work:
        assert len(plans) < 5000, "the engine does not finish"
        plan = engine.schedule()
        assert plan.num_tokens <= budget
        assert len(plan.chunks) <= engine.config.max_batch
        engine.execute(plan)
        for out in engine.collect(plan):
            assert out.seq_id not in reasons  # nothing after a sequence finished
            tokens[out.seq_id].append(out.token)
            if out.finish_reason is not None:
                reasons[out.seq_id] = out.finish_reason
        plans.append(plan)
    assert_all_free(engine)
    return Run([tokens[i] for i in ids], [reasons[i] for i in ids], seqs, plans)


def alone(engine: Engine, prompt: list[int], params: SamplingParams) -> list[int]:
    tokens: list[int] = engine.generate([prompt], params)[0].output_ids
    return tokens


def assert_all_free(engine: Engine) -> None:
    assert engine.blocks.free_count == engine.blocks.num_blocks
    assert not engine.has_work
    assert engine.seqs == {}


# -- parity with transformers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_greedy_tokens_and_logprobs_match_transformers(tiny_models: TinyModels, name: str) -> None:  # noqa: F811
    hf, path = tiny_models(name)
    # 80 + 32 positions: past llama31's original context (64), where its rope scaling matters most.
    prompt = random_prompt(80, seed=1)
    want, logits = hf_greedy(hf, prompt, 32)
    ref = torch.log_softmax(logits, dim=-1)  # [32, vocab]
    engine = load(path, prefill_chunk=128)
    outs = list(engine.stream(prompt, greedy(32, logprobs=5)))
    assert [o.token for o in outs] == want
    assert [o.finish_reason for o in outs] == [None] * 31 + ["length"]
    for step, o in enumerate(outs):
        assert o.logprob is not None and o.top_logprobs is not None
        assert o.logprob == pytest.approx(ref[step, o.token].item(), abs=ATOL)
        top_ids = [t for t, _ in o.top_logprobs]
        top_values = [v for _, v in o.top_logprobs]
        assert len(top_ids) == 5 and top_ids[0] == o.token
        assert top_values == sorted(top_values, reverse=True)
        assert top_values == pytest.approx(ref[step, top_ids].tolist(), abs=ATOL)
        # The five are transformers' top five (up to the order of near-ties).
        assert top_values[-1] >= ref[step].topk(5).values[-1].item() - ATOL
    assert_all_free(engine)


@pytest.mark.parametrize("chunk", [512, 5], ids=["whole", "chunked"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_logits_match_transformers(tiny_models: TinyModels, name: str, chunk: int) -> None:  # noqa: F811
    """Every position's logits, for sequences run together in one flat batch over a shuffled paged pool, whole or
    in chunks that attend to the KV cached by earlier ones."""
    hf, path = tiny_models(name)
    engine = load(path, max_seq_len=256)
    sequences = [random_prompt(n, seed=n) for n in (200, 37, 1, 64)]
    got = paged_logits(engine.model, sequences, chunk)
    for s, logits in zip(sequences, got, strict=True):
        torch.testing.assert_close(logits, hf_logits(hf, s), atol=ATOL, rtol=0)


def test_llama3_rope_frequencies_match_transformers(tiny_models: TinyModels) -> None:  # noqa: F811
    hf, path = tiny_models("llama31")
    engine = load(path)
    shape = engine.model.shape
    assert shape.rope_scaling is not None and shape.rope_scaling["rope_type"] == "llama3"
    torch.testing.assert_close(engine.model.inv_freq, hf.model.rotary_emb.inv_freq.float(), atol=0, rtol=1e-6)
    plain = inv_frequencies(shape.head_dim, LLAMA3_ROPE["rope_theta"], None)
    # head_dim 16, theta 1e4: wavelengths 6.3, 20, 63, 199, ... against the bands' edges 64 / 4 = 16 and 64 / 1.
    inv = engine.model.inv_freq
    assert inv[0] == plain[0]  # shorter than 16: kept
    assert torch.all(inv[1:3] < plain[1:3]) and torch.all(inv[1:3] > plain[1:3] / 8)  # between: interpolated
    torch.testing.assert_close(inv[3:], plain[3:] / 8, atol=0, rtol=1e-6)  # longer than 64: slowed by factor 8


# -- batching, chunked prefill, preemption -----------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_batch_gives_each_sequence_its_tokens_alone(tiny_models: TinyModels, name: str) -> None:  # noqa: F811
    _, path = tiny_models(name)
    engine = load(path)
    prompts = [random_prompt(n, seed=100 + n) for n in (3, 29, 11, 50)]
    params = [greedy(24), greedy(8), seeded(30, seed=5), greedy(16)]
    solo = [alone(engine, p, sp) for p, sp in zip(prompts, params, strict=True)]
    run = drive(engine, prompts, params)
    assert run.tokens == solo
    assert run.reasons == ["length"] * 4
    assert len(run.plans[0].chunks) == 4  # they really ran together


def test_chunked_prefill_gives_the_same_tokens(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("qwen3")
    prompts = [random_prompt(13, seed=200 + i) for i in range(4)]
    params = [greedy(12), seeded(12, seed=1), greedy(5), seeded(9, seed=2, top_k=20)]
    small = drive(load(path, prefill_chunk=4), prompts, params)
    large = drive(load(path, prefill_chunk=64), prompts, params)
    assert small.tokens == large.tokens
    assert all(p.num_tokens <= 4 for p in small.plans)
    # The first prompt went in four pieces (4 + 4 + 4 + 1), only the last of them sampling.
    first = [c for p in small.plans for c in p.chunks if c.seq_id == small.seqs[0].id and c.start < 13]
    pieces = [(c.start, len(c.token_ids), c.sample) for c in first]
    assert pieces == [(0, 4, False), (4, 4, False), (8, 4, False), (12, 1, True)]
    assert len(large.plans[0].chunks) == 4 and large.plans[0].num_tokens == 52


def test_preemption_gives_the_same_tokens(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("llama")
    prompts = [random_prompt(n, seed=300 + n) for n in (10, 20, 14, 30)]
    params = [greedy(40), seeded(40, seed=3), greedy(40), seeded(40, seed=4, top_p=0.9)]
    reference = load(path, max_seq_len=64)
    solo = [alone(reference, p, sp) for p, sp in zip(prompts, params, strict=True)]
    # 65 tokens -> 5 blocks of 16: one sequence of max_seq_len fits, four growing ones do not.
    engine = load(path, max_seq_len=64, kv_tokens=65)
    assert engine.blocks.num_blocks == 5
    run = drive(engine, prompts, params)
    assert run.preempted > 0
    assert sum(s.num_preemptions for s in run.seqs) == run.preempted
    assert run.tokens == solo
    # max_tokens 40 is capped by max_seq_len 64 for the longer prompts.
    assert [len(t) for t in run.tokens] == [40, 40, 40, 34]


def test_preempted_sequence_recomputes_prompt_and_output(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("mistral")
    # Without the prefix cache: with it, a preempted sequence resumes after its blocks still cached
    # (test_prefix_cache.py).
    engine = load(path, max_seq_len=64, kv_tokens=65, prefill_chunk=8, prefix_caching=False)
    prompts = [random_prompt(12, seed=7 + i) for i in range(4)]
    run = drive(engine, prompts, [greedy(45)] * 4)
    assert run.preempted > 0
    # Each sequence's chunks, split where it was preempted: after a preemption it starts over at position 0 and
    # refills its cache contiguously up to its last known token (past the prompt: its generated tokens are
    # recomputed too), and only then samples again.
    segments: dict[str, list[list[Chunk]]] = {s.id: [[]] for s in run.seqs}
    for plan in run.plans:
        for c in plan.chunks:
            segments[c.seq_id][-1].append(c)
        for victim in plan.preempted:
            segments[victim].append([])
    recomputed_output = False
    for parts in segments.values():
        for chunks in parts[1:]:
            upto = next((i for i, c in enumerate(chunks) if c.sample), len(chunks) - 1)
            assert [c.start for c in chunks[: upto + 1]] == [0, *(c.end for c in chunks[:upto])]
            recomputed_output |= chunks[upto].sample and chunks[upto].end > 12
    assert recomputed_output


# -- sampling -----------------------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_alone_and_batched(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("qwen2-tied")
    engine = load(path)
    prompt = random_prompt(9, seed=400)
    params = seeded(24, seed=1234, top_k=50, top_p=0.95, repetition_penalty=1.1)
    first = alone(engine, prompt, params)
    assert alone(engine, prompt, params) == first
    others = [random_prompt(n, seed=401 + n) for n in (20, 4, 33)]
    batched = engine.generate(
        [others[0], prompt, others[1], others[2]],
        [seeded(30, seed=1), params, SamplingParams(max_tokens=10, temperature=0.7), greedy(28)],
    )
    assert batched[1].output_ids == first
    assert alone(engine, prompt, seeded(24, seed=1235, top_k=50, top_p=0.95, repetition_penalty=1.1)) != first
    assert alone(load(path), prompt, params) == first  # a fresh engine too


def test_unseeded_requests_differ(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("qwen2-tied")
    engine = load(path)
    prompt = random_prompt(9, seed=400)
    a, b = engine.generate([prompt, prompt], SamplingParams(max_tokens=24, temperature=1.0))
    assert a.output_ids != b.output_ids


def test_logprobs_only_when_asked(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("llama")
    engine = load(path)
    prompt = random_prompt(5, seed=1)
    none, zero = engine.generate([prompt, prompt], [greedy(4), greedy(4, logprobs=0)])
    assert none.logprobs == [None] * 4
    assert all(lp is not None and lp <= 0.0 for lp in zero.logprobs)
    outs = list(engine.stream(prompt, greedy(3, logprobs=0)))
    assert all(o.top_logprobs == [] for o in outs)


@pytest.mark.parametrize("name", ["llama", "mistral"])
@pytest.mark.parametrize("chunk", [64, 5], ids=["whole", "chunked"])
def test_prompt_logprobs_match_transformers(tiny_models: TinyModels, name: str, chunk: int) -> None:  # noqa: F811
    """Each prompt token's logprob given the ones before it (echo), with its top 3, equals transformers' whole-prompt
    log_softmax, also when the prompt goes in chunks beside requests that did not ask; theirs are unchanged."""
    hf, path = tiny_models(name)
    engine = load(path, prefill_chunk=chunk)
    prompt, other = random_prompt(23, seed=11), random_prompt(9, seed=12)
    ref = torch.log_softmax(hf_logits(hf, prompt), dim=-1)  # row p predicts token p + 1
    plain = alone(engine, other, greedy(4))
    outs: dict[str, list[TokenOutput]] = {}
    ids = [engine.add_request(prompt, greedy(3, prompt_logprobs=3)), engine.add_request(other, greedy(4))]
    while engine.has_work:
        for o in engine.step():
            outs.setdefault(o.seq_id, []).append(o)
    asked, beside = outs[ids[0]], outs[ids[1]]
    assert [o.token for o in beside] == plain and all(o.prompt_logprobs is None for o in beside)
    assert [o.prompt_logprobs is not None for o in asked] == [True, False, False], "with the first token only"
    scores = asked[0].prompt_logprobs
    assert scores is not None and len(scores) == len(prompt) and scores[0] is None
    for p, score in enumerate(scores[1:], start=1):
        assert score is not None
        logprob, top = score
        assert logprob == pytest.approx(ref[p - 1, prompt[p]].item(), abs=ATOL)
        assert [t for t, _ in top] == ref[p - 1].topk(3).indices.tolist()
        assert [v for _, v in top] == pytest.approx(ref[p - 1].topk(3).values.tolist(), abs=ATOL)
    assert_all_free(engine)


def test_prompt_logprobs_survive_preemption(tiny_models: TinyModels) -> None:  # noqa: F811
    """A preempted request recomputes its prompt: its prompt logprobs come once, with its first token, unchanged."""
    _, path = tiny_models("llama")
    prompts = [random_prompt(n, seed=500 + n) for n in (10, 20, 14, 30)]
    params = [greedy(40, prompt_logprobs=0)] * 4
    reference = load(path, max_seq_len=64)
    want = [reference.generate([p], greedy(1, prompt_logprobs=0))[0] for p in prompts]
    engine = load(path, max_seq_len=64, kv_tokens=65)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    firsts: dict[str, list[TokenOutput]] = {i: [] for i in ids}
    preempted = 0
    while engine.has_work:
        plan = engine.schedule()
        preempted += len(plan.preempted)
        engine.execute(plan)
        for o in engine.collect(plan):
            if o.prompt_logprobs is not None:
                firsts[o.seq_id].append(o)
    assert preempted > 0
    for i, w in zip(ids, want, strict=True):
        assert len(firsts[i]) == 1
        got, expected = firsts[i][0].prompt_logprobs, w.prompt_logprobs
        assert got is not None and expected is not None and len(got) == len(expected) and got[0] is None
        # Recomputed in other batches than the reference's: the same values up to float rounding (CPU matmuls
        # reduce in an order that depends on the batch's shape).
        for g, e in zip(got[1:], expected[1:], strict=True):
            assert g is not None and e is not None and g[1] == e[1] == []
            assert g[0] == pytest.approx(e[0], abs=1e-5)


# -- stopping ---------------------------------------------------------------------------------------------------


def first_fresh_index(tokens: list[int], at_least: int) -> int:
    """An index k >= at_least whose token does not occur before it."""
    return next(k for k in range(at_least, len(tokens)) if tokens[k] not in tokens[:k])


def test_stop_token_ids_end_the_output(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("llama-tied")
    engine = load(path)
    prompt = random_prompt(10, seed=500)
    ref = alone(engine, prompt, greedy(32))
    k = first_fresh_index(ref, 3)
    unused = next(t for t in range(VOCAB) if t not in ref)
    out = engine.generate([prompt], greedy(32, stop_token_ids=(unused, ref[k])))[0]
    assert out.output_ids == ref[: k + 1] and out.finish_reason == "stop"
    # ignore_eos is about the model's EOS only: a request's own stop ids still stop it.
    out = engine.generate([prompt], greedy(32, stop_token_ids=(ref[k],), ignore_eos=True))[0]
    assert out.output_ids == ref[: k + 1] and out.finish_reason == "stop"
    assert_all_free(engine)


def test_min_tokens_holds_back_eos_and_stop_ids(tiny_models: TinyModels) -> None:  # noqa: F811
    """vLLM's min_tokens: EOS and stop ids cannot be sampled before that many tokens, then end the output as ever.
    logit_bias forces them at every step, so without min_tokens they would end it at once."""
    _, path = tiny_models("llama-tied")
    prompt = random_prompt(10, seed=500)
    ref = alone(load(path), prompt, greedy(32))
    eos, stop = ref[0], next(t for t in range(VOCAB) if t not in ref)
    engine = load(path, eos_token_ids=[eos])
    forced = ((eos, 100.0),)
    at_once, held, stopped = engine.generate(
        [prompt] * 3,
        [
            greedy(32, logit_bias=forced),
            greedy(32, logit_bias=forced, min_tokens=3),
            greedy(32, logit_bias=((stop, 100.0),), stop_token_ids=(stop,), min_tokens=2, ignore_eos=True),
        ],
    )
    assert at_once.output_ids == [eos] and at_once.finish_reason == "stop"
    assert len(held.output_ids) == 4 and held.output_ids[-1] == eos and held.finish_reason == "stop"
    assert not {eos, stop} & set(held.output_ids[:3]), "neither may come before min_tokens"
    assert len(stopped.output_ids) == 3 and stopped.output_ids[-1] == stop
    assert_all_free(engine)


def test_eos_stops_unless_ignored(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("llama-tied")
    prompt = random_prompt(10, seed=500)
    ref = alone(load(path), prompt, greedy(32))
    k = first_fresh_index(ref, 2)
    engine = load(path, eos_token_ids=[ref[k]])
    stopped, ignored = engine.generate([prompt, prompt], [greedy(32), greedy(32, ignore_eos=True)])
    assert stopped.output_ids == ref[: k + 1] and stopped.finish_reason == "stop"
    assert ignored.output_ids == ref and ignored.finish_reason == "length"


def test_max_tokens_and_max_seq_len_cap(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("qwen3-tied")
    engine = load(path, max_seq_len=64)
    short, capped, last = engine.generate(
        [random_prompt(5, 1), random_prompt(61, 2), random_prompt(63, 3)], [greedy(7), greedy(100), greedy(100)]
    )
    assert (len(short.output_ids), short.finish_reason) == (7, "length")
    assert (len(capped.output_ids), capped.finish_reason) == (3, "length")  # 61 + 3 = max_seq_len
    assert (len(last.output_ids), last.finish_reason) == (1, "length")
    assert_all_free(engine)


# -- aborts -------------------------------------------------------------------------------------------------------


def test_abort_mid_generation_frees_blocks(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("qwen3")
    engine = load(path)
    p1, p2 = random_prompt(40, 600), random_prompt(7, 601)
    want_b = alone(engine, p2, greedy(20))
    a = engine.add_request(p1, greedy(60))
    b = engine.add_request(p2, greedy(20))
    got_b: list[int] = []
    for _ in range(5):
        got_b += [o.token for o in engine.step() if o.seq_id == b]
    seq_a = engine.seqs[a]
    held = len(seq_a.block_table)
    assert held > 0
    free = engine.blocks.free_count
    assert engine.abort(a)
    assert engine.blocks.free_count == free + held
    assert seq_a.finish_reason == "abort" and seq_a.block_table == []
    assert not engine.abort(a)
    assert not engine.abort("no-such-request")
    while engine.has_work:
        outs = engine.step()
        assert all(o.seq_id == b for o in outs)
        got_b += [o.token for o in outs]
    assert got_b == want_b
    assert_all_free(engine)


def test_abort_while_its_step_runs(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("qwen3")
    engine = load(path)
    a = engine.add_request(random_prompt(6, 1), greedy(10))
    b = engine.add_request(random_prompt(8, 2), greedy(10))
    plan = engine.schedule()
    engine.execute(plan)
    assert engine.abort(a)
    outs = engine.collect(plan)
    assert [o.seq_id for o in outs] == [b]
    while engine.has_work:
        engine.step()
    assert_all_free(engine)


def test_a_launch_that_never_finished_gives_its_held_blocks_back(tiny_models: TinyModels) -> None:  # noqa: F811
    """The host fails an engine whose launch raised midway: that step is never collected, so forget_failed_launches
    returns the blocks it held back (else the pool would shrink for good)."""
    _, path = tiny_models("qwen3")
    engine = load(path)
    a = engine.add_request(random_prompt(30, 1), greedy(4))
    plan = engine.schedule()
    slices = engine.launch_slices(plan)
    next(slices)  # the first layers are queued, then the launch "raises"
    assert engine.abort(a)
    assert engine.blocks.free_count < engine.blocks.num_blocks
    engine.forget_failed_launches()
    assert_all_free(engine)


def test_blocks_of_a_request_ended_during_its_step_wait_for_the_step(tiny_models: TinyModels) -> None:  # noqa: F811
    """On a GPU the step still writes the ended request's K/V: its blocks are held back until the step is
    collected, so that a step launched meanwhile (the host's prompt step on another stream) is not given them."""
    _, path = tiny_models("qwen3")
    engine = load(path)
    a = engine.add_request(random_prompt(20, 1), greedy(10))
    b = engine.add_request(random_prompt(8, 2), greedy(10))
    first = engine.schedule()  # both prompts, whole
    engine.execute(first)
    engine.collect(first)
    plan = engine.schedule()  # a decode step of a and b
    engine.execute(plan)
    free = engine.blocks.free_count
    seq_a = engine.seqs[a]
    a_blocks = list(seq_a.block_table)
    assert engine.abort(a)
    assert engine.blocks.free_count == free and seq_a.held_blocks == a_blocks
    c = engine.add_request(random_prompt(40, 3), greedy(2))
    beside = engine.schedule(decodes=False)  # a prompt-only step beside the one in flight, as the host runs them
    assert [ch.seq_id for ch in beside.chunks] == [c]
    assert not set(engine.seqs[c].block_table) & set(a_blocks)
    outs = engine.collect(plan)
    assert [o.seq_id for o in outs] == [b]
    assert seq_a.held_blocks == [] and engine.blocks.free_count == free + len(a_blocks) - 3  # c took three
    engine.execute(beside)
    engine.collect(beside)
    while engine.has_work:
        engine.step()
    assert_all_free(engine)


def test_abort_queued_request(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("qwen3")
    engine = load(path)
    a = engine.add_request(random_prompt(6, 1), greedy(10))
    assert engine.abort(a)
    assert engine.schedule().empty
    assert_all_free(engine)


def test_stream_yields_tokens_and_closing_it_aborts(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("mistral")
    engine = load(path)
    prompt = random_prompt(12, 700)
    want = alone(engine, prompt, greedy(30))
    outs: list[TokenOutput] = list(engine.stream(prompt, greedy(30)))
    assert [o.token for o in outs] == want and outs[-1].finish_reason == "length"
    gen = engine.stream(prompt, greedy(30))
    first = [next(gen).token for _ in range(3)]
    assert first == want[:3]
    assert engine.blocks.free_count < engine.blocks.num_blocks
    gen.close()
    assert_all_free(engine)


def test_stream_ends_when_its_request_is_aborted_elsewhere(
    tiny_models: TinyModels,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The host aborts a request (client gone, admin cancel) while its stream is being read: the stream must end,
    not step an idle engine forever."""
    _, path = tiny_models("mistral")
    engine = load(path)
    gen = engine.stream(random_prompt(12, 700), greedy(30))
    seq_id = next(gen).seq_id
    assert engine.abort(seq_id)
    steps = 0
    real_step: Callable[[], list[TokenOutput]] = engine.step

    def counted_step() -> list[TokenOutput]:
        nonlocal steps
        steps += 1
        if steps > 100:
            raise RuntimeError("stream() keeps stepping an engine that has no work left")
        return real_step()

    monkeypatch.setattr(engine, "step", counted_step)
    rest = list(gen)
    assert all(o.seq_id == seq_id for o in rest)
    assert_all_free(engine)


# -- bad input ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_models: TinyModels) -> Engine:  # noqa: F811
    _, path = tiny_models("llama")
    return load(path, max_seq_len=64)


@pytest.mark.parametrize(
    ("prompt", "param"),
    [([], "prompt"), ([1, VOCAB, 2], "prompt"), ([1, -1], "prompt"), ([3] * 64, "messages"), ([3] * 200, "messages")],
    ids=["empty", "id-too-large", "negative-id", "max_seq_len", "longer"],
)
def test_bad_prompt_raises_and_allocates_nothing(engine: Engine, prompt: list[int], param: str) -> None:
    free = engine.blocks.free_count
    with pytest.raises(RequestError) as e:
        engine.add_request(prompt, greedy(4))
    assert e.value.param == param
    assert engine.blocks.free_count == free
    assert_all_free(engine)


def test_prompt_too_long_says_the_limit(engine: Engine) -> None:
    with pytest.raises(PromptTooLongError, match=r"64 tokens.*max_seq_len = 64.*at most 63"):
        engine.add_request([3] * 64, greedy(4))
    assert engine.generate([[3] * 63], greedy(4))[0].output_ids  # one short of the limit is accepted
    assert_all_free(engine)


@pytest.mark.parametrize(
    ("params", "param"),
    [
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(temperature=-0.5), "temperature"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_p=1.5), "top_p"),
        (SamplingParams(top_k=-1), "top_k"),
        (SamplingParams(min_p=2.0), "min_p"),
        (SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
        (SamplingParams(frequency_penalty=3.0), "frequency_penalty"),
        (SamplingParams(presence_penalty=-3.0), "presence_penalty"),
        (SamplingParams(logprobs=21), "top_logprobs"),
        (SamplingParams(stop=("",)), "stop"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_invalid_sampling_values_raise(engine: Engine, params: SamplingParams, param: str) -> None:
    with pytest.raises(RequestError) as e:
        engine.add_request([1, 2, 3], params)
    assert e.value.param == param
    assert_all_free(engine)


def test_duplicate_request_id_raises(engine: Engine) -> None:
    engine.add_request([1, 2], greedy(2), request_id="r1")
    with pytest.raises(RequestError, match="r1"):
        engine.add_request([1, 2], greedy(2), request_id="r1")
    assert engine.abort("r1")
    assert_all_free(engine)


@pytest.mark.parametrize(
    ("prompts", "params"),
    [([[1, 2, 3], []], greedy(4)), ([[1, 2, 3], [4, 5]], [greedy(4)])],
    ids=["one-prompt-empty", "fewer-params-than-prompts"],
)
def test_generate_rejects_a_bad_batch_without_queuing_any_of_it(
    tiny_models: TinyModels,  # noqa: F811
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
) -> None:
    """A batch with one invalid request must leave nothing behind: the valid requests before it must not stay
    queued, where they would hold blocks and run, unseen, inside every later call."""
    _, path = tiny_models("llama")
    engine = load(path)
    with pytest.raises((RequestError, ValueError)):
        engine.generate(prompts, params)
    assert_all_free(engine)


def test_kv_pool_smaller_than_max_seq_len_is_refused(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("llama")
    with pytest.raises(LlmhostError, match="kv_tokens"):
        load(path, max_seq_len=64, kv_tokens=40)  # 3 blocks = 48 tokens


# -- bad checkpoints ----------------------------------------------------------------------------------------------


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])
def test_unknown_model_type_lists_supported_ones(tmp_path: Path, model_type: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": ["X"]}))
    with pytest.raises(UnsupportedModelError) as e:
        Engine.load(model_config(tmp_path))
    message = str(e.value)
    assert repr(model_type) in message
    for supported in ("llama", "mistral", "qwen2", "qwen3"):
        assert supported in message


def test_readable_but_not_runnable_architecture_is_refused(tiny_models: TinyModels) -> None:  # noqa: F811
    """A checkpoint whose shape the readers understand (inspect and plan work) but the engine has no model code
    for: refused before any weight is read, naming what does run."""
    _, path = tiny_models("llama")
    ckpt = open_checkpoint(path)
    other = dataclasses.replace(ckpt, shape=dataclasses.replace(ckpt.shape, architecture="falcon"))
    with pytest.raises(UnsupportedModelError) as e:
        Engine.load(model_config(path), checkpoint=other)
    message = str(e.value)
    assert "'falcon'" in message
    assert all(arch in message for arch in ("llama", "mistral", "qwen2", "qwen3"))


def test_missing_tensor_is_named(tiny_models: TinyModels, tmp_path: Path) -> None:  # noqa: F811
    _, src = tiny_models("qwen2-tied")
    path = copy_checkpoint(src, tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.v_proj.bias"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match=r"'model\.layers\.1\.self_attn\.v_proj\.bias' is missing"):
        Engine.load(model_config(path))


def test_wrong_tensor_shape_names_both_shapes(tiny_models: TinyModels, tmp_path: Path) -> None:  # noqa: F811
    _, src = tiny_models("llama")
    path = copy_checkpoint(src, tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.0.self_attn.k_proj.weight"
    assert list(tensors[name].shape) == [32, 64]
    tensors[name] = torch.zeros(48, 64)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFileError) as e:
        Engine.load(model_config(path))
    message = str(e.value)
    assert name in message and "[48, 64]" in message and "[32, 64]" in message


def test_load_reports_progress(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("qwen3")
    calls: list[tuple[int, int]] = []
    Engine.load(model_config(path), progress=lambda done, total: calls.append((done, total)))
    total = len(open_checkpoint(path).tensors)
    assert calls == [(n, total) for n in range(1, total + 1)]


# -- memory -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "qwen2-tied", "qwen3"])
def test_memory_report_matches_parameters_and_planner(tiny_models: TinyModels, name: str) -> None:  # noqa: F811
    hf, path = tiny_models(name)
    config = model_config(path)
    engine = Engine.load(config)
    report = engine.memory_report()
    # transformers lists a tied head's parameter once, as the engine stores it once.
    assert report.weights == sum(p.numel() * p.element_size() for p in hf.parameters())
    s = engine.model.shape
    blocks = blocks_for(default_kv_tokens(config), BLOCK)
    assert engine.cache.num_blocks == blocks
    assert report.kv == blocks * BLOCK * 2 * s.num_layers * s.num_kv_heads * s.head_dim * 4
    assert (report.device, report.workspace, report.graphs, report.driver_used) == ("cpu", 0, 0, None)
    need = whole_need(
        ModelSpec.from_checkpoint(config, open_checkpoint(path)), default_kv_tokens(config), BLOCK, on_gpu=False
    )
    assert (need.weights, need.kv) == (report.weights, report.kv)
