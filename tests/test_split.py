"""A model split across devices (CPU, fp32): tiny random Llama and Gemma 3 checkpoints in 2 and 3 stages give the
unsplit engine's greedy tokens; each stage's KV pool holds only its layers; what the engine allocates per stage is
what the planner's `Stage`s say; preemption and aborts free blocks everywhere; the step's metadata reaches each
device once; weights stream straight to their stage's device.

Every stage is on "cpu" here, and the split path is the one a GPU split runs: stages are distinct by position, so
two stages on one device still have two KV pools, a hand-off, and (tied models) a copy of the head. The "meta"
device stands in for a second device where only placement matters (no forward runs there).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from llmhost.config import HostConfig, ModelConfig
from llmhost.engine.engine import Completion, Engine
from llmhost.engine.kv_cache import KVCache
from llmhost.engine.placement import LayerPlacement, StagePlacement, StageSpec
from llmhost.engine.sampling_params import SamplingParams
from llmhost.engine.step_inputs import StepInputs
from llmhost.engine.weights import iter_weights
from llmhost.errors import ConfigError
from llmhost.memory.estimate import ModelSpec, stage_graphs, stage_need, uses_decode_graphs, whole_need
from llmhost.memory.inventory import parse_gpu_spec
from llmhost.memory.planner import plan_models
from llmhost.memory.runtime import DEFAULT_GPU_OVERHEAD
from llmhost.model_files import open_checkpoint

VOCAB = 256
BLOCK = 4  # small blocks: sequences cross many block boundaries, and the Gemma window (8) straddles them
STEPS = 32
PROMPT_LENGTHS = (5, 23, 12, 40)  # a batch of four, the longest five windows long

_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=512,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
# name -> (config, model class, std of non-norm weights). Gemma's embedding is scaled by sqrt(hidden): smaller
# there, or the embedding drowns the layers and greedy decoding repeats one token.
_SPECS: dict[str, tuple[Any, Any, float]] = {
    "llama": (
        transformers.LlamaConfig(**_COMMON, num_hidden_layers=4, tie_word_embeddings=False),
        transformers.LlamaForCausalLM,
        0.1,
    ),
    # Tied: a split model's last stage holds its own copy of the embedding as the head.
    "llama-tied": (
        transformers.LlamaConfig(**_COMMON, num_hidden_layers=4, tie_word_embeddings=True),
        transformers.LlamaForCausalLM,
        0.1,
    ),
    # Tied, local/global layers (the window pool), own RoPE bases.
    "gemma3": (
        transformers.Gemma3TextConfig(
            **_COMMON,
            head_dim=32,
            num_hidden_layers=6,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
            sliding_window=8,
            query_pre_attn_scalar=24,
            tie_word_embeddings=True,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            },
        ),
        transformers.Gemma3ForCausalLM,
        0.2,
    ),
}
# name -> stage layer ranges, 2 and 3 stages. Gemma's 3-stage split puts one full-attention layer alone on stage
# 1: a stage with no sliding layer still shares the window pool's block ids.
SPLITS: dict[str, dict[str, list[tuple[int, int]]]] = {
    "llama": {"2": [(0, 2), (2, 4)], "3": [(0, 1), (1, 3), (3, 4)]},
    "gemma3": {"2": [(0, 3), (3, 6)], "3": [(0, 2), (2, 3), (3, 6)]},
}


def build(name: str, directory: Path) -> Path:
    config, model_cls, std = _SPECS[name]
    torch.manual_seed(0)
    model = model_cls(config).to(torch.float32).eval()
    gemma = name.startswith("gemma")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                # Gemma scales by (1 + w): w around 0; Llama's norms scale by w: around 1. Neither exactly.
                p.uniform_(-0.5, 0.5) if gemma else p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.02 if gemma and "embed" in pname else std)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build(name, tmp_path_factory.mktemp(name))
        return built[name]

    yield get


def config(path: Path, **overrides: Any) -> ModelConfig:
    args: dict[str, Any] = dict(dtype="float32", max_seq_len=128, max_batch=4, prefill_chunk=16, cuda_graphs=False)
    args.update(overrides)
    return ModelConfig("tiny", path, **args)


def cpu_stages(ranges: list[tuple[int, int]]) -> list[StageSpec]:
    return [("cpu", start, end) for start, end in ranges]


def load(path: Path, ranges: list[tuple[int, int]] | None = None, **kw: Any) -> Engine:
    kv_tokens = kw.pop("kv_tokens", None)
    stages = cpu_stages(ranges) if ranges is not None else None
    return Engine.load(config(path, **kw), kv_tokens=kv_tokens, block_size=BLOCK, stages=stages)


def prompts() -> list[list[int]]:
    return [
        torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(10 + n)).tolist() for n in PROMPT_LENGTHS
    ]


def greedy(n: int = STEPS) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0)


def outputs(done: list[Completion]) -> list[list[int]]:
    return [c.output_ids for c in done]


def assert_all_free(engine: Engine) -> None:
    assert not engine.has_work and engine.seqs == {}
    assert engine.blocks.free_count == engine.blocks.num_blocks
    window = engine.blocks.window
    assert window is None or window.free_count == window.num_blocks


def nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture(scope="module")
def unsplit_tokens(tiny: Any) -> dict[str, list[list[int]]]:
    """The unsplit engine's greedy continuations of prompts(), per model."""
    return {name: outputs(load(tiny(name)).generate(prompts(), greedy())) for name in SPLITS}


