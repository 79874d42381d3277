"""Short prompts prefilled as rows of the decode runner's step (ModelConfig.graph_prompt_tokens), driven as the host
drives a model on a GPU: a decode step that carries prompts of at most that many tokens left (Engine.schedule with
graph_prompts), and prompt-only steps for the rest. The real decode runner runs here under Triton's interpreter (no
graph capture on a CPU), so a wrong row, position, slot or logits order changes the tokens."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from engine_fixtures import TinyModels, tiny_models  # noqa: F401

pytest.importorskip("triton")

from llmhost.config import ModelConfig
from llmhost.engine.decode_runner import DecodeRunner
from llmhost.engine.engine import Engine
from llmhost.engine.model import LlamaModel
from llmhost.engine.sampling_params import SamplingParams

# Six tokens or fewer ride decode steps (PROMPT_ROWS); the long ones take prompt-only steps of 4-token chunks.
PROMPTS = [[1, 5, 9, 2, 7, 11, 13, 17, 19, 23], [3, 3, 8], [200, 100, 50, 25, 12], [9, 8, 7, 6, 5, 4, 3, 2, 1, 60, 61]]
PROMPT_ROWS = 6
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _engine(path: Any, **kw: Any) -> Engine:
    cfg = ModelConfig("t", path, dtype="float32", max_seq_len=64, max_batch=4, cuda_graphs=False, prefill_chunk=4, **kw)
    return Engine.load(cfg, "cpu")


def _graphed_engine(path: Any, **kw: Any) -> Engine:
    """_engine with a decode runner of PROMPT_ROWS prompt rows, as Engine.load builds one on a GPU."""
    engine = _engine(path, **kw)
    assert isinstance(engine.model, LlamaModel)
    engine.runner = DecodeRunner(engine.model, engine.cache, 4, 64, prompt_tokens=PROMPT_ROWS)
    return engine


def _drive(engine: Engine) -> tuple[list[list[int]], dict[str, int], list[int]]:
    """PROMPTS through `engine` as the host drives it: the first alone, the others arriving while it decodes; decode
    steps carry the short prompts, prompt-only steps take the rest when nothing decodes. Returns each request's
    tokens, how many steps of each kind ran, and the prompt chunks' sizes in the graphed steps."""
    ids = [engine.add_request(PROMPTS[0], GREEDY)]
    outputs: dict[str, list[int]] = {ids[0]: []}
    kinds = {"graphed": 0, "prompt_only": 0}
    carried: list[int] = []
    step = 0
    while engine.has_work:
        if step in (2, 3, 5):  # the others arrive while the first decodes
            rid = engine.add_request(PROMPTS[len(ids)], GREEDY)
            ids.append(rid)
            outputs[rid] = []
        plan = engine.schedule(0, graph_prompts=True)
        if not plan.empty and any(len(c.token_ids) > 1 for c in plan.chunks):
            assert plan.graphed
            carried += [len(c.token_ids) for c in plan.chunks if not c.is_decode]
            kinds["graphed"] += 1
        if plan.empty:  # nothing decodes or carries: the long prompts' chunks, eager
            plan = engine.schedule(4, decodes=False, graph_prompts=True)
            kinds["prompt_only"] += not plan.empty
        engine.execute(plan)
        for out in engine.collect(plan):
            outputs[out.seq_id].append(out.token)
        step += 1
    return [outputs[i] for i in ids], kinds, carried


def test_short_prompts_ride_decode_steps_and_give_the_same_tokens(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("llama")
    expected = [c.output_ids for c in _engine(path).generate(PROMPTS, GREEDY)]
    outputs, kinds, carried = _drive(_graphed_engine(path))
    assert kinds["graphed"] >= 2 and kinds["prompt_only"] >= 1, kinds
    assert max(carried) <= PROMPT_ROWS and max(carried) > 3, carried  # PROMPTS[2] rides whole
    assert outputs == expected


def test_a_carried_prompt_spreads_over_decode_steps_by_graph_prompt_chunk(tiny_models: TinyModels) -> None:  # noqa: F811
    """graph_prompt_chunk 2: a short prompt rides two or three decode steps, two tokens each (its chunks after the
    first start mid-prompt and attend to the K/V its earlier steps wrote), with the same tokens as the eager path."""
    _, path = tiny_models("llama")
    expected = [c.output_ids for c in _engine(path).generate(PROMPTS, GREEDY)]
    outputs, _, carried = _drive(_graphed_engine(path, graph_prompt_chunk=2))
    assert max(carried) == 2 and len(carried) >= 4, carried
    assert outputs == expected


def test_prompt_only_steps_leave_short_prompts_to_decode_steps(tiny_models: TinyModels) -> None:  # noqa: F811
    """While a sequence decodes, a prompt-only step takes long prompts only and never a prompt whose chunk is in a
    step still in flight; with nothing decoding it takes short ones too (no decode step would carry them)."""
    _, path = tiny_models("llama")
    engine = _graphed_engine(path)
    short = engine.add_request(PROMPTS[1], GREEDY)
    plan = engine.schedule(8, decodes=False, graph_prompts=True)
    assert [c.seq_id for c in plan.chunks] == [short]  # nothing decodes yet
    engine.execute(plan)
    engine.collect(plan)
    long, short2 = engine.add_request(PROMPTS[0], GREEDY), engine.add_request(PROMPTS[2], GREEDY)
    plan = engine.schedule(8, decodes=False, graph_prompts=True)
    assert [c.seq_id for c in plan.chunks] == [long]
    engine.execute(plan)  # in flight: long's first chunk
    later = engine.schedule(8, decodes=False, graph_prompts=True)
    assert later.empty  # long waits for its chunk; short2 waits for a decode step (FIFO behind nothing else)
    carried = engine.schedule(0, graph_prompts=True)
    assert {c.seq_id for c in carried.chunks} == {short, short2} and carried.graphed
    engine.collect(plan)
    engine.execute(carried)
    engine.collect(carried)
    assert torch.is_tensor(engine.runner.logits)


def test_a_prompt_that_asks_for_its_logprobs_is_never_carried(tiny_models: TinyModels) -> None:  # noqa: F811
    """Its prompt is scored by the eager prefill: a prompt-only step takes it even while others decode, and a decode
    step never does (as a mixed step its decode rows would share the runner's buffers with the next decode step)."""
    _, path = tiny_models("llama")
    engine = _graphed_engine(path)
    first = engine.add_request(PROMPTS[1], GREEDY)
    plan = engine.schedule(8, decodes=False, graph_prompts=True)
    engine.execute(plan)
    engine.collect(plan)
    scored = engine.add_request(PROMPTS[2], SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=1))
    carried = engine.schedule(0, graph_prompts=True)
    assert [c.seq_id for c in carried.chunks] == [first] and not carried.graphed
    engine.execute(carried)
    engine.collect(carried)
    plan = engine.schedule(8, decodes=False, graph_prompts=True)
    assert [c.seq_id for c in plan.chunks] == [scored]  # its first 4 tokens (4-token chunks), scored
    engine.execute(plan)
    engine.collect(plan)
    last = engine.schedule(0, graph_prompts=True)  # its last token is a decode row, as without prompt rows
    assert {c.seq_id for c in last.chunks} == {first, scored} and all(len(c.token_ids) == 1 for c in last.chunks)
    engine.execute(last)
    outs = {o.seq_id: o for o in engine.collect(last)}
    logprobs = outs[scored].prompt_logprobs
    assert logprobs is not None and len(logprobs) == len(PROMPTS[2]) and all(x is not None for x in logprobs[1:])
