"""Mixed steps (decode rows beside prompt chunks) with a decode runner: the decode rows go to the runner, the prompt
chunks to the reference path, and the logits are stitched back in plan order. On the CPU the runner is a stand-in
that computes its rows with the reference forward (the real one replays CUDA graphs; bench/kernels_check.py
compares those with the reference), so any mistake in the split or the stitching changes the tokens."""

from __future__ import annotations

from typing import Any

import torch
from engine_fixtures import TinyModels, tiny_models  # noqa: F401

from llmhost.config import ModelConfig
from llmhost.engine.engine import Engine
from llmhost.engine.sampling_params import SamplingParams
from llmhost.engine.scheduler import Chunk

PROMPTS = [[1, 5, 9, 2, 7, 11, 13, 17, 19, 23], [3, 3, 8], [200, 100, 50, 25, 12, 6, 3, 1, 9, 4, 4, 2, 8, 16]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


class ReferenceRunner:
    """Decodes its rows with the engine's reference forward; counts the rows it was given."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.rows_run = 0
        self.calls_with_prompts_beside = 0
        self.sampled = torch.zeros(8, dtype=torch.int64)  # where the engine leaves each step's tokens

    def run(self, rows: list[Any]) -> torch.Tensor:
        self.rows_run += len(rows)
        chunks = [Chunk(f"r{i}", r.position, (r.token,), tuple(r.block_table), True) for i, r in enumerate(rows)]
        return self.engine._forward_chunks(chunks)


def _engine(path: Any, chunk: int) -> Engine:
    cfg = ModelConfig("t", path, dtype="float32", max_seq_len=128, max_batch=4, cuda_graphs=False, prefill_chunk=chunk)
    return Engine.load(cfg, "cpu")


def test_mixed_steps_split_between_runner_and_reference(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("llama")
    plain = _engine(path, 4)
    expected = [c.output_ids for c in plain.generate(PROMPTS, GREEDY)]

    engine = _engine(path, 4)  # 4-token prefill chunks: prompts arrive while others decode (mixed steps)
    runner = ReferenceRunner(engine)
    engine.runner = runner  # type: ignore[assignment]
    mixed = 0
    ids = [engine.add_request(PROMPTS[0], GREEDY)]
    outputs: dict[str, list[int]] = {ids[0]: []}
    step = 0
    while engine.has_work:
        if step in (3, 6):  # later prompts join while the first decodes
            rid = engine.add_request(PROMPTS[len(ids)], GREEDY)
            ids.append(rid)
            outputs[rid] = []
        plan = engine.schedule()
        kinds = {len(c.token_ids) == 1 and c.sample for c in plan.chunks}
        mixed += kinds == {True, False}
        engine.execute(plan)
        for out in engine.collect(plan):
            outputs[out.seq_id].append(out.token)
        step += 1
    assert mixed >= 2, "the schedule must contain mixed steps for this test to mean anything"
    assert runner.rows_run > 0
    assert [outputs[i] for i in ids] == expected
