"""Week 3 Day 1: the block manager, a pool of fixed-size KV blocks and one block table per sequence.

Token `t` of a sequence lives in physical block `table[t // block_size]`, at slot
`t % block_size`. Blocks come from a free list when a sequence grows and go back to it when no
table holds them any more: each block has a reference count, so a forked sequence can share its
parent's blocks (copy-on-write when one of them writes into a shared, partly filled block).

Chapter: book/src/week3-01-block-manager.md.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import mlx.core as mx


class OutOfBlocksError(RuntimeError):
    """Too few free blocks for the request. The manager is left exactly as it was, so a
    scheduler can catch this, wait or preempt a sequence, and try again."""


@dataclass(frozen=True)
class BlockUsage:
    """A snapshot of the pool. A block shared by several sequences counts once."""

    used_blocks: int
    free_blocks: int
    allocated_slots: int  # used_blocks * block_size
    stored_tokens: int  # slots of used blocks that hold a token

    @property
    def internal_fragmentation(self) -> int:
        """Slots allocated but holding no token: the unused tail of each sequence's last block."""
        return self.allocated_slots - self.stored_tokens

    @property
    def utilization(self) -> float:
        """Share of the allocated slots that hold a token (0.0 when nothing is allocated)."""
        return self.stored_tokens / self.allocated_slots if self.allocated_slots else 0.0