# -- tokens ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stages", ["2", "3"])
@pytest.mark.parametrize("name", list(SPLITS))
def test_split_gives_the_unsplit_greedy_tokens(
    tiny: Any, unsplit_tokens: dict[str, list[list[int]]], name: str, stages: str
) -> None:
    ranges = SPLITS[name][stages]
    engine = load(tiny(name), ranges)
    assert len(engine.caches) == len(ranges) and engine.placement.split
    got = outputs(engine.generate(prompts(), greedy()))
    want = unsplit_tokens[name]
    assert got == want
    assert all(len(t) == STEPS for t in got)
    assert len({t for seq in want for t in seq}) > 8  # the tiny model does not just repeat itself
    assert_all_free(engine)


@pytest.mark.parametrize("name", list(SPLITS))
def test_each_stage_pool_holds_only_its_layers(tiny: Any, name: str) -> None:
    ranges = SPLITS[name]["3"]
    engine = load(tiny(name), ranges)
    shape = engine.model.shape
    for cache, (start, end) in zip(engine.caches, ranges, strict=True):
        assert cache.layers == range(start, end)
        held = cache.full_storage.shape[1] + cache.window_storage.shape[1]  # [2, layers, blocks, ...] per pool
        assert held == end - start
        sliding = sum(1 for i in range(start, end) if cache.in_window_pool(i))
        assert cache.window_storage.shape[1] == sliding
        for i in range(shape.num_layers):
            if start <= i < end:
                assert cache.layer_k(i).data_ptr() != cache.layer_v(i).data_ptr()
            else:
                with pytest.raises(IndexError, match=f"layer {i} is not in this KV cache"):
                    cache.layer_k(i)
        # The geometry is the model's on every stage: one block manager's ids address every pool.
        assert (cache.num_blocks, cache.window_blocks) == (engine.cache.num_blocks, engine.cache.window_blocks)
    assert engine.blocks.num_blocks == engine.cache.num_blocks


def test_a_wrong_boundary_gives_different_tokens(tiny: Any, unsplit_tokens: dict[str, list[list[int]]]) -> None:
    """The comparison above can fail: a model whose second stage starts one layer late (layer 2 never runs) no
    longer gives the unsplit tokens, nor does one whose hand-off loses the hidden state."""
    path = tiny("llama")
    engine = load(path, SPLITS["llama"]["2"])
    # Bypasses LayerPlacement.of, which refuses the gap: the engine's caches still hold layers [2, 4) on stage 1.
    engine.model.placement = LayerPlacement((engine.placement.stages[0], StagePlacement(torch.device("cpu"), 3, 4)))
    assert outputs(engine.generate(prompts(), greedy())) != unsplit_tokens["llama"]

    engine = load(path, SPLITS["llama"]["2"])
    real = engine.model.stage_slices

    def zeroed_hand_off(stage: int, h: torch.Tensor, inputs: Any) -> Any:
        return real(stage, torch.zeros_like(h) if stage == 1 else h, inputs)

    engine.model.stage_slices = zeroed_hand_off  # type: ignore[method-assign]
    assert outputs(engine.generate(prompts(), greedy())) != unsplit_tokens["llama"]


