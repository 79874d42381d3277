"""BlockManager: the free list of KV-cache blocks and each sequence's block table. Pure bookkeeping.

Invariant: a block is either free or in exactly one sequence's table; `free_count + sum(len(tables)) == total`.
"""

from __future__ import annotations

from llmhost.engine.sequence import Sequence


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Pop from the end: recently freed blocks are reused first, which keeps hot blocks in cache.
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def used_count(self) -> int:
        return self.num_blocks - len(self._free)

    def extra_blocks(self, seq: Sequence, tokens: int) -> int:
        """Blocks `seq` must add so that its table covers `tokens` positions."""
        return max(0, blocks_for(tokens, self.block_size) - len(seq.block_table))

    def can_cover(self, seq: Sequence, tokens: int) -> bool:
        return self.extra_blocks(seq, tokens) <= len(self._free)

    def cover(self, seq: Sequence, tokens: int) -> None:
        """Grow `seq`'s table to cover `tokens` positions. Call can_cover first: running out is a bug here."""
        need = self.extra_blocks(seq, tokens)
        if need > len(self._free):
            raise RuntimeError(f"KV pool exhausted: need {need} blocks, {len(self._free)} free")
        for _ in range(need):
            seq.block_table.append(self._free.pop())

    def release(self, seq: Sequence) -> None:
        """Return all of `seq`'s blocks; safe to call twice."""
        self._free.extend(reversed(seq.block_table))
        seq.block_table = []
