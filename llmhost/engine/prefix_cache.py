"""PrefixCache: full KV blocks found again by their tokens, so a request whose prompt begins like an earlier one
(a system prompt, the conversation so far in a chat) skips computing that beginning. Pure bookkeeping.

A block is named by a hash chain: sha256(the previous block's name + this block's token ids), so equal names mean
equal tokens at equal positions after equal prefixes, and therefore equal K/V. SHA-256 rather than Python's hash:
a crafted prompt must not be able to collide with another user's and read K/V it did not compute.

A block enters the cache only once the step that computed it has been collected (the engine calls `register` from
`collect`): its K/V are then written on the device, and any step launched afterwards, on any stream, reads them
whole. A request that finds a prefix shares those blocks read-only: it computes from the first position after them,
and at least its last prompt token, so it never writes into a shared block. Blocks no table holds any more stay
cached and count as free: they are handed out again least recently used first, forgetting their names.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence as Seq

import numpy as np

from llmhost.engine.sequence import PENDING_TOKEN, Sequence


class PrefixCache:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._block_of: dict[bytes, int] = {}  # name -> block
        self._name_of: dict[int, bytes] = {}  # block -> name
        self._refs: dict[int, int] = {}  # cached block -> tables holding it (0: evictable)
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unheld cached blocks, least recently used first
        self.queried_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # of those, found

    @property
    def evictable_count(self) -> int:
        return len(self._evictable)

    @property
    def cached_count(self) -> int:
        return len(self._name_of)

    def names(self, seq: Sequence, blocks: int) -> list[bytes]:
        """The names of seq's first `blocks` blocks (its tokens there must be known), extending seq.block_hashes;
        returns that list itself (its first `blocks` entries are the answer)."""
        bs = self.block_size
        while len(seq.block_hashes) < blocks:
            i = len(seq.block_hashes)
            tokens = seq.token_ids(i * bs, (i + 1) * bs)
            if PENDING_TOKEN in tokens:
                raise ValueError(f"block {i} of {seq.id} holds a token still on the device")
            parent = seq.block_hashes[-1] if seq.block_hashes else b""
            seq.block_hashes.append(hashlib.sha256(parent + np.asarray(tokens, dtype=np.int64).tobytes()).digest())
        return seq.block_hashes

    def match(self, seq: Sequence, most: int) -> list[int]:
        """Take hold of the cached blocks that begin seq's tokens, at most `most` of them; returns them in order."""
        self.queried_tokens += most * self.block_size
        found: list[int] = []
        for name in self.names(seq, most)[:most]:
            block = self._block_of.get(name)
            if block is None:
                break
            self._evictable.pop(block, None)
            self._refs[block] += 1
            found.append(block)
        self.hit_tokens += len(found) * self.block_size
        seq.blocks_named = len(found)
        return found

    def unmatch(self, seq: Sequence, most: int) -> list[int]:
        """Undo match(seq, most) (the request could not start after all): its blocks let go, the lookup not
        counted; returns the uncached blocks of its table, for the free list (none: it held only matched ones)."""
        self.queried_tokens -= most * self.block_size
        self.hit_tokens -= len(seq.block_table) * self.block_size
        return self.release(seq.block_table)

    def register(self, seq: Sequence, upto: int) -> None:
        """Name seq's full blocks below position `upto` (computed, collected, tokens known). A block whose name
        another block already has stays seq's own: the cache keeps the first. Each block is looked at once
        (seq.blocks_named): this runs for every sequence of every decode step."""
        full = upto // self.block_size
        if full <= seq.blocks_named:
            return
        names = self.names(seq, full)
        for i in range(seq.blocks_named, full):
            block, name = seq.block_table[i], names[i]
            if block in self._name_of or name in self._block_of:
                continue
            self._block_of[name] = block
            self._name_of[block] = name
            self._refs[block] = 1
        seq.blocks_named = full

    def release(self, blocks: Seq[int]) -> list[int]:
        """A table lets go of `blocks`: its cached ones become evictable once no table holds them (its last blocks
        first, so that a prefix's head outlives its tail); returns the uncached ones, for the free list."""
        uncached: list[int] = []
        for block in reversed(blocks):
            if block not in self._name_of:
                uncached.append(block)
                continue
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._evictable[block] = None
        uncached.reverse()
        return uncached

    def evict(self, n: int) -> list[int]:
        """Forget the `n` least recently used unheld blocks and return them, for the free list."""
        out: list[int] = []
        for _ in range(n):
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._name_of.pop(block)]
            del self._refs[block]
            out.append(block)
        return out
