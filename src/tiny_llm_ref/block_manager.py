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
    def _take(self) -> int:
        """Take the leftmost free block with reference count 1 (provided). Take every block
        through this method: Day 6's prefix cache overrides it to evict cached blocks."""
        block = self._free.popleft()
        self._ref_counts[block] = 1
        return block

    def can_allocate(self, n_tokens: int) -> bool:
        return self.blocks_needed(n_tokens) <= len(self._free)

    def allocate(self, seq_id: Hashable, n_tokens: int) -> list[int]:
        """Register a new sequence holding `n_tokens` tokens (its prompt); returns its table."""
        self._new(seq_id)
        need = self.blocks_needed(n_tokens)
        if need > len(self._free):
            raise OutOfBlocksError(
                f"sequence {seq_id!r}: {n_tokens} tokens need {need} blocks, {len(self._free)} free"
            )
        self._tables[seq_id] = [self._take() for _ in range(need)]
        self._lens[seq_id] = n_tokens
        return list(self._tables[seq_id])

    def free(self, seq_id: Hashable) -> None:
        """Forget a finished (or preempted) sequence; blocks no one else holds are free at once."""
        for block in self._tables.pop(self._known(seq_id)):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free.append(block)
        del self._lens[seq_id]

    def _append_cost(self, seq_id: Hashable, n_tokens: int) -> tuple[int, bool]:
        """Blocks that appending `n_tokens` takes, and whether the last block must be copied
        first: it is partly filled and shared, and the new tokens would be written into it."""
        table, length = self._tables[seq_id], self._lens[seq_id]
        new_blocks = self.blocks_needed(length + n_tokens) - len(table)
        cow = n_tokens > 0 and length % self.block_size != 0 and self._ref_counts[table[-1]] > 1
        return new_blocks + cow, cow

    def can_append(self, seq_id: Hashable, n_tokens: int = 1) -> bool:
        need, _ = self._append_cost(self._known(seq_id), _count("n_tokens", n_tokens))
        return need <= len(self._free)

    def append(self, seq_id: Hashable, n_tokens: int = 1) -> list[tuple[int, int]]:
        """Make room for `n_tokens` more tokens (a decode step appends 1).

        Returns the copy-on-write pairs `(src, dst)`: blocks whose contents the caller must copy
        in the KV pool before writing the new tokens (empty unless the last block was shared).
        """
        need, cow = self._append_cost(self._known(seq_id), _count("n_tokens", n_tokens))
        if need > len(self._free):
            raise OutOfBlocksError(
                f"sequence {seq_id!r}: {n_tokens} more tokens need {need} blocks, "
                f"{len(self._free)} free"
            )
        table, copies = self._tables[seq_id], []
        if cow:  # the other holders keep the old block; this sequence writes into a copy
            src = table[-1]
            self._ref_counts[src] -= 1
            table[-1] = self._take()
            copies.append((src, table[-1]))
        table.extend(self._take() for _ in range(need - cow))
        self._lens[seq_id] += n_tokens
        return copies

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Start `child_id` as a copy of `parent_id` that shares all its blocks (no new block)."""
        table = self._tables[self._known(parent_id)]
        self._new(child_id)
        for block in table:
            self._ref_counts[block] += 1
        self._tables[child_id] = list(table)
        self._lens[child_id] = self._lens[parent_id]

    # -- what the kernels take (task 5) and reports (task 6) -----------------------------------
    def slot_mapping(self, seq_id: Hashable, positions: Iterable[int]) -> list[int]:
        """Physical slot `block * block_size + offset` of each token position (< seq_len)."""
        table, length, bs = self._tables[self._known(seq_id)], self._lens[seq_id], self.block_size
        slots = []
        for pos in positions:
            if _count("position", pos) >= length:
                raise ValueError(f"position {pos} >= length {length} of sequence {seq_id!r}")
            slots.append(table[pos // bs] * bs + pos % bs)
        return slots

    def block_table_array(
        self, seq_ids: Sequence[Hashable], max_blocks: int | None = None
    ) -> mx.array:
        """Block tables as an int32 array [len(seq_ids), max_blocks], rows padded with -1.

        `max_blocks` defaults to the longest table; a table longer than it is an error."""
        tables = [self._tables[self._known(s)] for s in seq_ids]
        longest = max(map(len, tables), default=0)
        width = longest if max_blocks is None else _count("max_blocks", max_blocks)
        if longest > width:
            raise ValueError(f"a block table has {longest} blocks, more than max_blocks={width}")
        rows = [t + [-1] * (width - len(t)) for t in tables]
        return mx.array(rows, dtype=mx.int32).reshape(len(tables), width)

    def usage(self) -> BlockUsage:
        filled: dict[int, int] = {}  # block -> tokens in it; every holder agrees
        for seq_id, table in self._tables.items():
            for i, block in enumerate(table):
                filled[block] = min(self.block_size, self._lens[seq_id] - i * self.block_size)
        used = self.num_used_blocks
        return BlockUsage(used, len(self._free), used * self.block_size, sum(filled.values()))
