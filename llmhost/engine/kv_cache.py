"""KVCache: the paged pools' tensors, allocated once from the plan's block counts.

Full-attention layers share the full pool (`num_blocks`); sliding-window layers, when the model declares a window,
share the window pool (`window_blocks`, capped at max_batch windows: memory/estimate.py `sliding_kv_blocks`), whose
block tables the engine keeps apart (block_manager.py). `k[i]`, `v[i]` are layer i's views into its pool.

A model split across devices has one KVCache per stage, holding only that stage's layers (`layers`) on the
stage's device. Every stage's cache has the same geometry (num_blocks, window_blocks): the engine's one block
manager hands out logical block ids that index every stage's pools alike, so freeing a block frees it everywhere.
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
        layers: range | None = None,
    ) -> None:
        """window_blocks: the window pool's size; None makes it as large as the full pool (no cap).
        layers: the decoder layers this cache holds (a stage of a split model); None holds all of them."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = device
        self.layers = range(shape.num_layers) if layers is None else layers
        # Layers whose KV lives in the window pool, model-wide: the pool geometry (window, window_blocks) is the
        # model's, so that every stage agrees with the block manager even when it holds no sliding layer. A
        # "sliding" layer without a window attends to everything and lives in the full pool.
        self.window_layers = shape.layers_of_kind("sliding") if shape.sliding_window else ()
        self.window = shape.sliding_window if self.window_layers else None
        self.window_blocks = (num_blocks if window_blocks is None else window_blocks) if self.window_layers else 0
        held_window = [i for i in self.layers if i in self.window_layers]
        full_layers = [i for i in self.layers if i not in self.window_layers]

        def pool(layers: int, blocks: int) -> torch.Tensor:
            # One allocation per pool for all its layers, K and V: [2, layers, blocks, block_size, kv_heads,
            # head_dim]. Its size is exactly the estimate's kv term for those layers:
            # blocks x block_size x 2 x layers x kv_heads x head_dim x bytes.
            dims = (2, layers, blocks, block_size, shape.num_kv_heads, shape.head_dim)
            return torch.zeros(dims, dtype=dtype, device=device)

        self.full_storage = pool(len(full_layers), num_blocks)
        self.window_storage = pool(len(held_window), self.window_blocks)
        where = {i: (self.full_storage, j) for j, i in enumerate(full_layers)}
        where |= {i: (self.window_storage, j) for j, i in enumerate(held_window)}
        # Per held layer: [blocks, block_size, kv_heads, head_dim] views into its pool.
        self._k = {i: where[i][0][0, where[i][1]] for i in self.layers}
        self._v = {i: where[i][0][1, where[i][1]] for i in self.layers}

    def layer_k(self, layer: int) -> torch.Tensor:
        k = self._k.get(layer)
        if k is None:
            raise self._not_held(layer)
        return k

    def layer_v(self, layer: int) -> torch.Tensor:
        v = self._v.get(layer)
        if v is None:
            raise self._not_held(layer)
        return v

    def _not_held(self, layer: int) -> IndexError:
        return IndexError(f"layer {layer} is not in this KV cache (it holds [{self.layers.start}, {self.layers.stop}))")

    def in_window_pool(self, layer: int) -> bool:
        return layer in self.window_layers

    @property
    def k(self) -> torch.Tensor:
        """[layers, blocks, block_size, kv_heads, head_dim]: every layer's K in one tensor, for a cache with one
        pool (no sliding-window layers) holding every layer; otherwise layer i is not row i: use layer_k(i)."""
        self._one_pool()
        return self.full_storage[0]

    @property
    def v(self) -> torch.Tensor:
        self._one_pool()
        return self.full_storage[1]

    def _one_pool(self) -> None:
        if self.window_layers:
            raise RuntimeError("this KV cache has a window pool: address layers with layer_k(i) / layer_v(i)")
        if self.layers.start != 0:
            raise RuntimeError("this KV cache holds a later stage's layers: address them with layer_k(i) / layer_v(i)")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.full_storage, self.window_storage))
