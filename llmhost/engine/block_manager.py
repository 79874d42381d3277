"""BlockManager: the free lists of KV-cache blocks and each sequence's block tables. Pure bookkeeping.

Two pools. The full pool backs full-attention layers: a sequence's `block_table` covers every position it has.
The window pool (only for models with sliding-window layers) backs those layers: a sequence's `window_table` holds
logical blocks [window_start, window_start + len(window_table)), and blocks wholly before the window of its next
token are released as it advances, so a sequence far longer than the window holds only the window's blocks there.

Invariant, per pool: a block is either free or in exactly one sequence's table of that pool;
`free_count + sum(len(tables)) == num_blocks`. With a prefix cache (full pool only, prefix_cache.py) a cached block
may be in several tables, or in none and still counted free (evictable) until it is handed out again.
"""

from __future__ import annotations

from llmhost.engine.prefix_cache import PrefixCache
from llmhost.engine.sequence import Sequence


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class FreeBlocks:
    """One pool's free list. Blocks are taken from the end: recently freed blocks are reused first, which keeps hot
    blocks in cache."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def used_count(self) -> int:
        return self.num_blocks - len(self._free)

    def take(self, n: int, table: list[int], what: str) -> None:
        """Append n free blocks to `table`. Callers check first: running out is a bug here."""
        if n > len(self._free):
            raise RuntimeError(f"{what} exhausted: need {n} blocks, {len(self._free)} free")
        for _ in range(n):
            table.append(self._free.pop())

    def give(self, blocks: list[int]) -> None:
        """Return blocks (a table or its head), so that the table's first block is reused last."""
        self._free.extend(reversed(blocks))