def test_tied_head_is_a_copy_on_the_last_stage(tiny: Any) -> None:
    path = tiny("llama-tied")
    whole = load(path)
    assert whole.model.lm_head is whole.model.embed  # unsplit: one tensor
    engine = load(path, [(0, 2), (2, 4)])
    m = engine.model
    assert m.lm_head is not m.embed and m.lm_head.data_ptr() != m.embed.data_ptr()
    assert torch.equal(m.lm_head, m.embed)
    assert any(t is m.lm_head for t in m.stage_tensors(1)) and not any(t is m.lm_head for t in m.stage_tensors(0))
    assert outputs(engine.generate(prompts(), greedy(8))) == outputs(whole.generate(prompts(), greedy(8)))


# -- memory: the planner's stages are what the engine allocates ---------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "llama-tied", "gemma3"])
def test_planner_stages_equal_engine_allocation(tiny: Any, name: str) -> None:
    """Two simulated GPUs each one byte too small for the whole model: the planner splits it; loaded with those
    stages (on "cpu"), every stage holds exactly the planned weight and KV bytes, and no CUDA-graph pool is
    planned for a split model."""
    path = tiny(name)
    cfg = config(path, cuda_graphs=True)  # graphs would be counted for the model whole on a GPU
    spec = ModelSpec.from_checkpoint(cfg, open_checkpoint(path))
    host = HostConfig(block_size=BLOCK)
    kv = cfg.max_seq_len * cfg.max_batch
    whole = whole_need(spec, kv, BLOCK, on_gpu=True)
    inventory = parse_gpu_spec(f"2x{DEFAULT_GPU_OVERHEAD + whole.total - 1}B")
    (mp,) = plan_models([spec], inventory, host).models
    assert len(mp.stages) == 2 and mp.devices == (0, 1)
    assert all(st.need.graphs == 0 for st in mp.stages)
    placement = LayerPlacement.from_plan(mp.stages, {0: "cpu", 1: "cpu"}, spec.shape.num_layers)
    engine = Engine.load(cfg, kv_tokens=mp.kv_tokens, block_size=BLOCK, stages=placement)
    assert engine.runner is None
    for k, st in enumerate(mp.stages):
        assert (engine.placement.stages[k].start, engine.placement.stages[k].end) == (st.start, st.end)
        assert nbytes(engine.model.stage_tensors(k)) == st.need.weights
        assert engine.caches[k].nbytes == st.need.kv
    # Every tensor the model owns belongs to exactly one stage, and on one device the report adds the stages up.
    assert nbytes(engine.model.tensors()) == sum(st.need.weights for st in mp.stages)
    report = engine.memory_by_device()
    assert list(report) == ["cpu"]
    assert (report["cpu"].weights, report["cpu"].kv) == (
        sum(st.need.weights for st in mp.stages),
        sum(st.need.kv for st in mp.stages),
    )
    assert engine.memory_report() == report["cpu"]
    # A boundary one layer off allocates other per-stage bytes than planned: the comparison can fail.
    (a, b) = mp.stages
    moved = Engine.load(
        cfg, kv_tokens=mp.kv_tokens, block_size=BLOCK, stages=[("cpu", 0, a.end + 1), ("cpu", a.end + 1, b.end)]
    )
    assert nbytes(moved.model.stage_tensors(0)) != a.need.weights
    assert moved.caches[0].nbytes != a.need.kv


@pytest.mark.parametrize("name", ["llama-tied", "gemma3"])
def test_three_stages_allocate_the_estimate(tiny: Any, name: str) -> None:
    path = tiny(name)
    ranges = SPLITS["gemma3" if name == "gemma3" else "llama"]["3"]
    cfg = config(path)
    spec = ModelSpec.from_checkpoint(cfg, open_checkpoint(path))
    engine = load(path, ranges)
    kv = cfg.max_seq_len * cfg.max_batch
    for k, (start, end) in enumerate(ranges):
        need = stage_need(spec, kv, BLOCK, start, end, on_gpu=True)
        assert nbytes(engine.model.stage_tensors(k)) == need.weights
        assert engine.caches[k].nbytes == need.kv
        assert need.graphs == 0


