"""The memory estimate and the planner at Llama-3 8B and 70B shapes; hypothesis properties on small shapes."""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmhost.config import DTYPE_BYTES, HostConfig, ModelConfig
from llmhost.errors import ConfigError, InventoryError, PlanInfeasibleError
from llmhost.memory.estimate import (
    ModelSpec,
    default_kv_tokens,
    graph_batch_sizes,
    graph_step_sizes,
    stage_need,
    steered_graphs,
    whole_need,
)
from llmhost.memory.inventory import Device, Inventory, parse_gpu_spec
from llmhost.memory.plan import ModelPlan, Plan
from llmhost.memory.planner import PlanInfeasible, make_budgets, plan_models
from llmhost.memory.runtime import DEFAULT_GPU_OVERHEAD, runtime_overhead
from llmhost.model_files.shape import ModelShape, all_sliding, every_nth_full
from llmhost.units import GiB, MiB, parse_size

LLAMA3_8B = ModelShape(
    architecture="llama",
    num_layers=32,
    hidden_size=4096,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=14336,
    vocab_size=128256,
    tie_embeddings=False,
    max_position_embeddings=131072,
)
LLAMA3_70B = replace(LLAMA3_8B, num_layers=80, hidden_size=8192, num_heads=64, intermediate_size=28672)
# Mistral-7B v0.1: every layer attends to a 4096-token window.
MISTRAL_7B = replace(
    LLAMA3_8B,
    vocab_size=32000,
    max_position_embeddings=32768,
    sliding_window=4096,
    layer_types=all_sliding(32),
)
TINY = ModelShape("llama", 4, 256, 4, 2, 64, 512, 1000, True, 8192)

BS = 16  # the default block size


def spec(name: str, shape: ModelShape = LLAMA3_8B, **cfg: Any) -> ModelSpec:
    return ModelSpec.from_shape(ModelConfig(name=name, path=Path(f"/models/{name}"), **cfg), shape)


def plan(specs: Sequence[ModelSpec], gpus: str, **host: Any) -> Plan:
    """Planned without [host] sm_steering unless asked: these tests check the estimate's arithmetic, and
    test_sm_steering_counts_the_confined_graphs_executables what steering adds to it."""
    return plan_models(specs, parse_gpu_spec(gpus), HostConfig(**{"sm_steering": False, **host}))


def infeasible(specs: Sequence[ModelSpec], gpus: str, **host: Any) -> PlanInfeasible:
    with pytest.raises(PlanInfeasible) as info:
        plan(specs, gpus, **host)
    return info.value


def by_name(p: Plan) -> dict[str, ModelPlan]:
    return {m.name: m for m in p.models}


def assert_plan_sound(p: Plan, specs: Sequence[ModelSpec], steered: bool = False) -> None:
    """Invariants every returned plan keeps (`steered`: planned with [host] sm_steering)."""
    assert sorted(m.name for m in p.models) == sorted(s.name for s in specs)
    assert [m.load_order for m in p.models] == list(range(len(p.models)))
    for d, b in enumerate(p.budgets):
        assert b.device.index == d
        assert p.free_on(d) == b.usable - p.used_on(d)
        assert p.used_on(d) <= b.usable, f"{b.device.label} over budget"
        assert p.free_on(d) >= 0
    for s in specs:
        m = by_name(p)[s.name]
        assert m.stages[0].start == 0
        assert m.stages[-1].end == s.shape.num_layers
        for a, b2 in itertools.pairwise(m.stages):
            assert a.end == b2.start, "stages must be contiguous layer ranges"
        assert all(st_.end > st_.start for st_ in m.stages)
        assert len(set(m.devices)) == len(m.devices)
        if s.config.gpus is not None:
            assert set(m.devices) <= set(s.config.gpus)
        assert m.kv_tokens == m.kv_blocks * p.block_size
        for st_ in m.stages:
            on_gpu = p.budgets[st_.device].device.kind == "cuda"
            assert st_.need == stage_need(s, m.kv_tokens, p.block_size, st_.start, st_.end, on_gpu, steered)


# -- real shapes: parameter counts and estimate terms --------------------------------------------------------


def test_real_shape_parameter_counts() -> None:
    assert LLAMA3_8B.param_count() == 8_030_261_248
    assert LLAMA3_70B.param_count() == 70_553_706_496


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_weights_are_params_times_dtype_bytes(dtype: str) -> None:
    s = spec("a", dtype=dtype)
    expected = LLAMA3_8B.param_count() * DTYPE_BYTES[dtype]
    assert s.weight_bytes == expected
    assert whole_need(s, default_kv_tokens(s.config), BS).weights == expected