class WindowBlockManager:
    """The sliding-window layers' pool. A query at position p reads keys (p - window, p] (transformers'
    `kv_idx > q_idx - sliding_window`), so it needs logical blocks from (p - window + 1) // block_size on; a
    chunk of positions [start, end) needs blocks [first_needed(start), ceil(end / block_size))."""

    def __init__(self, num_blocks: int, block_size: int, window: int) -> None:
        if window < 1:
            raise ValueError(f"a sliding window must hold at least one token, got {window}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.window = window
        self.pool = FreeBlocks(num_blocks)

    @property
    def free_count(self) -> int:
        return self.pool.free_count

    @property
    def used_count(self) -> int:
        return self.pool.used_count

    def first_needed(self, pos: int) -> int:
        """The first logical block a query at `pos` reads."""
        return max(0, pos - self.window + 1) // self.block_size

    def _first_after_trim(self, seq: Sequence, start: int) -> int:
        first = self.first_needed(start)
        return max(first, seq.window_start) if seq.window_table else first

    def _reclaimable(self, seq: Sequence, start: int) -> int:
        """Blocks of `seq` that a chunk starting at `start` no longer reads."""
        return min(len(seq.window_table), max(0, self.first_needed(start) - seq.window_start))

    def extra_blocks(self, seq: Sequence, start: int, end: int) -> int:
        """Blocks `seq` must add so that its window table covers positions [start, end) as a chunk reads them."""
        first = self._first_after_trim(seq, start)
        held = len(seq.window_table) - self._reclaimable(seq, start)
        return max(0, blocks_for(end, self.block_size) - first - held)

    def can_cover(self, seq: Sequence, start: int, end: int) -> bool:
        return self.extra_blocks(seq, start, end) <= self.pool.free_count + self._reclaimable(seq, start)

    def max_end(self, seq: Sequence, start: int) -> int:
        """The furthest position a chunk starting at `start` can reach with the blocks free now."""
        first = self._first_after_trim(seq, start)
        held = len(seq.window_table) - self._reclaimable(seq, start)
        return (first + held + self.pool.free_count + self._reclaimable(seq, start)) * self.block_size

    def cover(self, seq: Sequence, start: int, end: int) -> None:
        """Release what a chunk [start, end) no longer reads, then grow the table to cover `end`. Call can_cover
        first: running out is a bug here."""
        self.trim(seq, start)
        if not seq.window_table:
            seq.window_start = self.first_needed(start)
        self.pool.take(self.extra_blocks(seq, start, end), seq.window_table, "sliding-window KV pool")

    def trim(self, seq: Sequence, pos: int) -> None:
        """Release the blocks that a query at `pos` (and every later one) no longer reads."""
        drop = self._reclaimable(seq, pos)
        if drop:
            self.pool.give(seq.window_table[:drop])
            del seq.window_table[:drop]
            seq.window_start += drop

    def release(self, seq: Sequence) -> None:
        self.pool.give(seq.window_table)
        seq.window_table = []
        seq.window_start = 0


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, window: WindowBlockManager | None = None, prefix_cache: bool = False
    ) -> None:
        """prefix_cache: keep full blocks for requests that begin with the same tokens (not with a window pool:
        its blocks behind the window are gone)."""
        if window is not None and window.block_size != block_size:
            raise ValueError("the full and the window pool must use the same block size")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.window = window
        self.pool = FreeBlocks(num_blocks)
        self.cache = PrefixCache(block_size) if prefix_cache and window is None else None

    @property
    def free_count(self) -> int:
        """Free blocks of the full pool, cached ones no table holds included (the window pool reports its own)."""
        return self.pool.free_count + (self.cache.evictable_count if self.cache else 0)

    @property
    def used_count(self) -> int:
        return self.num_blocks - self.free_count

    def match_prefix(self, seq: Sequence) -> None:
        """A sequence about to start (no blocks, nothing computed): take the cached blocks that begin its tokens
        (_lookup_blocks) and count them computed."""
        most = self._lookup_blocks(seq)
        if self.cache is None or most is None or seq.block_table or seq.num_computed:
            return
        seq.block_table = self.cache.match(seq, most)
        seq.num_computed = len(seq.block_table) * self.block_size

    def unmatch_prefix(self, seq: Sequence) -> None:
        """seq could not start after match_prefix (its chunk does not fit): let its matched blocks go, so they stay
        free for the running sequences, and count the lookup as never made (it is made again next step)."""
        most = self._lookup_blocks(seq)
        if self.cache is not None and most is not None:
            self.pool.give(self.cache.unmatch(seq, most))
        else:
            self.release(seq)
        seq.block_table = []
        seq.blocks_named = 0
        seq.num_computed = 0

    def _lookup_blocks(self, seq: Sequence) -> int | None:
        """How many of seq's first blocks match_prefix looks up: all full ones before its last known token (that
        token is always computed: its logits are sampled); None without a cache, or for a request asking for
        prompt logprobs (the skipped tokens would have none)."""
        if self.cache is None or seq.params.prompt_logprobs is not None:
            return None
        return (len(seq.prompt_ids) + len(seq.output_ids) - 1) // self.block_size

    def forget_cached(self) -> None:
        """The KV pools' contents are gone (the engine was parked): no cached block may be found again. Only
        blocks no table holds can be cached then: parking needs an engine without sequences."""
        if self.cache is not None:
            self.pool.give(self.cache.evict(self.cache.evictable_count))
            if self.cache.cached_count:
                raise RuntimeError(f"{self.cache.cached_count} cached KV blocks are still held by sequences")

    def register(self, seq: Sequence, upto: int) -> None:
        """seq's positions below `upto` are computed and their step collected: cache its full blocks there."""
        if self.cache is not None:
            self.cache.register(seq, min(upto, len(seq.prompt_ids) + len(seq.output_ids)))

    def extra_blocks(self, seq: Sequence, tokens: int) -> int:
        """Full-pool blocks `seq` must add so that its table covers `tokens` positions."""
        return max(0, blocks_for(tokens, self.block_size) - len(seq.block_table))

    def can_cover(self, seq: Sequence, tokens: int) -> bool:
        """Whether both pools can hold `seq`'s next chunk, from its first uncomputed token to `tokens`."""
        if self.extra_blocks(seq, tokens) > self.free_count:
            return False
        return self.window is None or self.window.can_cover(seq, seq.num_computed, tokens)

    def window_room(self, seq: Sequence, reserve: int = 0) -> int | None:
        """Tokens `seq`'s next chunk can have within the window pool's free blocks less `reserve`; None without a
        window pool. A long prefill chunk reads the window before it plus itself, so it may need more than a
        decode."""
        if self.window is None:
            return None
        return self.window.max_end(seq, seq.num_computed) - reserve * self.block_size - seq.num_computed

    def cover(self, seq: Sequence, tokens: int) -> None:
        """Grow `seq`'s tables to cover `tokens` positions (trimming its window table to what the chunk from
        seq.num_computed reads). Call can_cover first: running out is a bug here."""
        need = self.extra_blocks(seq, tokens)
        if need > self.free_count:  # before the window pool changes anything
            raise RuntimeError(f"KV pool exhausted: need {need} blocks, {self.free_count} free")
        if self.window is not None:
            self.window.cover(seq, seq.num_computed, tokens)
        if self.cache is not None and need > self.pool.free_count:
            self.pool.give(self.cache.evict(need - self.pool.free_count))
        self.pool.take(need, seq.block_table, "KV pool")

    def advanced(self, seq: Sequence) -> None:
        """`seq.num_computed` moved on: release the window blocks its next token no longer reads."""
        if self.window is not None:
            self.window.trim(seq, seq.num_computed)

    def release(self, seq: Sequence) -> None:
        """Return all of `seq`'s blocks in both pools; safe to call twice. While a step with a chunk of it is in
        flight (seq.inflight) they are held back instead: that step still writes K/V into them, and a step on
        another stream given them now (a prompt step beside the decode steps) could have its K/V overwritten.
        The engine returns them with release_held when the last such step is collected."""
        if seq.inflight:
            seq.held_blocks += seq.block_table
            if self.window is not None:
                seq.held_window_blocks += seq.window_table
                seq.window_table, seq.window_start = [], 0
        else:
            self.pool.give(self.cache.release(seq.block_table) if self.cache is not None else seq.block_table)
            if self.window is not None:
                self.window.release(seq)
        seq.blocks_named = 0
        seq.block_table = []

    def release_held(self, seq: Sequence) -> None:
        """The steps that held seq's released blocks back are collected: return them."""
        held, seq.held_blocks = seq.held_blocks, []
        self.pool.give(self.cache.release(held) if self.cache is not None else held)
        if self.window is not None:
            self.window.pool.give(seq.held_window_blocks)
        seq.held_window_blocks = []