def test_split_models_plan_no_decode_graphs(tiny: Any) -> None:
    path = tiny("llama")
    spec = ModelSpec.from_checkpoint(config(path, cuda_graphs=True), open_checkpoint(path))
    assert uses_decode_graphs(spec, on_gpu=True) and not uses_decode_graphs(spec, on_gpu=True, split=True)
    assert stage_graphs(spec, last=True, on_gpu=True, block_size=BLOCK) > 0
    assert stage_graphs(spec, last=True, on_gpu=True, block_size=BLOCK, split=True) == 0
    assert whole_need(spec, 512, BLOCK).graphs > 0
    assert stage_need(spec, 512, BLOCK, 2, 4).graphs == stage_need(spec, 512, BLOCK, 0, 2).graphs == 0
    # The runner is single-device: asking an engine to capture graphs for a split model is a caller's bug.
    engine = load(path, SPLITS["llama"]["2"])
    with pytest.raises(ValueError, match="split model decodes eagerly"):
        Engine(engine.model, engine.caches, engine.config, decode_graphs=True)


# -- blocks: preemption and aborts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SPLITS))
def test_preemption_and_abort_free_blocks_on_every_stage(
    tiny: Any, unsplit_tokens: dict[str, list[list[int]]], name: str
) -> None:
    """The stages share one block manager whose ids index every stage's pools, so a freed block is free on every
    stage at once. A pool of max_seq_len + 8 tokens forces preemptions; the preempted sequences are recomputed on
    every stage and still give the unsplit tokens."""
    path = tiny(name)
    ranges = SPLITS[name]["3"]
    engine = load(path, ranges, kv_tokens=128 + 8)
    ids = [engine.add_request(p, greedy()) for p in prompts()]
    got: dict[str, list[int]] = {i: [] for i in ids}
    preempted = 0
    while engine.has_work:
        plan = engine.schedule()
        preempted += len(plan.preempted)
        engine.execute(plan)
        for out in engine.collect(plan):
            got[out.seq_id].append(out.token)
    assert preempted > 0
    assert [got[i] for i in ids] == unsplit_tokens[name]
    assert_all_free(engine)

    ids = [engine.add_request(p, greedy()) for p in prompts()]
    for _ in range(6):
        engine.step()
    assert engine.blocks.used_count > 0
    for i in ids:
        assert engine.abort(i)
    assert_all_free(engine)
    # The freed blocks are reused by every stage: a fresh run over them still gives the unsplit tokens.
    assert outputs(engine.generate(prompts(), greedy())) == unsplit_tokens[name]


# -- per-step metadata and weight streaming -----------------------------------------------------------------------


