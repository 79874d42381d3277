"""Which SDPA backend serves a chunked-prefill shape (q shorter than k, lower-right causal), and at what memory."""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

H, KVH, D, L, C = 32, 8, 128, 1024, 8192
dev = "cuda"
q = torch.randn(1, H, L, D, device=dev, dtype=torch.bfloat16)
k = torch.randn(1, KVH, C, D, device=dev, dtype=torch.bfloat16)
v = torch.randn_like(k)
ke, ve = k.repeat_interleave(H // KVH, 1), v.repeat_interleave(H // KVH, 1)


def peak(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        out = fn()
        torch.cuda.synchronize()
        ref = out
    except Exception as e:
        return f"error: {str(e)[:80]}", None
    return f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MiB", ref


mask = causal_lower_right(L, C)
cases = {
    "4d expanded, causal_lower_right, default": lambda: F.scaled_dot_product_attention(q, ke, ve, attn_mask=mask),
    "3d expanded, causal_lower_right, default": lambda: F.scaled_dot_product_attention(
        q[0], ke[0], ve[0], attn_mask=mask
    ),
    "4d gqa, causal_lower_right": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
    "4d gqa, bool mask": lambda: F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.ones(L, C, dtype=torch.bool, device=dev).tril(C - L), enable_gqa=True
    ),
    "4d expanded, bool mask": lambda: F.scaled_dot_product_attention(
        q, ke, ve, attn_mask=torch.ones(L, C, dtype=torch.bool, device=dev).tril(C - L)
    ),
}
for backend in (None, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
    for name, fn in cases.items():
        if backend is None:
            r, _ = peak(fn)
        else:
            with sdpa_kernel([backend]):
                r, _ = peak(fn)
        print(f"{backend!s:40s} {name:45s} {r}")
# decode shape: q_len 1
q1 = q[:, :, :1]
for name, fn in {
    "decode 4d gqa no mask": lambda: F.scaled_dot_product_attention(q1, k, v, enable_gqa=True),
    "decode 4d expanded no mask": lambda: F.scaled_dot_product_attention(q1, ke, ve),
}.items():
    print(f"{'default':40s} {name:45s} {peak(fn)[0]}")