def _count(name: str, value: int, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class BlockManager:
    """`num_blocks` physical blocks of `block_size` token slots, handed out to sequences."""

    def __init__(self, num_blocks: int, block_size: int = 16):
        self.num_blocks = _count("num_blocks", num_blocks, minimum=1)
        self.block_size = _count("block_size", block_size, minimum=1)
        self._free: deque[int] = deque(range(self.num_blocks))  # take from the left, return right
        self._ref_counts = [0] * self.num_blocks  # how many block tables hold each block
        self._tables: dict[Hashable, list[int]] = {}  # seq id -> physical blocks, logical order
        self._lens: dict[Hashable, int] = {}  # seq id -> tokens stored

    # -- queries (provided) --------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, n_tokens: int) -> int:
        """Blocks that hold `n_tokens` tokens: ceil(n_tokens / block_size)."""
        return -(-_count("n_tokens", n_tokens) // self.block_size)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    def seq_len(self, seq_id: Hashable) -> int:
        return self._lens[self._known(seq_id)]

    def block_table(self, seq_id: Hashable) -> list[int]:
        """Physical block ids of the sequence's logical blocks 0, 1, ... (a copy)."""
        return list(self._tables[self._known(seq_id)])

    def ref_count(self, block_id: int) -> int:
        """How many sequences hold `block_id` (0: the block is free)."""
        if _count("block_id", block_id) >= self.num_blocks:
            raise ValueError(f"block_id {block_id} out of range [0, {self.num_blocks})")
        return self._ref_counts[block_id]

    def _known(self, seq_id: Hashable) -> Hashable:
        if seq_id not in self._tables:
            raise ValueError(f"unknown sequence {seq_id!r}")
        return seq_id

    def _new(self, seq_id: Hashable) -> Hashable:
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already exists")
        return seq_id

    # -- growing, freeing and sharing (tasks 1-4) -----------------------------------------------
    # Keep the state in the four fields __init__ made: the free list `self._free` (a deque of
    # block ids), `self._ref_counts[block]`, `self._tables[seq_id]` (a list of block ids) and
    # `self._lens[seq_id]` (tokens). Check that a request fits BEFORE changing anything: a call
    # that raises OutOfBlocksError must leave all four exactly as they were.

    def _take(self) -> int:
        """Take the leftmost free block with reference count 1 (provided). Take every block
        through this method: Day 6's prefix cache overrides it to evict cached blocks."""
        block = self._free.popleft()
        self._ref_counts[block] = 1
        return block

    def can_allocate(self, n_tokens: int) -> bool:
        # TODO(Week 3 Day 1, task 1): do blocks_needed(n_tokens) blocks remain free?
        raise NotImplementedError(
            "Week 3 Day 1, task 1: implement `can_allocate` in src/tiny_llm/block_manager.py"
        )

    def allocate(self, seq_id: Hashable, n_tokens: int) -> list[int]:
        """Register a new sequence holding `n_tokens` tokens (its prompt); returns its table."""
        self._new(seq_id)
        _count("n_tokens", n_tokens)
        # TODO(Week 3 Day 1, task 1):
        # - too few free blocks: raise OutOfBlocksError (a message with the numbers);
        # - take blocks_needed(n_tokens) blocks with self._take() (the left of the free list,
        #   reference count 1); record the table and the length; return a copy of the table.
        raise NotImplementedError(
            "Week 3 Day 1, task 1: implement `allocate` in src/tiny_llm/block_manager.py"
        )

    def free(self, seq_id: Hashable) -> None:
        """Forget a finished (or preempted) sequence; blocks no one else holds are free at once."""
        self._known(seq_id)
        # TODO(Week 3 Day 1, task 2): drop the table and the length; decrement the reference
        # count of each of its blocks and put those that reach 0 back on the free list.
        raise NotImplementedError(
            "Week 3 Day 1, task 2: implement `free` in src/tiny_llm/block_manager.py"
        )

    def can_append(self, seq_id: Hashable, n_tokens: int = 1) -> bool:
        self._known(seq_id)
        _count("n_tokens", n_tokens)
        # TODO(Week 3 Day 1, task 3): do the blocks that `append` would take remain free?
        # (Write one helper that counts them and use it here and in `append`.)
        raise NotImplementedError(
            "Week 3 Day 1, task 3: implement `can_append` in src/tiny_llm/block_manager.py"
        )

    def append(self, seq_id: Hashable, n_tokens: int = 1) -> list[tuple[int, int]]:
        """Make room for `n_tokens` more tokens (a decode step appends 1).

        Returns the copy-on-write pairs `(src, dst)`: blocks whose contents the caller must copy
        in the KV pool before writing the new tokens (empty unless the last block was shared).
        """
        self._known(seq_id)
        _count("n_tokens", n_tokens)
        # TODO(Week 3 Day 1, task 3):
        # - new blocks = blocks_needed(length + n_tokens) - len(table);
        # - (after task 4) copy-on-write: if n_tokens > 0, the last block is partly filled
        #   (length % block_size != 0) and shared (reference count > 1), this sequence must not
        #   write into it: it needs one more block, takes a fresh one (self._take()) in its place, drops its
        #   reference to the old one and reports (old, new);
        # - too few free blocks for all of that: raise OutOfBlocksError before changing anything;
        # - otherwise take the blocks, add n_tokens to the length, return the pairs.
        raise NotImplementedError(
            "Week 3 Day 1, task 3: implement `append` in src/tiny_llm/block_manager.py"
        )

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Start `child_id` as a copy of `parent_id` that shares all its blocks (no new block)."""
        self._known(parent_id)
        self._new(child_id)
        # TODO(Week 3 Day 1, task 4): the child gets a copy of the parent's table (a new list)
        # and its length; every block in it gains one reference. Then finish copy-on-write in
        # `append`.
        raise NotImplementedError(
            "Week 3 Day 1, task 4: implement `fork` in src/tiny_llm/block_manager.py"
        )

    # -- what the kernels take (task 5) and reports (task 6) -----------------------------------
    def slot_mapping(self, seq_id: Hashable, positions: Iterable[int]) -> list[int]:
        """Physical slot `block * block_size + offset` of each token position (< seq_len)."""
        self._known(seq_id)
        # TODO(Week 3 Day 1, task 5): for each position p (an int, 0 <= p < seq_len, else
        # TypeError / ValueError: `_count("position", p)` checks the type and the sign):
        # table[p // block_size] * block_size + p % block_size.
        raise NotImplementedError(
            "Week 3 Day 1, task 5: implement `slot_mapping` in src/tiny_llm/block_manager.py"
        )

    def block_table_array(
        self, seq_ids: Sequence[Hashable], max_blocks: int | None = None
    ) -> mx.array:
        """Block tables as an int32 array [len(seq_ids), max_blocks], rows padded with -1.

        `max_blocks` defaults to the longest table; a table longer than it is an error."""
        for s in seq_ids:
            self._known(s)
        if max_blocks is not None:
            _count("max_blocks", max_blocks)
        # TODO(Week 3 Day 1, task 5): pad each table with -1 to the width, raise ValueError if
        # one is longer, and build mx.array(rows, dtype=mx.int32) shaped [len(seq_ids), width]
        # (reshape, so that an empty batch still has two dimensions).
        raise NotImplementedError(
            "Week 3 Day 1, task 5: implement `block_table_array` in src/tiny_llm/block_manager.py"
        )

    def usage(self) -> BlockUsage:
        # TODO(Week 3 Day 1, task 6): BlockUsage(used blocks, free blocks, used * block_size,
        # tokens stored). Logical block i of a sequence of length L holds
        # min(block_size, L - i * block_size) tokens; a shared block must count once (collect
        # the counts in a dict keyed by block id).
        raise NotImplementedError(
            "Week 3 Day 1, task 6: implement `usage` in src/tiny_llm/block_manager.py"
        )