def test_kv_is_blocks_times_block_size_times_per_token_bytes() -> None:
    s = spec("a", max_seq_len=4096, max_batch=8)
    tokens = default_kv_tokens(s.config)
    assert tokens == 4096 * 8
    blocks = tokens // BS
    per_token = 2 * 32 * 8 * 128 * 2  # K and V x layers x kv_heads x head_dim x bf16
    assert per_token == 128 * 1024
    assert whole_need(s, tokens, BS).kv == blocks * BS * per_token == 4 * GiB


def test_kv_rounds_up_to_whole_blocks() -> None:
    s = spec("a")
    per_token = 2 * 32 * 8 * 128 * 2
    assert whole_need(s, 1000, BS).kv == 63 * BS * per_token  # ceil(1000 / 16) = 63 blocks
    assert whole_need(s, 1008, BS).kv == 63 * BS * per_token
    assert whole_need(s, 1009, BS).kv == 64 * BS * per_token
    assert whole_need(s, 1000, 32).kv == 32 * 32 * per_token
    p = plan([spec("a", kv_tokens=1000)], "1x80GiB")
    (m,) = p.models
    assert (m.kv_blocks, m.kv_tokens) == (63, 1008)
    assert m.stages[0].need.kv == 63 * BS * per_token


def test_kv_dtype_sets_kv_bytes() -> None:
    bf16 = whole_need(spec("a"), 4096, BS).kv
    fp32 = whole_need(spec("a", kv_dtype="float32"), 4096, BS).kv
    assert fp32 == 2 * bf16
    assert whole_need(spec("a", kv_dtype="float32"), 4096, BS).weights == whole_need(spec("a"), 4096, BS).weights


def test_sliding_window_layers_are_capped_at_the_window() -> None:
    s = spec("m", MISTRAL_7B, max_seq_len=32768, max_batch=2)
    tokens = default_kv_tokens(s.config)
    per_token_layer = 2 * 8 * 128 * 2
    full_blocks = tokens // BS  # 4096
    per_seq = 4096 // BS + 1  # the window straddles one more block
    assert whole_need(s, tokens, BS).kv == 32 * 2 * per_seq * BS * per_token_layer
    assert whole_need(s, tokens, BS).kv < 32 * full_blocks * BS * per_token_layer
    # Short pools are not capped above their own size.
    assert whole_need(s, 256, BS).kv == 32 * 256 * per_token_layer