def test_step_metadata_reaches_each_device_once(tiny: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three stages on one device: one copy of the step's metadata per step, not one per stage or per layer."""
    engine = load(tiny("gemma3"), SPLITS["gemma3"]["3"])
    calls: list[torch.device] = []
    real = StepInputs.to

    def counted(self: StepInputs, device: torch.device) -> Any:
        calls.append(device)
        return real(self, device)

    monkeypatch.setattr(StepInputs, "to", counted)
    for p in prompts():
        engine.add_request(p, greedy(4))
    steps = 0
    while engine.has_work:
        engine.step()
        steps += 1
    assert calls == [torch.device("cpu")] * steps


def test_weights_stream_straight_to_their_stage_device(tiny: Any) -> None:
    """Stage 1 on the meta device: its layers, the final norm and the (tied) head land there, KV pool included;
    stage 0's stay on the CPU. Each streamed tensor is created on its destination's device."""
    path = tiny("gemma3")
    engine = Engine.load(config(path), block_size=BLOCK, stages=[("cpu", 0, 3), ("meta", 3, 6)])
    m = engine.model
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert m.embed.device == cpu and m.norm.device == meta and m.lm_head.device == meta
    for i in range(6):
        assert {t.device for t in m.layer_tensors(i)} == {cpu if i < 3 else meta}
    assert engine.caches[0].full_storage.device == cpu and engine.caches[1].full_storage.device == meta
    devices = m.weight_devices()
    ckpt = open_checkpoint(path)
    seen = 0
    for name, tensor in iter_weights(ckpt, torch.float32, lambda n: devices.get(n, cpu)):
        assert tensor.device == devices[name], name
        seen += 1
    assert seen == len(devices)
    report = engine.memory_by_device()
    spec = ModelSpec.from_checkpoint(config(path), open_checkpoint(path))
    kv = 128 * 4
    assert report["cpu"].weights == stage_need(spec, kv, BLOCK, 0, 3).weights
    assert report["meta"].weights == stage_need(spec, kv, BLOCK, 3, 6).weights
    assert (report["cpu"].kv, report["meta"].kv) == (engine.caches[0].nbytes, engine.caches[1].nbytes)
    summed = engine.memory_report()
    assert summed.device == "cpu,meta" and summed.weights == report["cpu"].weights + report["meta"].weights


# -- validation ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ranges", "message"),
    [
        ([], "at least one stage"),
        ([(0, 2), (3, 4)], "stage 1 holds layers \\[3, 4\\) but must start at layer 2"),
        ([(0, 2), (1, 4)], "stage 1 holds layers \\[1, 4\\)"),
        ([(0, 2), (2, 2), (2, 4)], "stage 1 .* at least one layer"),
        ([(0, 2), (2, 3)], "end at layer 3 but the model has 4 layers"),
    ],
)
def test_bad_stages_are_config_errors(tiny: Any, ranges: list[tuple[int, int]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tiny("llama"), ranges)


def test_engine_checks_its_caches_against_the_stages(tiny: Any) -> None:
    engine = load(tiny("llama"), SPLITS["llama"]["2"])
    m, (c0, c1) = engine.model, engine.caches
    with pytest.raises(ValueError, match="1 KV caches for a model of 2 stages"):
        Engine(m, c0, engine.config)
    other = KVCache(m.shape, c1.num_blocks, BLOCK, torch.float32, torch.device("cpu"), layers=range(1, 4))
    with pytest.raises(ValueError, match="stage 1 runs layers \\[2, 4\\) on cpu but its KV cache holds \\[1, 4\\)"):
        Engine(m, [c0, other], engine.config)
    smaller = KVCache(m.shape, c1.num_blocks - 1, BLOCK, torch.float32, torch.device("cpu"), layers=range(2, 4))
    with pytest.raises(ValueError, match="differ in blocks"):
        Engine(m, [c0, smaller], engine.config)


# -- the GPU bench's planning half ---------------------------------------------------------------------------------


def test_multi_gpu_bench_plans_without_a_gpu() -> None:
    """bench/multi_gpu.py imports without CUDA, and on two simulated H200s the planner splits Llama-3-70B across
    both (no graph pool), spreads two 8B models one per GPU, and its largest max_seq_len for the split plans while
    one token and one block more are rejected."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "multi_gpu.py"
    spec = importlib.util.spec_from_file_location("multi_gpu_bench", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    doc = bench.plan_only(bench.SIMULATED_H200_PAIR)
    stages = doc["split"]["stages"]
    assert [s["gpu"] for s in stages] == [0, 1] and stages[0]["layers"][0] == 0 and stages[1]["layers"][1] == 80
    assert stages[0]["layers"][1] == stages[1]["layers"][0] and all(s["graphs"] == 0 for s in stages)
    assert set(doc["split"]["predicted_per_gpu"]) == {0, 1}
    assert doc["pair_devices"] == {"a": [0], "b": [1]}
    fit = doc["fit"]
    assert fit["fit_limited_by"] == "memory" and fit["plan_at_fit_feasible"]
    assert fit["one_token_more"]["rejected"] and fit["one_block_more"]["rejected"]
    assert not torch.cuda.is_initialized()


@pytest.mark.parametrize("stages", ["2", "3"])
def test_split_with_fused_kernels_gives_the_unsplit_greedy_tokens(
    tiny: Any, unsplit_tokens: dict[str, list[list[int]]], stages: str
) -> None:
    """The GPU's forward (model.fused: Triton kernels, here under the interpreter) on a split model: each stage's
    kernels over its own layers, KV pool and RoPE table."""
    pytest.importorskip("triton")
    engine = load(tiny("llama"), SPLITS["llama"][stages])
    engine.model.fused = True  # type: ignore[attr-defined]
    assert outputs(engine.generate(prompts(), greedy())) == unsplit_tokens["llama"]
    assert_all_free(engine)
