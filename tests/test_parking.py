"""Parking on the CPU: an engine gives its weight and KV storages back (zero bytes), comes back from the host copy,
and generates exactly what it generated before; a second park reuses the host copy."""

from __future__ import annotations

import torch
from engine_fixtures import TinyModels, tiny_models  # noqa: F401

from llmhost.config import ModelConfig
from llmhost.engine.engine import Engine
from llmhost.engine.sampling_params import SamplingParams
from llmhost.host import parking

PROMPTS = [[1, 5, 9, 2, 7], [3, 3, 8]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _storages(engine: Engine) -> list[torch.UntypedStorage]:
    return [t.untyped_storage() for t in engine.model.tensors()] + [
        engine.cache.full_storage.untyped_storage(),
    ]


def test_park_unpark_round_trip_generates_the_same(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("llama")
    cfg = ModelConfig("tiny", path, dtype="float32", max_seq_len=64, max_batch=2, cuda_graphs=False)
    engine = Engine.load(cfg, "cpu")
    before = [c.output_ids for c in engine.generate(PROMPTS, GREEDY)]
    weights = engine.model.weight_bytes()
    kv = parking.kv_pool_bytes(engine)

    copy = parking.park(engine, None)
    assert copy.nbytes == weights, "the host copy holds every weight byte once (tied head not twice)"
    assert all(st.nbytes() == 0 for st in _storages(engine)), "parking frees every weight and KV storage"

    parking.unpark(engine, copy, kv)
    assert engine.model.weight_bytes() == weights and parking.kv_pool_bytes(engine) == kv
    assert [c.output_ids for c in engine.generate(PROMPTS, GREEDY)] == before

    # parking again with the same copy copies nothing: corrupt the copy, and the model comes back corrupted
    assert parking.park(engine, copy) is copy
    copy.host.zero_()
    parking.unpark(engine, copy, kv)
    assert all(not t.any() for t in engine.model.tensors())


def test_parking_forgets_the_prefix_cache(tiny_models: TinyModels) -> None:  # noqa: F811
    """The KV pools come back empty, so blocks cached before the park must not be found again (the K/V there is
    overwritten with NaN here to make stale reuse show)."""
    _, path = tiny_models("llama")
    cfg = ModelConfig("tiny", path, dtype="float32", max_seq_len=64, max_batch=2, cuda_graphs=False)
    engine = Engine.load(cfg, "cpu")
    long = [list(range(1, 41)), list(range(2, 42))]
    before = [c.output_ids for c in engine.generate(long, GREEDY)]
    assert engine.blocks.cache is not None and engine.blocks.cache.cached_count > 0
    kv = parking.kv_pool_bytes(engine)
    parking.unpark(engine, parking.park(engine, None), kv)
    assert engine.blocks.cache.cached_count == 0 and engine.blocks.free_count == engine.blocks.num_blocks
    engine.cache.full_storage.fill_(float("nan"))
    assert [c.output_ids for c in engine.generate(long, GREEDY)] == before


def test_parking_refuses_a_model_with_sequences_in_flight(tiny_models: TinyModels) -> None:  # noqa: F811
    _, path = tiny_models("llama")
    cfg = ModelConfig("tiny", path, dtype="float32", max_seq_len=64, max_batch=2, cuda_graphs=False)
    engine = Engine.load(cfg, "cpu")
    engine.add_request([1, 2, 3], GREEDY)
    try:
        parking.park(engine, None)
    except RuntimeError as e:
        assert "in flight" in str(e)
    else:
        raise AssertionError("park must refuse while a sequence is in flight")