def test_mixed_sliding_and_full_layers() -> None:
    shape = replace(MISTRAL_7B, num_layers=12, layer_types=every_nth_full(12, 6), sliding_window=512)
    s = spec("g", shape, max_seq_len=8192, max_batch=4)
    tokens = default_kv_tokens(s.config)
    per_token_layer = 2 * 8 * 128 * 2
    full = 2 * (tokens // BS) * BS * per_token_layer  # layers 5 and 11 attend globally
    sliding = 10 * 4 * (512 // BS + 1) * BS * per_token_layer
    assert whole_need(s, tokens, BS).kv == full + sliding
    # A stage holding only sliding layers is capped; one holding a full layer is not.
    assert stage_need(s, tokens, BS, 0, 5, True).kv == 5 * 4 * 33 * BS * per_token_layer
    assert stage_need(s, tokens, BS, 5, 6, True).kv == (tokens // BS) * BS * per_token_layer


def test_stage_weights_add_up_and_tied_heads_copy_the_embedding() -> None:
    s = spec("a")
    whole = whole_need(s, 4096, BS)
    parts = [stage_need(s, 4096, BS, a, b) for a, b in [(0, 10), (10, 20), (20, 32)]]
    assert sum(p.weights for p in parts) == whole.weights
    assert sum(p.kv for p in parts) == whole.kv
    tied = spec("t", replace(LLAMA3_8B, tie_embeddings=True))
    whole_t = whole_need(tied, 4096, BS)
    parts_t = [stage_need(tied, 4096, BS, a, b) for a, b in [(0, 16), (16, 32)]]
    embed_bytes = LLAMA3_8B.embed_params() * 2
    assert sum(p.weights for p in parts_t) == whole_t.weights + embed_bytes


def test_graphs_only_on_gpus_with_cuda_graphs() -> None:
    s = spec("a", max_batch=32)
    assert graph_batch_sizes(32) == (1, 2, 4, 8, 16, 32)
    assert whole_need(s, 4096, BS, on_gpu=True).graphs > 0
    assert whole_need(s, 4096, BS, on_gpu=False).graphs == 0
    assert whole_need(spec("b", cuda_graphs=False), 4096, BS).graphs == 0


def test_prompt_rows_add_graphs_and_rows_by_max_seq_len() -> None:
    """Short prompts ride the decode graphs (ModelConfig.prompt_rows): graphs for a full batch plus 16 .. 128 prompt
    rows, and activations and decode-attention workspace for those rows. Unset, only up to 16k tokens of context,
    where each row's workspace is small; set, at any length; 0 turns it off."""
    assert graph_step_sizes(8, 128) == (1, 2, 4, 8, 24, 40, 72, 136)
    assert graph_step_sizes(8, 100) == (1, 2, 4, 8, 24, 40, 72, 108)
    assert graph_step_sizes(8) == graph_batch_sizes(8)
    off = whole_need(spec("a", graph_prompt_tokens=0), 4096, BS).graphs
    on = whole_need(spec("a"), 4096, BS).graphs
    heads, parts = LLAMA3_8B.num_heads, 4096 // 256
    workspace = 128 * heads * parts * (2 + LLAMA3_8B.head_dim) * 4
    assert on - off > 4 * 2 * MiB + workspace  # four more graphs' executables, the rows' workspace, activations
    assert spec("b", max_seq_len=16384).config.prompt_rows == 128
    assert spec("c", max_seq_len=32768).config.prompt_rows == 0
    assert spec("d", max_seq_len=32768, graph_prompt_tokens=64).config.prompt_rows == 64
    long = whole_need(spec("e", max_seq_len=32768), 32768, BS).graphs
    assert long == whole_need(spec("f", max_seq_len=32768, graph_prompt_tokens=0), 32768, BS).graphs


def test_sm_steering_counts_the_confined_graphs_executables() -> None:
    """[host] sm_steering captures the batch sizes of up to 8 rows once more per SM level: 4 levels x (1, 2, 4, 8)
    graphs of 2 MiB each, in the plan of a GPU model, nothing on the CPU or for a split stage."""
    s = spec("a", max_batch=32)
    plain = whole_need(s, 4096, BS, on_gpu=True)
    assert steered_graphs(s, on_gpu=True) == 6 * 4 * 2 * MiB
    assert stage_need(s, 4096, BS, 0, 32, True, steered=True).graphs == plain.graphs + 48 * MiB
    assert stage_need(s, 4096, BS, 0, 32, False, steered=True).graphs == 0
    assert steered_graphs(s, on_gpu=True, split=True) == 0
    assert steered_graphs(spec("b", max_batch=2), on_gpu=True) == 6 * 2 * 2 * MiB  # sizes 1, 2
    on = by_name(plan([s], "1x80GiB", sm_steering=True))["a"].stages[0].need
    off = by_name(plan([s], "1x80GiB", sm_steering=False))["a"].stages[0].need
    assert on.graphs - off.graphs == 48 * MiB


def test_steered_graph_constants_follow_the_host() -> None:
    """The estimate's copies of what the host captures for steering (memory/ must not import host/): as many sets
    as an H100's or H200's 132 SMs get, at most as many on any GPU."""
    from llmhost.host.gpu_scheduler import CONCURRENT_MAX_ROWS
    from llmhost.host.sm_steering import FRACTIONS, confined_levels
    from llmhost.memory.estimate import STEERED_MAX_ROWS, STEERED_SETS

    assert STEERED_MAX_ROWS == CONCURRENT_MAX_ROWS
    assert STEERED_SETS == len(FRACTIONS) == len(confined_levels(132))
    assert all(len(confined_levels(n)) <= STEERED_SETS for n in range(1, 300))


def test_budget_is_total_minus_runtime_minus_reserve() -> None:
    inv = parse_gpu_spec("2x24GiB")
    budgets = make_budgets(inv, HostConfig(reserve=(GiB, 2 * GiB)))
    assert [b.runtime for b in budgets] == [DEFAULT_GPU_OVERHEAD] * 2
    assert [b.usable for b in budgets] == [
        24 * GiB - DEFAULT_GPU_OVERHEAD - GiB,
        24 * GiB - DEFAULT_GPU_OVERHEAD - 2 * GiB,
    ]
    external = Inventory((Device(0, "simulated", 24 * GiB, external=3 * GiB),), "simulated")
    (b,) = make_budgets(external, HostConfig())
    assert b.usable == 21 * GiB - DEFAULT_GPU_OVERHEAD


# -- parse_gpu_spec ------------------------------------------------------------------------------------------


def test_parse_gpu_spec() -> None:
    inv = parse_gpu_spec("2x24GiB,1x80GiB")
    assert inv.source == "simulated"
    assert inv.has_gpus
    assert [(d.index, d.total, d.kind) for d in inv.devices] == [
        (0, 24 * GiB, "cuda"),
        (1, 24 * GiB, "cuda"),
        (2, 80 * GiB, "cuda"),
    ]
    assert [d.label for d in inv.devices] == ["GPU 0", "GPU 1", "GPU 2"]
    assert [d.total for d in parse_gpu_spec("80GiB").devices] == [80 * GiB]
    assert [d.total for d in parse_gpu_spec(" 2 x 512MiB , 40GB ").devices] == [512 * MiB] * 2 + [40 * 10**9]


@pytest.mark.parametrize("bad", ["", ",", "2x24GiB,", "0x24GiB", "2x0GiB", "2x", "lots", "2x24 furlongs", "-1x8GiB"])
def test_parse_gpu_spec_rejects(bad: str) -> None:
    with pytest.raises(InventoryError, match="--gpus"):
        parse_gpu_spec(bad)


# -- placement -----------------------------------------------------------------------------------------------


def test_one_model_per_gpu_when_possible() -> None:
    specs = [spec(f"m{i}") for i in range(4)]
    p = plan(specs, "4x80GiB")  # all four would fit on one 80 GiB GPU; they are spread
    assert_plan_sound(p, specs)
    assert sorted(m.devices[0] for m in p.models) == [0, 1, 2, 3]
    small = [spec(f"s{i}", TINY) for i in range(3)]
    p = plan(small, "3x24GiB")
    assert sorted(m.devices[0] for m in p.models) == [0, 1, 2]


def test_more_models_than_gpus_stack_evenly() -> None:
    specs = [spec(f"m{i}", TINY) for i in range(5)]
    p = plan(specs, "2x24GiB")
    assert_plan_sound(p, specs)
    counts = sorted(len(p.stages_on(d)) for d in range(2))
    assert counts == [2, 3]


def test_larger_models_load_first() -> None:
    specs = [spec("tiny", TINY), spec("big")]
    p = plan(specs, "2x80GiB")
    assert [m.name for m in p.models] == ["big", "tiny"]
    specs = [spec("tiny", TINY, priority=1), spec("big")]
    assert [m.name for m in plan(specs, "2x80GiB").models] == ["tiny", "big"]


def test_pinning_is_respected() -> None:
    specs = [spec("a", gpus=(2,)), spec("b", gpus=(0,)), spec("c", TINY, gpus=(0,))]
    p = plan(specs, "3x80GiB")
    assert_plan_sound(p, specs)
    got = {m.name: m.devices for m in p.models}
    assert got == {"a": (2,), "b": (0,), "c": (0,)}  # c stacks on 0 although GPU 1 is empty


def test_pinning_to_a_missing_gpu_is_an_inventory_error() -> None:
    with pytest.raises(InventoryError) as info:
        plan([spec("a", gpus=(0, 5))], "2x24GiB")
    msg = str(info.value)
    assert "'a'" in msg
    assert "GPU 5 does not exist" in msg
    assert "GPUs 0-1" in msg
    with pytest.raises(InventoryError, match=r"GPU 1 does not exist \(there is GPU 0\)"):
        plan([spec("a", gpus=(1,))], "1x24GiB")


def test_70b_bf16_splits_over_two_80gib_gpus() -> None:
    s = spec("llama70", LLAMA3_70B)
    assert s.weight_bytes > 80 * GiB  # fits on no single GPU
    p = plan([s], "2x80GiB")
    assert_plan_sound(p, [s])
    (m,) = p.models
    assert m.devices == (0, 1)
    first, last = m.stages
    assert (first.start, last.end) == (0, 80)
    assert first.end == last.start
    # Balanced: the stages differ by less than one layer's weights and KV.
    one_layer = stage_need(s, m.kv_tokens, BS, 10, 11).weights + stage_need(s, m.kv_tokens, BS, 10, 11).kv
    assert abs(first.need.total - last.need.total) < one_layer
    for st_ in m.stages:
        assert st_.need.total <= p.budgets[st_.device].usable
    # Split stages hold the whole model's weights and KV between them.
    whole = whole_need(s, m.kv_tokens, BS)
    assert first.need.weights + last.need.weights == whole.weights
    assert first.need.kv + last.need.kv == whole.kv
    assert p.used_on(0) == first.need.total and p.used_on(1) == last.need.total


def test_70b_uses_the_fewest_gpus_and_leaves_the_rest() -> None:
    specs = [spec("llama70", LLAMA3_70B), spec("llama8")]
    p = plan(specs, "3x80GiB")
    assert_plan_sound(p, specs)
    got = by_name(p)
    assert len(got["llama70"].devices) == 2
    assert got["llama8"].devices[0] not in got["llama70"].devices


def test_70b_split_over_four_40gib_gpus() -> None:
    s = spec("llama70", LLAMA3_70B, max_seq_len=2048)
    p = plan([s], "4x40GiB")
    assert_plan_sound(p, [s])
    assert p.models[0].devices == (0, 1, 2, 3)  # 136 GiB: three GPUs of 39 GiB usable are not enough
    totals = [st_.need.total for st_ in p.models[0].stages]
    assert max(totals) - min(totals) < 2 * GiB
    # Three 60 GiB GPUs suffice: the fewest GPUs are used, the fourth stays free.
    p = plan([s], "4x60GiB")
    assert_plan_sound(p, [s])
    assert len(p.models[0].stages) == 3
    assert sum(p.used_on(d) == 0 for d in range(4)) == 1


def test_fill_takes_the_leftover() -> None:
    s = spec("a", kv_tokens="fill", max_seq_len=4096)
    p = plan([s], "1x24GiB")
    assert_plan_sound(p, [s])
    (m,) = p.models
    assert m.kv_tokens > 4096
    per_block = whole_need(s, BS, BS).kv
    assert 0 <= p.free_on(0) < per_block, "fill leaves less than one block unused"
    assert m.max_seq_len_fit <= m.kv_tokens


def test_fill_models_on_one_gpu_share_equally_and_fixed_ones_keep_their_pool() -> None:
    specs = [
        spec("f1", kv_tokens="fill", gpus=(0,)),
        spec("f2", kv_tokens="fill", gpus=(0,)),
        spec("fixed", TINY, kv_tokens=4096, gpus=(0,)),
    ]
    p = plan(specs, "1x80GiB")
    assert_plan_sound(p, specs)
    got = by_name(p)
    assert got["fixed"].kv_tokens == 4096
    assert abs(got["f1"].kv_tokens - got["f2"].kv_tokens) <= BS
    assert got["f1"].kv_tokens > 100_000
    assert p.free_on(0) < 2 * whole_need(specs[0], BS, BS).kv


def test_block_size_comes_from_the_host_config() -> None:
    p = plan([spec("a", kv_tokens=1000)], "1x80GiB", block_size=64)
    assert p.block_size == 64
    assert (p.models[0].kv_blocks, p.models[0].kv_tokens) == (16, 1024)


# -- max_seq_len_fit -----------------------------------------------------------------------------------------


def test_max_seq_len_fit_is_the_largest_that_fits() -> None:
    s = spec("a", max_seq_len=4096, max_batch=8)
    p = plan([s], "1x24GiB")
    (m,) = p.models
    assert m.fit_limited_by == "memory"
    fit = m.max_seq_len_fit
    assert 4096 < fit < LLAMA3_8B.max_position_embeddings
    # Re-planning at the answer fits (default kv_tokens = max_seq_len x max_batch); one block more does not.
    at_fit = plan([spec("a", max_seq_len=fit, max_batch=8)], "1x24GiB")
    assert at_fit.free_on(0) >= 0
    infeasible([spec("a", max_seq_len=fit + BS, max_batch=8)], "1x24GiB")
    infeasible([spec("a", max_seq_len=fit + 1, max_batch=8)], "1x24GiB")


def test_max_seq_len_fit_for_a_split_model() -> None:
    s = spec("llama70", LLAMA3_70B)
    fit = plan([s], "2x80GiB").models[0].max_seq_len_fit
    assert fit > 4096
    plan([spec("llama70", LLAMA3_70B, max_seq_len=fit)], "2x80GiB")
    infeasible([spec("llama70", LLAMA3_70B, max_seq_len=fit + BS)], "2x80GiB")


def test_max_seq_len_fit_limited_by_the_model() -> None:
    (m,) = plan([spec("t", TINY)], "1x24GiB").models
    assert (m.max_seq_len_fit, m.fit_limited_by) == (8192, "model")


def test_max_seq_len_beyond_the_models_context_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="exceeds the model's context length 8192"):
        plan([spec("t", TINY, max_seq_len=8193)], "1x24GiB")


def test_max_seq_len_fit_limited_by_explicit_kv_tokens() -> None:
    (m,) = plan([spec("a", kv_tokens=8192, max_seq_len=4096)], "1x80GiB").models
    assert (m.max_seq_len_fit, m.fit_limited_by) == (8192, "kv_tokens")


# -- infeasible plans ----------------------------------------------------------------------------------------

REMEDY_SEQ = re.compile(r"max_seq_len = (\d+) fits")
REMEDY_BATCH = re.compile(r"max_batch = (\d+) fits")


def remedy_value(pattern: re.Pattern[str], remedies: Sequence[str]) -> int | None:
    for r in remedies:
        m = pattern.search(r)
        if m:
            return int(m.group(1))
    return None


def test_infeasible_names_gpu_shortfall_and_remedies_that_fit() -> None:
    s = spec("a", max_seq_len=32768, max_batch=8)
    err = infeasible([s], "1x24GiB")
    assert isinstance(err, PlanInfeasibleError)
    assert err.exit_code == 3
    sf = err.shortfall
    assert sf.model == "a"
    assert sf.where == "GPU 0"
    assert sf.available == 23 * GiB
    assert sf.need == whole_need(s, 32768 * 8, BS).total
    assert sf.short_by == sf.need - sf.available > 0
    msg = str(err)
    assert "'a'" in msg and "GPU 0" in msg and "short by" in msg and "Remedies:" in msg
    assert f"{sf.short_by / GiB:.2f} GiB" in msg
    seq = remedy_value(REMEDY_SEQ, sf.remedies)
    batch = remedy_value(REMEDY_BATCH, sf.remedies)
    assert seq is not None and batch is not None, sf.remedies
    plan([spec("a", max_seq_len=seq, max_batch=8)], "1x24GiB")
    infeasible([spec("a", max_seq_len=seq + 1, max_batch=8)], "1x24GiB")
    plan([spec("a", max_seq_len=32768, max_batch=batch)], "1x24GiB")
    infeasible([spec("a", max_seq_len=32768, max_batch=batch + 1)], "1x24GiB")


def test_infeasible_without_parameter_remedies_says_what_else_to_do() -> None:
    err = infeasible([spec("a", dtype="float32")], "1x24GiB")
    assert err.shortfall.remedies == ("use a smaller dtype or model, or a device with more memory",)


def test_pinned_too_small_suggests_a_gpu_with_room() -> None:
    specs = [spec("a", gpus=(0,))]
    err = infeasible(specs, "1x16GiB,1x80GiB")
    assert err.shortfall.where == "GPU 0"
    assert any("GPU 1 has room" in r for r in err.shortfall.remedies), err.shortfall.remedies
    plan([spec("a", gpus=(1,))], "1x16GiB,1x80GiB")


def test_split_that_does_not_fit_names_the_gpus_together() -> None:
    err = infeasible([spec("llama70", LLAMA3_70B)], "2x40GiB")
    sf = err.shortfall
    assert sf.where == "GPUs 0-1 together"
    assert sf.short_by > 0
    assert "GPUs 0-1 together" in str(err)
    seq = remedy_value(REMEDY_SEQ, sf.remedies)
    if seq is not None:
        plan([spec("llama70", LLAMA3_70B, max_seq_len=seq)], "2x40GiB")
    err = infeasible([spec("llama70", LLAMA3_70B, dtype="float32")], "2x80GiB")
    assert err.shortfall.remedies == ("use a smaller dtype or model, or more GPUs",)


# Regression tests for bugs found while writing these tests (fixed in the planner since).


@pytest.mark.parametrize(
    ("shape", "gpus"),
    [
        # One layer cannot be split over two GPUs, although together they have room for it.
        (replace(LLAMA3_8B, num_layers=1, intermediate_size=8 * 14336), "2x5GiB"),
        # Three ~5.5 GiB layers over two GPUs with 12 GiB usable each: 24 GiB is enough in sum, but one GPU
        # would have to hold two layers.
        (
            replace(LLAMA3_8B, num_layers=3, hidden_size=8192, num_heads=64, intermediate_size=4 * 28672),
            "2x13GiB",
        ),
    ],
)
def test_failed_split_reports_a_positive_shortfall(shape: ModelShape, gpus: str) -> None:
    """Was: 'short by -2.66 GiB' (need = whole model + workspace per stage, ignoring layer granularity)."""
    err = infeasible([spec("a", shape, max_seq_len=1024, max_batch=1)], gpus)
    assert err.shortfall.short_by > 0, str(err)
    assert "short by -" not in str(err)
    assert "short by 0.00" not in str(err)


RESERVE_REMEDY = re.compile(r"lower \[host\] reserve on GPU 0 from ([\d.]+ ?\w+) to ([\d.]+ ?\w+)")


def reserve_remedy(remedies: Sequence[str]) -> tuple[int, int]:
    """(current, suggested) reserve in bytes, as printed."""
    for r in remedies:
        m = RESERVE_REMEDY.search(r)
        if m:
            return parse_size(m.group(1).replace(" ", "")), parse_size(m.group(2).replace(" ", ""))
    raise AssertionError(f"no reserve remedy in {remedies}")


def test_reserve_remedy_exact_value_fits() -> None:
    s = spec("a")
    err = infeasible([s], "1x24GiB", reserve=(6 * GiB,))
    sf = err.shortfall
    assert 0 < sf.short_by < 6 * GiB
    current, suggested = reserve_remedy(sf.remedies)
    assert current == 6 * GiB
    assert suggested <= 6 * GiB - sf.short_by
    plan([s], "1x24GiB", reserve=(6 * GiB - sf.short_by,))
    infeasible([s], "1x24GiB", reserve=(6 * GiB - sf.short_by + 1,))


@pytest.mark.parametrize("total_mib", [24576, 24590, 24611, 24618, 24632])
def test_reserve_remedy_as_printed_fits(total_mib: int) -> None:
    """Was: rounded to nearest by fmt_bytes, e.g. "to 3.99 GiB" where 3.988 GiB was the most that fits."""
    s = spec("a")
    gpus = f"1x{total_mib}MiB"
    err = infeasible([s], gpus, reserve=(6 * GiB,))
    _, suggested = reserve_remedy(err.shortfall.remedies)
    plan([s], gpus, reserve=(suggested,))


REMEDY_KV = re.compile(r"kv_tokens = (\d+) fits")


def test_remedies_with_explicit_kv_tokens_fit() -> None:
    """Was: 'max_seq_len = 4095 fits' although an explicit pool keeps its size whatever max_seq_len is."""
    s = spec("a", kv_tokens=200_000, max_seq_len=4096, max_batch=8)
    err = infeasible([s], "1x24GiB")
    remedies = err.shortfall.remedies
    kv = remedy_value(REMEDY_KV, remedies)
    assert kv is not None, remedies
    plan([spec("a", kv_tokens=kv, max_seq_len=4096, max_batch=8)], "1x24GiB")
    infeasible([spec("a", kv_tokens=kv + BS, max_seq_len=4096, max_batch=8)], "1x24GiB")
    seq = remedy_value(REMEDY_SEQ, remedies)
    batch = remedy_value(REMEDY_BATCH, remedies)
    if seq is not None:
        plan([spec("a", kv_tokens=200_000, max_seq_len=seq, max_batch=8)], "1x24GiB")
    if batch is not None:
        plan([spec("a", kv_tokens=200_000, max_seq_len=4096, max_batch=batch)], "1x24GiB")


def test_gpu_smaller_than_runtime_overhead_reports_no_negative_free() -> None:
    """Was: 'GPU 0 has -824.0 MiB free'."""
    err = infeasible([spec("t", TINY)], "1x200MiB")
    assert err.shortfall.available >= 0
    assert err.shortfall.short_by > 0
    assert "has -" not in str(err)


def test_unused_small_gpu_has_no_negative_budget() -> None:
    p = plan([spec("t", TINY)], "1x24GiB,1x512MiB")
    assert p.models[0].devices == (0,)
    assert p.budgets[1].usable == 0
    assert p.free_on(1) == 0


# -- speed ---------------------------------------------------------------------------------------------------


def test_ten_8b_models_on_eight_80gib_gpus_speed() -> None:
    specs = [spec(f"llama8-{i}") for i in range(10)]
    inv = parse_gpu_spec("8x80GiB")
    t0 = time.perf_counter()
    p = plan_models(specs, inv, HostConfig(sm_steering=False))
    elapsed_ms = (time.perf_counter() - t0) * 1000
    print(f"plan 10 Llama-3-8B on 8x80GiB: {elapsed_ms:.2f} ms")
    assert_plan_sound(p, specs)
    counts = sorted(len(p.stages_on(d)) for d in range(8))
    assert counts == [1] * 6 + [2] * 2


# -- properties on small random shapes -----------------------------------------------------------------------


@st.composite
def shapes(draw: st.DrawFn) -> ModelShape:
    kv_heads = draw(st.sampled_from([1, 2, 4, 8]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([32, 64, 128]))
    layers = draw(st.integers(1, 12))
    sliding = draw(st.booleans())
    return ModelShape(
        architecture="llama",
        num_layers=layers,
        hidden_size=draw(st.sampled_from([256, 1024, 2048, 4096, 8192])),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=draw(st.sampled_from([512, 4096, 14336, 28672])),
        vocab_size=draw(st.sampled_from([1000, 32000, 128256])),
        tie_embeddings=draw(st.booleans()),
        max_position_embeddings=draw(st.sampled_from([65536, 131072])),
        sliding_window=4096 if sliding else None,
        layer_types=every_nth_full(layers, 2) if sliding else (),
    )


@st.composite
def scenarios(
    draw: st.DrawFn, kv_choices: Sequence[int | str | None] = (None,), max_models: int = 4
) -> tuple[list[ModelSpec], str, HostConfig]:
    gpu_mib = draw(st.lists(st.integers(1024, 40 * 1024), min_size=1, max_size=3))
    n_gpus = len(gpu_mib)
    specs = []
    for i in range(draw(st.integers(1, max_models))):
        pinned = draw(st.one_of(st.none(), st.sets(st.integers(0, n_gpus - 1), min_size=1)))
        cfg: dict[str, Any] = {
            "max_seq_len": draw(st.sampled_from([16, 100, 1024, 4096, 16384, 65536])),
            "max_batch": draw(st.integers(1, 64)),
            "dtype": draw(st.sampled_from(["bfloat16", "float32"])),
            "gpus": tuple(sorted(pinned)) if pinned is not None else None,
            "kv_tokens": draw(st.sampled_from(kv_choices)),
            "cuda_graphs": draw(st.booleans()),
        }
        specs.append(spec(f"m{i}", draw(shapes()), **cfg))
    reserve = draw(st.sampled_from([0, 256 * MiB, GiB]))
    spec_str = ",".join(f"{m}MiB" for m in gpu_mib)
    return specs, spec_str, HostConfig(reserve=(reserve,), sm_steering=False)


def single_assignment_exists(specs: Sequence[ModelSpec], gpus: str, host: HostConfig) -> bool:
    inv = parse_gpu_spec(gpus)
    usable = [d.total - runtime_overhead(d) - host.reserve_for(d.index) for d in inv.devices]
    options = [s.config.gpus if s.config.gpus is not None else range(len(usable)) for s in specs]
    needs = [whole_need(s, default_kv_tokens(s.config), host.block_size).total for s in specs]
    for assignment in itertools.product(*options):
        used = [0] * len(usable)
        for d, need in zip(assignment, needs, strict=True):
            used[d] += need
        if all(u <= cap for u, cap in zip(used, usable, strict=True)):
            return True
    return False


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(scenarios(kv_choices=(None, None, "fill", 4096, 100_000)))
def test_property_a_plan_never_exceeds_usable_memory(case: tuple[list[ModelSpec], str, HostConfig]) -> None:
    specs, gpus, host = case
    try:
        p = plan_models(specs, parse_gpu_spec(gpus), host)
    except PlanInfeasible as e:
        assert e.shortfall.short_by > 0
        assert e.shortfall.available >= 0
        assert e.shortfall.remedies
        return
    assert_plan_sound(p, specs)
    for d, b in enumerate(p.budgets):
        assert p.used_on(d) <= b.usable


@PROPERTY
@given(scenarios())
def test_property_b_feasible_single_assignment_is_found(
    case: tuple[list[ModelSpec], str, HostConfig],
) -> None:
    specs, gpus, host = case
    if not single_assignment_exists(specs, gpus, host):
        return
    p = plan_models(specs, parse_gpu_spec(gpus), host)  # must not raise PlanInfeasible
    assert_plan_sound(p, specs)


@settings(max_examples=60, deadline=None)
@given(scenarios(kv_choices=(None, None, "fill", 4096, 100_000), max_models=1))
def test_property_remedies_fit_when_re_planned(case: tuple[list[ModelSpec], str, HostConfig]) -> None:
    specs, gpus, host = case
    (s,) = specs
    try:
        plan_models(specs, parse_gpu_spec(gpus), host)
        return
    except PlanInfeasible as e:
        remedies = e.shortfall.remedies
    seq = remedy_value(REMEDY_SEQ, remedies)
    batch = remedy_value(REMEDY_BATCH, remedies)
    if seq is not None:
        plan_models([replace(s, config=replace(s.config, max_seq_len=seq))], parse_gpu_spec(gpus), host)
    kv = remedy_value(REMEDY_KV, remedies)
    if batch is not None:
        plan_models([replace(s, config=replace(s.config, max_batch=batch))], parse_gpu_spec(gpus), host)
    if kv is not None:
        plan_models([replace(s, config=replace(s.config, kv_tokens=kv))], parse_gpu_spec(gpus), host)


@settings(max_examples=80, deadline=None)
@given(scenarios(max_models=1))
def test_property_max_seq_len_fit_re_plans(case: tuple[list[ModelSpec], str, HostConfig]) -> None:
    """The reported largest max_seq_len is feasible when configured; on one GPU, one token more is not."""
    specs, gpus, host = case
    (s,) = specs
    try:
        p = plan_models(specs, parse_gpu_spec(gpus), host)
    except PlanInfeasible:
        return
    (m,) = p.models
    # max_seq_len above the model's context length is accepted as is; the fit is then the context length.
    assert m.max_seq_len_fit >= min(s.config.max_seq_len, s.shape.max_position_embeddings)
    if m.fit_limited_by != "memory":
        return
    fit = m.max_seq_len_fit
    plan_models([replace(s, config=replace(s.config, max_seq_len=fit))], parse_gpu_spec(gpus), host)
    if len(p.budgets) == 1:
        with pytest.raises(PlanInfeasible):
            plan_models([replace(s, config=replace(s.config, max_seq_len=fit + 1))], parse_gpu_spec(gpus), host)


@settings(max_examples=80, deadline=None)
@given(scenarios(kv_choices=("fill", "fill", None, 4096)))
def test_property_fill_leaves_less_than_a_block_per_filler(
    case: tuple[list[ModelSpec], str, HostConfig],
) -> None:
    specs, gpus, host = case
    try:
        p = plan_models(specs, parse_gpu_spec(gpus), host)
    except PlanInfeasible:
        return
    named = {s.name: s for s in specs}
    for d in range(len(p.budgets)):
        fillers = [m for m, _ in p.stages_on(d) if named[m.name].config.kv_tokens == "fill" and len(m.stages) == 1]
        for m in fillers:
            assert m.kv_tokens >= named[m.name].config.max_seq_len
        # Sliding layers stop growing, so a filler with them can leave more; the bound is for full attention.
        if not fillers or any(named[m.name].shape.sliding_window for m in fillers):
            continue
        per_block = max(whole_need(named[m.name], BS, BS).kv for m in fillers)
        assert p.free_on(d) < len(fillers) * per_block
