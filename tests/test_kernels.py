"""Triton kernels against their torch references. Without a GPU they run under Triton's interpreter
(TRITON_INTERPRET=1, set in conftest.py), which executes the same kernel code with numpy on the CPU;
bench/kernels_check.py runs the same comparisons compiled on the GPU."""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from llmhost.engine.attention import write_kv  # noqa: E402
from llmhost.engine.kernels.fused import add_rms_norm, rms_norm, rope_write_kv, silu_mul  # noqa: E402
from llmhost.engine.kernels.gemv import linear, uses_triton  # noqa: E402
from llmhost.engine.kernels.paged_decode import DecodeWorkspace, paged_decode_attention  # noqa: E402
from llmhost.engine.model import rms_norm as rms_norm_ref  # noqa: E402
from llmhost.engine.rope import apply_rope, cos_sin, inv_frequencies  # noqa: E402


def reference_decode(
    q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor
) -> torch.Tensor:
    _, heads, d = q.shape
    bs, kvh = kc.shape[1], kc.shape[2]
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        n = int(lens[b])
        blocks = tables[b, : math.ceil(n / bs)].long()
        k = kc[blocks].reshape(-1, kvh, d)[:n].repeat_interleave(heads // kvh, dim=1).double()
        v = vc[blocks].reshape(-1, kvh, d)[:n].repeat_interleave(heads // kvh, dim=1).double()
        s = torch.einsum("hd,nhd->hn", q[b].double(), k) * d**-0.5
        out[b] = torch.einsum("hn,nhd->hd", s.softmax(-1), v).to(q.dtype)
    return out


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 2, 64), (6, 6, 32), (5, 1, 64)])
def test_paged_decode_matches_reference(heads: int, kv_heads: int, head_dim: int) -> None:
    g = torch.Generator().manual_seed(heads)
    bs, nb = 16, 160
    kc = torch.randn(nb, bs, kv_heads, head_dim, generator=g)
    vc = torch.randn(nb, bs, kv_heads, head_dim, generator=g)
    lens = torch.tensor([1, 17, 600, 1100], dtype=torch.int32)  # one token, a partial block, several partitions
    tables = torch.stack([torch.randperm(nb, generator=g)[:80] for _ in range(4)]).int()
    q = torch.randn(4, heads, head_dim, generator=g)
    ws = DecodeWorkspace(4, heads, head_dim, 1280, torch.device("cpu"))
    out = paged_decode_attention(q, kc, vc, tables, lens, head_dim**-0.5, ws, out=torch.full_like(q, float("nan")))
    torch.testing.assert_close(out, reference_decode(q, kc, vc, tables, lens), atol=1e-5, rtol=1e-5)


def test_add_rms_norm_and_rms_norm_match_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x, res, w = torch.randn(3, 100, generator=g), torch.randn(3, 100, generator=g), torch.randn(100, generator=g)
    expected_res = res + x
    out = add_rms_norm(x, res, w, 1e-6)
    torch.testing.assert_close(res, expected_res)
    torch.testing.assert_close(out, rms_norm_ref(expected_res, w, 1e-6), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), atol=1e-5, rtol=1e-5)


def test_silu_mul_matches_reference() -> None:
    gu = torch.randn(3, 2 * 1500, generator=torch.Generator().manual_seed(1))
    gate, up = gu.chunk(2, dim=-1)
    torch.testing.assert_close(silu_mul(gu), torch.nn.functional.silu(gate) * up, atol=1e-6, rtol=1e-5)


def test_rope_write_kv_matches_reference() -> None:
    g = torch.Generator().manual_seed(2)
    heads, kvh, d, t = 4, 2, 32, 5
    qkv = torch.randn(t, (heads + 2 * kvh) * d, generator=g)
    positions = torch.tensor([0, 3, 7, 100, 4000])
    slots = torch.tensor([5, 9, 0, 17, 33])
    inv = inv_frequencies(d, 10000.0, None)
    kc, vc = torch.zeros(8, 8, kvh, d), torch.zeros(8, 8, kvh, d)
    q, k, v = torch.split(qkv.clone(), [heads * d, kvh * d, kvh * d], dim=-1)
    cos, sin = cos_sin(positions, inv, torch.float32)
    q_ref = apply_rope(q.reshape(t, heads, d), cos, sin)
    k_ref = apply_rope(k.reshape(t, kvh, d), cos, sin)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    write_kv(kc_ref, vc_ref, k_ref, v.reshape(t, kvh, d), slots)
    rope_write_kv(qkv, positions, inv, slots, kc, vc, heads, kvh)
    torch.testing.assert_close(qkv[:, : heads * d].reshape(t, heads, d), q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kc, kc_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vc, vc_ref)


@pytest.mark.parametrize(
    ("m", "n", "k"),
    [(1, 40, 96), (1, 24, 1100), (3, 70, 96), (16, 33, 520), (40, 25700, 64), (40, 100, 64)],
)  # GEMV, a K that is no multiple of its tile, tensor-core tiles of 16 rows, a wide and a narrow 40-row product
def test_linear_matches_matmul(m: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(m * n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    out = linear(x, w, out=torch.full((m, n), float("nan")))
    torch.testing.assert_close(out, x @ w.t(), atol=1e-4, rtol=1e-4)
    assert uses_triton(m, n) == (m <= 16 or n == 25700)


def test_linear_float32_output_rounds_like_the_reference() -> None:
    """Float32 logits from bf16 inputs: the product rounds to bf16 first, as `F.linear(...).float()` does."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(1, 256, generator=g).bfloat16(), torch.randn(48, 256, generator=g).bfloat16()
    out = linear(x, w, out=torch.empty(1, 48))
    ref = (x.float() @ w.float().t()).bfloat16().float()
    assert torch.equal(out.bfloat16().float(), out)  # every value is a bf16 value
    torch.testing.assert_close(out, ref, atol=0.0, rtol=1e-2)


def test_hold_kernel_passes_at_its_ticket_and_gives_up_after_max_polls() -> None:
    """The stream gate's hold (engine/stream_gate.py): open at once when the flag has reached its ticket; closed,
    it reads the flag MAX_POLLS times and lets the stream go on (a missed release must not hang a stream)."""
    from llmhost.engine.kernels.hold import hold_kernel

    flag, polls = torch.tensor([5], dtype=torch.int32), torch.full((1,), -1, dtype=torch.int32)
    hold_kernel[(1,)](flag, polls, 5, MAX_POLLS=16)
    assert int(polls) == 0
    hold_kernel[(1,)](flag, polls, 6, MAX_POLLS=16)
    assert int(polls) == 16
