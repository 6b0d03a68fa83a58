"""Week 3 Day 6: prefix caching, a block manager that remembers full blocks by their content.

A full block is named by a hash of (its parent block's hash, its token ids): the chain makes the
name depend on the whole prefix up to and including the block, so two sequences whose first
k blocks hold the same tokens reach the same k names. A new sequence starts by taking the blocks
of its longest cached prefix (their keys and values are already computed) and prefills only the
rest.

A cached block that no sequence holds any more stays cached *and* free: it goes back to the
right end of the free list, and blocks are taken from the left, so the block that has been
unused the longest is reused first (LRU eviction), and only then loses its name.

Chapter: book/src/week3-06-prefix-caching.md.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from .block_manager import BlockManager


def block_hash(parent: int | None, tokens: Sequence[int]) -> int:
    """The name of a full block holding `tokens`, after the block named `parent` (None: first)."""
    return hash((parent, tuple(int(t) for t in tokens)))


class PrefixCachingBlockManager(BlockManager):
    """A BlockManager whose full blocks can be found again by content (see the module doc)."""

    def __init__(self, num_blocks: int, block_size: int = 16):
        super().__init__(num_blocks, block_size)
        self._block_of: dict[int, int] = {}  # hash -> block
        self._hash_of: dict[int, int] = {}  # block -> hash
        self._tokens_of: dict[int, tuple[int, ...]] = {}  # block -> its tokens (no false hits)
        self._seq_hashes: dict[Hashable, list[int]] = {}  # seq -> hashes of its full blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks that currently have a name (held by a sequence or free)."""
        return len(self._hash_of)

    # -- tasks 1-2: find and take a cached prefix -------------------------------------------------
    def match_prefix(self, tokens: Sequence[int]) -> list[int]:
        """Blocks holding the longest cached prefix of `tokens`, in order.

        Only full blocks count, and at least one token is left over: the model must still run on
        something to produce the next token's logits."""
        bs, blocks, parent = self.block_size, [], None
        for i in range((len(tokens) - 1) // bs):
            chunk = tuple(int(t) for t in tokens[i * bs : (i + 1) * bs])
            h = block_hash(parent, chunk)
            block = self._block_of.get(h)
            if block is None or self._tokens_of[block] != chunk:
                break
            blocks.append(block)
            parent = h
        return blocks

    def allocate_cached(self, seq_id: Hashable, tokens: Sequence[int]) -> int:
        """Register `seq_id` holding its longest cached prefix of `tokens`; return how many
        tokens that is (0: no hit; the sequence then starts empty)."""
        self._new(seq_id)
        blocks = self.match_prefix(tokens)
        for block in blocks:
            if self._ref_counts[block] == 0:  # cached but free: take it off the free list
                self._free.remove(block)
            self._ref_counts[block] += 1
        self._tables[seq_id] = list(blocks)
        self._lens[seq_id] = len(blocks) * self.block_size
        self._seq_hashes[seq_id] = [self._hash_of[b] for b in blocks]
        return self._lens[seq_id]

    # -- task 3: name the blocks a sequence has filled --------------------------------------------
    def commit(self, seq_id: Hashable, tokens: Sequence[int]) -> None:
        """Name the sequence's full blocks that have no name yet. `tokens` are the sequence's
        tokens; the first `seq_len(seq_id)` of them are stored."""
        table, length = self._tables[self._known(seq_id)], self._lens[seq_id]
        if len(tokens) < length:
            raise ValueError(f"{len(tokens)} tokens given, sequence {seq_id!r} stores {length}")
        hashes, bs = self._seq_hashes.setdefault(seq_id, []), self.block_size
        for i in range(len(hashes), length // bs):
            chunk = tuple(int(t) for t in tokens[i * bs : (i + 1) * bs])
            h = block_hash(hashes[-1] if hashes else None, chunk)
            hashes.append(h)
            block = table[i]
            # Keep the first block that got a name; an identical one computed at the same time
            # by another sequence simply stays unnamed.
            if h not in self._block_of and block not in self._hash_of:
                self._block_of[h], self._hash_of[block] = block, h
                self._tokens_of[block] = chunk

    # -- task 4: eviction happens when a free block is reused -------------------------------------
    def _take(self) -> int:
        block = super()._take()  # the least recently freed block
        h = self._hash_of.pop(block, None)
        if h is not None:  # it was cached: its content is about to be overwritten
            del self._block_of[h], self._tokens_of[block]
        return block

    # -- bookkeeping the base class does not know about (provided) --------------------------------
    def free(self, seq_id: Hashable) -> None:
        # Return the last blocks first: they go left of the prefix's first blocks in the free
        # list, so they are evicted first and the widely shared roots of a prefix last.
        self._tables[self._known(seq_id)].reverse()
        super().free(seq_id)
        self._seq_hashes.pop(seq_id, None)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        super().fork(parent_id, child_id)
        self._seq_hashes[child_id] = list(self._seq_hashes.get(parent_id, []))
