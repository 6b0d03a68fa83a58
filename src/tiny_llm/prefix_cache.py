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
        # TODO(Week 3 Day 6, task 1): walk the full blocks of tokens[:-1] (at most
        # (len(tokens) - 1) // block_size of them), chaining h = block_hash(parent, chunk) from
        # parent None; stop at the first hash with no block in self._block_of, or whose block's
        # self._tokens_of differs from the chunk (a hash collision must not be a hit).
        raise NotImplementedError(
            "Week 3 Day 6, task 1: implement `match_prefix` in src/tiny_llm/prefix_cache.py"
        )

    def allocate_cached(self, seq_id: Hashable, tokens: Sequence[int]) -> int:
        """Register `seq_id` holding its longest cached prefix of `tokens`; return how many
        tokens that is (0: no hit; the sequence then starts empty)."""
        self._new(seq_id)
        # TODO(Week 3 Day 6, task 2): blocks = self.match_prefix(tokens). Each becomes held once
        # more (a cached block nobody held sits in self._free: take it out of the free list).
        # Record the table, the length (full blocks only) and self._seq_hashes[seq_id], the
        # hashes of those blocks (commit continues the chain from them). Return the length.
        raise NotImplementedError(
            "Week 3 Day 6, task 2: implement `allocate_cached` in src/tiny_llm/prefix_cache.py"
        )

    # -- task 3: name the blocks a sequence has filled --------------------------------------------
    def commit(self, seq_id: Hashable, tokens: Sequence[int]) -> None:
        """Name the sequence's full blocks that have no name yet. `tokens` are the sequence's
        tokens; the first `seq_len(seq_id)` of them are stored."""
        length = self._lens[self._known(seq_id)]  # its blocks: self._tables[seq_id]
        if len(tokens) < length:
            raise ValueError(f"{len(tokens)} tokens given, sequence {seq_id!r} stores {length}")
        # TODO(Week 3 Day 6, task 3): hashes = self._seq_hashes.setdefault(seq_id, []) holds
        # the names of the blocks already done. For each further full block i < length //
        # block_size: chain its hash from the previous one, append it to hashes, and name
        # table[i] (self._block_of, self._hash_of, self._tokens_of) -- unless the hash already
        # names a block or the block already has a name (keep the first name given).
        raise NotImplementedError(
            "Week 3 Day 6, task 3: implement `commit` in src/tiny_llm/prefix_cache.py"
        )

    # -- task 4: eviction happens when a free block is reused -------------------------------------
    def _take(self) -> int:
        # TODO(Week 3 Day 6, task 4): take a block as BlockManager._take does (the least
        # recently freed: the left of the free list); if it has a name, forget the name in all
        # three dicts, since its content is about to be overwritten. This works only if your
        # Day 1 BlockManager takes every block through `self._take()` (allocate and append,
        # copy-on-write included): add that method there if you inlined it.
        raise NotImplementedError(
            "Week 3 Day 6, task 4: implement `_take` in src/tiny_llm/prefix_cache.py"
        )

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
