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
from .prefix_cache import PrefixCachingBlockManager  # noqa: F401 (for _admit)
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
        # TODO(Week 3 Day 4, task 1):
        # 1. admitted = self._admit(); if any, return a prefill batch of them, each feeding its
        #    `num_to_compute` tokens.
        # 2. Nothing running: return None.
        # 3. If the running sequences cannot all grow by one token (cache.can_begin_step), call
        #    self._make_room_for_decode() (Day 7; Day 4's graders never run short). Return a
        #    decode batch: every running sequence, one token each.
        raise NotImplementedError(
            "Week 3 Day 4, task 1: implement `schedule` in src/tiny_llm/scheduler.py"
        )

    def _admit(self) -> list[Sequence]:
        """Move waiting sequences to running, FIFO, while the limits and the pool allow."""
        # TODO(Week 3 Day 4, task 2): take sequences from the left of self.waiting while
        # - running + admitted stay within max_num_seqs;
        # - the prefill batch, len(batch) * longest num_to_compute tokens once padded, stays within
        #   max_num_batched_tokens (a single sequence is always allowed);
        # - cache.blocks_for_step(batch ids, their num_to_compute), plus the blocks the running
        #   sequences need to decode one more token (reserve them, so that an admission does
        #   not force a preemption on the next step), fit in cache.num_free_blocks.
        # Stop at the first that does not fit (FIFO: no overtaking). Mark the admitted RUNNING,
        # append them to self.running, return them.
        # Day 6: with a PrefixCachingBlockManager (cache.manager), first give the candidate its
        # cached prefix: seq.num_cached = cache.manager.allocate_cached(seq.seq_id, seq.tokens).
        # If it is not admitted after all, cache.free(seq.seq_id) and reset num_cached to 0.
        raise NotImplementedError(
            "Week 3 Day 4, task 2: implement `_admit` in src/tiny_llm/scheduler.py"
        )

    # -- Day 7, tasks 1-2: preemption -------------------------------------------------------------
    def _make_room_for_decode(self) -> None:
        """Preempt the most recently admitted sequences until all the others can decode."""
        # TODO(Week 3 Day 7, task 1): while the running sequences cannot all grow by one token
        # (self.cache.can_begin_step), preempt the last of self.running. If a sequence cannot
        # grow even alone, raise RuntimeError (submission checks make that impossible).
        raise NotImplementedError(
            "Week 3 Day 7, task 1: implement `_make_room_for_decode` in src/tiny_llm/scheduler.py"
        )

    def preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks; it waits at the front of the queue to be recomputed."""
        # TODO(Week 3 Day 7, task 2): remove it from running, free its blocks in the cache,
        # num_cached = 0 (its prompt and output are all recomputed), status WAITING, put it at
        # the LEFT of self.waiting, and count it in self.num_preemptions.
        raise NotImplementedError(
            "Week 3 Day 7, task 2: implement `preempt` in src/tiny_llm/scheduler.py"
        )
