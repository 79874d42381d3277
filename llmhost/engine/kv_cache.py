"""KVCache: the paged pools' tensors, allocated once from the plan's block counts.

Full-attention layers share the full pool (`num_blocks`); sliding-window layers, when the model declares a window,
share the window pool (`window_blocks`, capped at max_batch windows: memory/estimate.py `sliding_kv_blocks`), whose
block tables the engine keeps apart (block_manager.py). `k[i]`, `v[i]` are layer i's views into its pool.
"""

from __future__ import annotations

import torch

from llmhost.model_files.shape import ModelShape


class KVCache:
    def __init__(
        self,
        shape: ModelShape,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        window_blocks: int | None = None,
    ) -> None:
        """window_blocks: the window pool's size; None makes it as large as the full pool (no cap)."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Layers whose KV lives in the window pool. A "sliding" layer without a window attends to everything and
        # lives in the full pool.
        self.window_layers = shape.layers_of_kind("sliding") if shape.sliding_window else ()
        self.window = shape.sliding_window if self.window_layers else None
        self.window_blocks = (num_blocks if window_blocks is None else window_blocks) if self.window_layers else 0
        full_layers = [i for i in range(shape.num_layers) if i not in self.window_layers]

        def pool(layers: int, blocks: int) -> torch.Tensor:
            # One allocation per pool for all its layers, K and V: [2, layers, blocks, block_size, kv_heads,
            # head_dim]. Its size is exactly the estimate's kv term for those layers:
            # blocks x block_size x 2 x layers x kv_heads x head_dim x bytes.
            dims = (2, layers, blocks, block_size, shape.num_kv_heads, shape.head_dim)
            return torch.zeros(dims, dtype=dtype, device=device)

        self.full_storage = pool(len(full_layers), num_blocks)
        self.window_storage = pool(len(self.window_layers), self.window_blocks)
        where = {i: (self.full_storage, j) for j, i in enumerate(full_layers)}
        where |= {i: (self.window_storage, j) for j, i in enumerate(self.window_layers)}
        # Per layer: [blocks, block_size, kv_heads, head_dim] views into its pool.
        self._k = [where[i][0][0, where[i][1]] for i in range(shape.num_layers)]
        self._v = [where[i][0][1, where[i][1]] for i in range(shape.num_layers)]

    def layer_k(self, layer: int) -> torch.Tensor:
        return self._k[layer]

    def layer_v(self, layer: int) -> torch.Tensor:
        return self._v[layer]

    def in_window_pool(self, layer: int) -> bool:
        return layer in self.window_layers

    @property
    def k(self) -> torch.Tensor:
        """[layers, blocks, block_size, kv_heads, head_dim]: every layer's K in one tensor, for a cache with one
        pool (no sliding-window layers); with two pools layer i is not row i of either: use layer_k(i)."""
        self._one_pool()
        return self.full_storage[0]

    @property
    def v(self) -> torch.Tensor:
        self._one_pool()
        return self.full_storage[1]

    def _one_pool(self) -> None:
        if self.window_layers:
            raise RuntimeError("this KV cache has a window pool: address layers with layer_k(i) / layer_v(i)")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.full_storage, self.window_storage))
