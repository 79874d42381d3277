"""The GPU decode path (fused Triton kernels, static buffers) against the reference forward. On a CPU the
kernels run under Triton's interpreter and the step runs without graph capture; bench/decode.py checks the
captured graphs on the GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
transformers = pytest.importorskip("transformers")

from llmhost.engine.attention import AttentionBatch, ChunkMeta  # noqa: E402
from llmhost.engine.block_manager import blocks_for  # noqa: E402
from llmhost.engine.decode_runner import DecodeRow, DecodeRunner  # noqa: E402
from llmhost.engine.kv_cache import KVCache  # noqa: E402
from llmhost.engine.model import LlamaModel  # noqa: E402
from llmhost.engine.weights import iter_weights  # noqa: E402
from llmhost.model_files import open_checkpoint  # noqa: E402

ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 16}),
}


def build(arch: str, tmp: Path) -> LlamaModel:
    cfg_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(0)
    cfg = cfg_cls(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False, **extra,
    )  # fmt: skip
    model_cls(cfg).save_pretrained(tmp)
    ckpt = open_checkpoint(tmp)
    model = LlamaModel(ckpt.shape, torch.float32, torch.device("cpu"), 256)
    model.load(iter_weights(ckpt, torch.float32, torch.device("cpu")), str(tmp))
    return model


def prefill(model: LlamaModel, cache: KVCache, prompts: list[list[int]], tables: list[tuple[int, ...]]) -> None:
    """Each prompt's K/V into its blocks of `cache`, by the reference forward."""
    bs = cache.block_size
    for p, t in zip(prompts, tables, strict=True):
        n = len(p)
        slots = torch.tensor([t[i // bs] * bs + i % bs for i in range(n)])
        meta = ChunkMeta(0, n, n, torch.tensor(t[: blocks_for(n, bs)]))
        model.forward(torch.tensor(p), torch.arange(n), AttentionBatch(slots, (meta,)), cache, torch.tensor([n - 1]))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_decode_step_matches_reference_forward(arch: str, tmp_path: Path) -> None:
    model = build(arch, tmp_path)
    bs = 8
    cache = KVCache(model.shape, 33, bs, torch.float32, torch.device("cpu"))  # block 32 is the runner's scratch
    runner = DecodeRunner(model, cache, max_batch=4, max_seq_len=128)
    g = torch.Generator().manual_seed(1)
    lengths = [5, 17, 9]  # three sequences, prefilled by the reference path
    tables = [tuple(range(i * 10, i * 10 + blocks_for(n + 1, bs))) for i, n in enumerate(lengths)]
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in lengths]
    prefill(model, cache, prompts, tables)
    nxt = [int(x) for x in torch.randint(0, 128, (3,), generator=g)]
    rows = [DecodeRow(tok, len(p), t) for tok, p, t in zip(nxt, prompts, tables, strict=True)]
    saved_k, saved_v = cache.k.clone(), cache.v.clone()
    ours = runner.run(rows).clone()
    # The step wrote exactly the three new tokens' slots and the scratch block (the padded fourth row).
    written = {r.block_table[r.position // bs] * bs + r.position % bs for r in rows}
    changed = {
        slot
        for slot in range(33 * bs)
        if not torch.equal(cache.k[:, slot // bs, slot % bs], saved_k[:, slot // bs, slot % bs])
    }
    assert changed - set(range(32 * bs, 33 * bs)) == written
    # The reference decodes the same tokens from the same cache contents.
    cache.k.copy_(saved_k)
    cache.v.copy_(saved_v)
    slots = torch.tensor([r.block_table[r.position // bs] * bs + r.position % bs for r in rows])
    metas = tuple(
        ChunkMeta(i, 1, r.position + 1, torch.tensor(r.block_table[: blocks_for(r.position + 1, bs)]))
        for i, r in enumerate(rows)
    )
    ref = model.forward(
        torch.tensor(nxt), torch.tensor([r.position for r in rows]), AttentionBatch(slots, metas), cache,
        torch.arange(3),
    )  # fmt: skip
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fused_forward_matches_reference_forward(arch: str, tmp_path: Path) -> None:
    """The GPU's prefill path (fused norm, RoPE + KV write, SiLU x up; model.fused) against the reference ops: two
    prompts in one step, then a second chunk of the first that attends to the first chunk's cached K/V."""
    model = build(arch, tmp_path)
    bs = 8
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 128, (n,), generator=g) for n in (13, 6)]
    tables = [tuple(range(0, 4)), tuple(range(4, 6))]
    logits, caches = [], []
    for fused in (False, True):
        model.fused = fused
        cache = KVCache(model.shape, 8, bs, torch.float32, torch.device("cpu"))
        ids, pos, slots, metas, start = [], [], [], [], 0
        for p, t in zip(prompts, tables, strict=True):
            n = 9 if len(p) == 13 else len(p)  # the first prompt's first chunk only
            ids.append(p[:n])
            pos.append(torch.arange(n))
            slots.append(torch.tensor([t[i // bs] * bs + i % bs for i in range(n)]))
            metas.append(ChunkMeta(start, n, n, torch.tensor(t[: blocks_for(n, bs)])))
            start += n
        first = model.forward(
            torch.cat(ids), torch.cat(pos), AttentionBatch(torch.cat(slots), tuple(metas)), cache,
            torch.tensor([8, 14]),
        )  # fmt: skip
        rest = torch.arange(9, 13)  # the second chunk reads the first chunk's K/V from the cache
        meta = ChunkMeta(0, 4, 13, torch.tensor(tables[0][:2]))
        second = model.forward(
            prompts[0][9:], rest, AttentionBatch(torch.tensor([tables[0][i // bs] * bs + i % bs for i in rest]),
            (meta,)), cache, torch.tensor([3]),
        )  # fmt: skip
        logits.append(torch.cat([first, second]))
        caches.append(cache)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(caches[1].k, caches[0].k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[1].v, caches[0].v, atol=1e-5, rtol=1e-5)


def test_prompt_rows_are_a_causal_prefill_beside_decode_rows(tmp_path: Path) -> None:
    """A step of two decode rows and a 6-token prompt (two of its tokens cached already) run as rows of one decode
    step (ModelConfig.graph_prompt_tokens): the rows that sample (the decodes, then the prompt's last token) get
    the logits the reference forward gives the same chunks, and every row's K/V lands in its slot."""
    model = build("llama", tmp_path)
    bs = 4
    cache = KVCache(model.shape, 17, bs, torch.float32, torch.device("cpu"))  # block 16 is the runner's scratch
    runner = DecodeRunner(model, cache, max_batch=4, max_seq_len=64, prompt_tokens=8)
    assert runner.rows == 12 and max(runner.sizes) == 12
    g = torch.Generator().manual_seed(3)
    lengths = [5, 9, 2]  # the third is the prompt's cached beginning
    tables = [(0, 1), (2, 3, 4), (5, 6)]
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in lengths]
    prefill(model, cache, prompts, tables)
    nxt = [int(x) for x in torch.randint(0, 128, (2,), generator=g)]
    rest = torch.randint(0, 128, (4,), generator=g).tolist()  # the prompt's positions 2..5
    decode = [DecodeRow(tok, len(p), t) for tok, p, t in zip(nxt, prompts[:2], tables[:2], strict=True)]
    last = DecodeRow(rest[-1], 5, tables[2])
    others = [DecodeRow(tok, 2 + i, tables[2]) for i, tok in enumerate(rest[:-1])]
    saved_k, saved_v = cache.k.clone(), cache.v.clone()
    ours = runner.run([*decode, last, *others])[:3].clone()  # rows that sample come first; max_batch get logits
    ours_k, ours_v = cache.k.clone(), cache.v.clone()
    cache.k.copy_(saved_k)
    cache.v.copy_(saved_v)
    chunks = [(nxt[0], 5, 0), (nxt[1], 9, 1)]
    ids = [c[0] for c in chunks] + rest
    pos = [c[1] for c in chunks] + [2, 3, 4, 5]
    slots = torch.tensor(
        [tables[k][p // bs] * bs + p % bs for k, p in [(0, 5), (1, 9), (2, 2), (2, 3), (2, 4), (2, 5)]]
    )
    metas = (
        ChunkMeta(0, 1, 6, torch.tensor(tables[0][: blocks_for(6, bs)])),
        ChunkMeta(1, 1, 10, torch.tensor(tables[1][: blocks_for(10, bs)])),
        ChunkMeta(2, 4, 6, torch.tensor(tables[2][: blocks_for(6, bs)])),
    )
    ref = model.forward(
        torch.tensor(ids), torch.tensor(pos), AttentionBatch(slots, metas), cache, torch.tensor([0, 1, 5])
    )
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    real = slice(0, 16)  # the scratch block (16) holds the padded rows' writes
    torch.testing.assert_close(ours_k[:, real], cache.k[:, real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_v[:, real], cache.v[:, real], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="13 rows"):
        runner.run([*decode, last, *others] * 2 + [last])
