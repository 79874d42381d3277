"""The engine running ahead (engine.py): with a decode runner, `step()` launches step N+1 before reading step N's
tokens, which reach step N+1 on the device. The runner here is the real DecodeRunner (Triton kernels under the
interpreter on the CPU, no graphs), so the feed through its `sampled` buffer is exercised as on the GPU. Every
output must equal an engine that never runs ahead (no runner, the reference forward): greedy and seeded sampling,
stop tokens that end a sequence while its next row is already launched, prompts arriving while others decode,
and rows whose logprobs or penalties keep the engine from running ahead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("triton")
from engine_fixtures import TinyModels, tiny_models  # noqa: F401

from llmhost.config import ModelConfig
from llmhost.engine.block_manager import blocks_for
from llmhost.engine.engine import Engine
from llmhost.engine.kv_cache import KVCache
from llmhost.engine.sampling_params import SamplingParams

PROMPTS = [[1, 5, 9, 2, 7, 11, 13, 17, 19, 23], [3, 3, 8], [200, 100, 50, 25, 12, 6, 3, 1, 9, 4, 4, 2, 8, 16]]


def _config(path: Path) -> ModelConfig:
    # 4-token prefill chunks: the later prompts' chunks share steps with decodes (mixed steps)
    return ModelConfig("t", path, dtype="float32", max_seq_len=128, max_batch=4, cuda_graphs=False, prefill_chunk=4)


def _engines(path: Path, eos: tuple[int, ...] = ()) -> tuple[Engine, Engine, list[int]]:
    """(plain engine, engine with a decode runner, the runner's feed counts per call)."""
    cfg = _config(path)
    plain = Engine.load(cfg, "cpu", eos_token_ids=eos)
    model = plain.model
    cache = KVCache(model.shape, blocks_for(cfg.max_seq_len * cfg.max_batch, 16) + 1, 16, torch.float32, model.device)
    ahead = Engine(model, cache, cfg, eos, decode_graphs=True)
    assert ahead.runner is not None
    feeds: list[int] = []
    run = ahead.runner.run

    def counting_run(rows: list[Any]) -> torch.Tensor:
        feeds.append(sum(r.feed >= 0 for r in rows))
        return run(rows)

    ahead.runner.run = counting_run  # type: ignore[method-assign]
    return plain, ahead, feeds


def _outputs(engine: Engine, params: list[SamplingParams]) -> list[list[int]]:
    return [c.output_ids for c in engine.generate(PROMPTS, params)]


def test_running_ahead_gives_the_same_tokens(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("llama")
    params = [
        SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=14, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=5, temperature=0.7, top_k=20, seed=3, ignore_eos=True),
    ]
    plain, ahead, feeds = _engines(path)
    expected = _outputs(plain, params)
    assert _outputs(ahead, params) == expected
    assert sum(feeds) > 0, "decode rows must have taken their tokens from the previous step on the device"
    assert [len(o) for o in expected] == [9, 14, 5]
    # nothing left behind: every block returned; at most the step launched ahead of the last read is in flight
    assert ahead.blocks.used_count == 0
    assert len(ahead._inflight) <= 1


def test_a_stop_token_ends_a_sequence_whose_next_row_already_ran(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("llama")
    greedy = [SamplingParams(max_tokens=20, temperature=0.0) for _ in PROMPTS]
    plain, _, _ = _engines(path)
    free_run = _outputs(plain, greedy)
    # A token prompt 0 first emits at its fourth step or later ends it (and any other sequence that reaches it).
    first = next(i for i, t in enumerate(free_run[0]) if i >= 3 and t not in free_run[0][:i])
    eos = free_run[0][first]
    plain, ahead, feeds = _engines(path, (eos,))
    expected = _outputs(plain, greedy)
    assert len(expected[0]) == first + 1 and expected[0][-1] == eos
    assert _outputs(ahead, greedy) == expected
    assert sum(feeds) > 0
    # the same engine goes on serving after sequences finished with rows in flight
    assert _outputs(ahead, greedy) == expected


def test_logprobs_and_penalties_keep_their_meaning(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("llama")
    params = [
        SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.5, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=0.0, logprobs=2, ignore_eos=True),
    ]
    plain, ahead, _ = _engines(path)
    want = plain.generate(PROMPTS, params)
    got = ahead.generate(PROMPTS, params)
    assert [c.output_ids for c in got] == [c.output_ids for c in want]
    assert got[2].logprobs == pytest.approx(want[2].logprobs, abs=1e-4)


def test_min_tokens_counts_the_token_still_on_the_device(tiny_models: TinyModels) -> None:  # noqa: F811
    """A step launched ahead samples its row's next token while the previous one is unread: min_tokens must count
    it, or EOS would be held back one token too long."""
    _, path = tiny_models("llama")
    eos = 7
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, logit_bias=((eos, 100.0),), min_tokens=k) for k in (1, 4, 6)
    ]
    plain, ahead, feeds = _engines(path, (eos,))
    want = _outputs(plain, params)
    assert [len(o) for o in want] == [2, 5, 7] and all(o[-1] == eos for o in want)
    assert _outputs(ahead, params) == want
    assert sum(feeds) > 0


def test_prompts_arriving_while_others_decode(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("llama")
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    results = []
    for engine in _engines(path)[:2]:
        ids = [engine.add_request(PROMPTS[0], greedy)]
        out: dict[str, list[int]] = {ids[0]: []}
        for step in range(60):
            if step in (2, 5):
                ids.append(engine.add_request(PROMPTS[len(ids)], greedy))
                out[ids[-1]] = []
            for o in engine.step():
                out[o.seq_id].append(o.token)
            if not engine.has_work and step > 5:
                break
        results.append([out[i] for i in ids])
    assert results[0] == results[1]
    assert all(len(o) == 12 for o in results[0])
