"""KVCache: the paged pool's tensors, allocated once from the plan's block count."""

from __future__ import annotations

import torch

from llmhost.model_files.shape import ModelShape


class KVCache:
    def __init__(
        self, shape: ModelShape, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        # One allocation for all layers, K and V: [2, layers, blocks, block_size, kv_heads, head_dim]. Its size
        # is exactly the estimate's kv term: blocks x block_size x 2 x layers x kv_heads x head_dim x bytes.
        self.storage = torch.zeros(
            (2, shape.num_layers, num_blocks, block_size, shape.num_kv_heads, shape.head_dim),
            dtype=dtype,
            device=device,
        )
        self.k = self.storage[0]
        self.v = self.storage[1]

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()
