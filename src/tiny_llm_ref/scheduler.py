"""Week 3 Day 4 (continuous batching) and Day 7 (preemption): which sequences run next step.

Scheduling happens at every iteration, not once per batch: a step either prefills newly
admitted sequences or decodes one token for every running one. Requests wait in FIFO order
and are admitted as soon as the pool has blocks for their prompt (and still leaves every
running sequence room to grow by one token); a finished sequence leaves at once and its
blocks serve the next request in the same step. When the running sequences cannot all grow,
the most recently admitted one is preempted: its blocks are freed, and it goes back to the
front of the queue to be recomputed (prompt plus what it generated) when blocks free up.

Chapters: book/src/week3-04-continuous-batching.md, book/src/week3-07-preemption.md.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .paged_kv_cache import PagedKVCache
from .prefix_cache import PrefixCachingBlockManager
from .sequence import SeqStatus, Sequence


@dataclass
class ScheduledBatch:
    """One forward pass: `seqs[b]` feeds its next `num_new_tokens[b]` uncached tokens."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    is_prefill: bool


class Scheduler:
    """Waiting and running queues over one paged cache."""

    def __init__(
        self, cache: PagedKVCache, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048
    ):
        for name, value in (
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.num_preemptions = 0

    # -- queues (provided) ------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose blocks are already in the cache (a forked sample)."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence: its blocks go back to the pool now, for this very step's admissions."""
        self.running.remove(seq)
        self.cache.free(seq.seq_id)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason

    # -- Day 4, tasks 1-2: one step's batch -------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        """Prefill admitted waiting sequences if any can be admitted; otherwise decode every
        running sequence (preempting some if the pool is short). None when nothing is left."""
        admitted = self._admit()
        if admitted:
            return ScheduledBatch(admitted, [s.num_to_compute for s in admitted], True)
        if not self.running:
            return None
        ids = [s.seq_id for s in self.running]
        if not self.cache.can_begin_step(ids, [1] * len(ids)):  # short of blocks (Day 7)
            self._make_room_for_decode()
        return ScheduledBatch(list(self.running), [1] * len(self.running), False)

    def _admit(self) -> list[Sequence]:
        """Move waiting sequences to running, FIFO, while the limits and the pool allow."""
        cache, batch = self.cache, []
        prefix = isinstance(cache.manager, PrefixCachingBlockManager)
        # Blocks the running sequences need to decode their next token stay reserved, so an
        # admission does not force a preemption on the very next step.
        ids = [s.seq_id for s in self.running]
        reserve = cache.blocks_for_step(ids, [1] * len(ids)) if ids else 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            if prefix:  # take the cached prefix's blocks (they leave the free list if free)
                seq.num_cached = cache.manager.allocate_cached(seq.seq_id, seq.tokens)
            candidate = batch + [seq]
            counts = [s.num_to_compute for s in candidate]
            padded = len(candidate) * max(counts)  # a prefill batch is [B, longest] tokens
            need = cache.blocks_for_step([s.seq_id for s in candidate], counts) + reserve
            if (batch and padded > self.max_num_batched_tokens) or need > cache.num_free_blocks:
                if prefix:  # give the prefix back; it is taken again next time
                    cache.free(seq.seq_id)
                    seq.num_cached = 0
                break
            self.waiting.popleft()
            batch.append(seq)
        for seq in batch:
            seq.status = SeqStatus.RUNNING
        self.running.extend(batch)
        return batch

    # -- Day 7, tasks 1-2: preemption -------------------------------------------------------------
    def _make_room_for_decode(self) -> None:
        """Preempt the most recently admitted sequences until all the others can decode."""
        while not self.cache.can_begin_step(
            [s.seq_id for s in self.running], [1] * len(self.running)
        ):
            if len(self.running) == 1:
                raise RuntimeError(
                    f"sequence {self.running[0].seq_id} cannot grow even alone in the pool: "
                    "requests must be checked against the pool's capacity at submission"
                )
            self.preempt(self.running[-1])

    def preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks; it waits at the front of the queue to be recomputed."""
        self.running.remove(seq)
        self.cache.free(seq.seq_id)
        seq.num_cached = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
