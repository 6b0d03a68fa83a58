"""Week 3 optional Day 10: a bounded paged cache that evicts whole blocks.

A sequence may hold at most `max_tokens` tokens in the pool. When a step would take it past
that, whole blocks are dropped from its block table and go straight back to the pool's free
list; the tokens after them move up in the table (every block but the last is full, so the
table stays dense and `token t -> block t // block_size` still holds for the *stored* tokens).
Which blocks go is the policy:

- "window" (StreamingLLM): keep the first `sink_tokens` (attention sinks) and the most recent
  tokens; evict the oldest block in between.
- "h2o" (Heavy-Hitter Oracle): keep the first `sink_tokens` and the last `recent_tokens`; among
  the rest, evict the block whose keys have gathered the least attention so far, summed over
  layers, heads and every query that has seen them.

Keys are stored after RoPE, so a kept key keeps its true position; only the query's RoPE offset
must keep counting real positions while the stored context shrinks. This cache therefore tracks
two lengths per sequence: tokens stored (what the block manager, the slot mapping and the masks
use) and tokens seen (the RoPE offset).

Chapter: book/src/week3-10-eviction.md.
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Sequence

import mlx.core as mx
import numpy as np

from .block_manager import BlockManager
from .paged_kv_cache import PagedKVCache, PagedLayerCache, PagedStep

POLICIES = ("window", "h2o")


def _count(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _evictable(num_blocks: int, num_evict: int, sink_blocks: int, recent_blocks: int) -> range:
    """Logical blocks a policy may choose from: after the sinks, before the recent window."""
    for name, v in (
        ("num_blocks", num_blocks),
        ("num_evict", num_evict),
        ("sink_blocks", sink_blocks),
        ("recent_blocks", recent_blocks),
    ):
        _count(name, v)
    candidates = range(sink_blocks, max(sink_blocks, num_blocks - recent_blocks))
    if num_evict > len(candidates):
        raise ValueError(
            f"cannot evict {num_evict} of {num_blocks} blocks: {sink_blocks} sink and "
            f"{recent_blocks} recent blocks are protected, {len(candidates)} may go"
        )
    return candidates


# -- task 1: which blocks go --------------------------------------------------------------------
def sink_window_victims(
    num_blocks: int, num_evict: int, sink_blocks: int, recent_blocks: int
) -> list[int]:
    """The `num_evict` oldest logical blocks that are neither sinks (the first `sink_blocks`)
    nor recent (the last `recent_blocks`), in increasing order."""
    # TODO(Week 3 Day 10, task 1): candidates = _evictable(num_blocks, num_evict, sink_blocks,
    # recent_blocks) checks the arguments and returns the range of blocks a policy may drop
    # (ValueError when num_evict is more than it holds). Window: the oldest num_evict of them.
    raise NotImplementedError(
        "Week 3 Day 10, task 1: implement `sink_window_victims` in src/tiny_llm/kv_eviction.py"
    )


def h2o_victims(
    block_scores: Sequence[float] | np.ndarray,
    num_evict: int,
    sink_blocks: int,
    recent_blocks: int,
) -> list[int]:
    """The `num_evict` unprotected logical blocks with the smallest accumulated attention
    (`block_scores[j]` for block j; the older block first on a tie), in increasing order."""
    # TODO(Week 3 Day 10, task 1): block_scores as a 1-D float64 NumPy array (ValueError if not
    # 1-D); the candidates from _evictable(len(scores), ...); sort them by score with a *stable*
    # sort (np.argsort(..., kind="stable")) so that the older block wins a tie; return the first
    # num_evict, as sorted Python ints.
    raise NotImplementedError(
        "Week 3 Day 10, task 1: implement `h2o_victims` in src/tiny_llm/kv_eviction.py"
    )


# -- task 2: the attention weights H2O sums -----------------------------------------------------
def attention_weights(
    q: mx.array, k: mx.array, scale: float, mask: mx.array | None = None
) -> mx.array:
    """softmax(scale * q k^T + mask) for grouped-query attention, in float32.

    q [B, H_q, L, D], k [B, H_kv, S, D] -> [B, H_q, L, S]; query head h reads KV head
    h // (H_q / H_kv). `mask` is additive (0 / -inf), broadcastable to [B, H_q, L, S].
    """
    # TODO(Week 3 Day 10, task 2): ValueError for shapes that do not fit (as the docstring says).
    # Group the query heads instead of repeating K: q as [B, H_kv, G, L, D] (G = H_q / H_kv) in
    # float32, k as [B, H_kv, 1, S, D]; scores = q @ k^T * scale, back to [B, H_q, L, S]; add the
    # mask (float32) if any; softmax over the last axis.
    raise NotImplementedError(
        "Week 3 Day 10, task 2: implement `attention_weights` in src/tiny_llm/kv_eviction.py"
    )


# -- task 3: dropping blocks from a table -------------------------------------------------------
class EvictingBlockManager(BlockManager):
    """Day 1's block manager plus one operation: drop full blocks from a sequence's table."""

    def evict(self, seq_id: Hashable, logical_blocks: Sequence[int]) -> list[int]:
        """Remove logical blocks `logical_blocks` (full ones only) of `seq_id`; the blocks after
        them move up, the length drops by block_size each. Returns the physical blocks that
        became free (a block another sequence still holds is not freed)."""
        # TODO(Week 3 Day 10, task 3): table = self._tables[self._known(seq_id)]. ValueError for
        # a repeated logical block, or one that is not full (index >= seq_len // block_size).
        # For each dropped block: decrement self._ref_counts[block]; at 0 append it to self._free
        # (and to the list you return). Rebuild the table without the dropped entries (in place:
        # table[:] = ...), and take block_size tokens per dropped block off self._lens[seq_id].
        raise NotImplementedError(
            "Week 3 Day 10, task 3: implement `EvictingBlockManager.evict` in "
            "src/tiny_llm/kv_eviction.py"
        )


class EvictingPagedKVCache(PagedKVCache):
    """A PagedKVCache that keeps each sequence within `max_tokens` stored tokens.

    `max_tokens` is a multiple of `block_size`. The first `sink_tokens` (default: one block)
    and the last `recent_tokens` (default: one block for "window", half the budget for "h2o")
    are never evicted, both rounded up to whole blocks. A step of up to
    `max_step_tokens = max_tokens - (sink + recent blocks) * block_size` new tokens always fits
    (a new sequence may bring up to max_tokens); chunk longer prompts.
    """

    def __init__(
        self,
        model_or_args,
        num_blocks: int,
        block_size: int = 16,
        dtype=mx.float32,
        *,
        max_tokens: int,
        policy: str = "window",
        sink_tokens: int | None = None,
        recent_tokens: int | None = None,
    ):
        super().__init__(model_or_args, num_blocks, block_size, dtype)
        self.manager = EvictingBlockManager(num_blocks, block_size)
        self._layers = [EvictingLayerCache(self, i) for i in range(len(self.keys))]
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        bs = self.block_size
        self.policy = policy
        self.max_tokens = _count("max_tokens", max_tokens, minimum=1)
        if self.max_tokens % bs:
            raise ValueError(f"max_tokens ({max_tokens}) must be a multiple of block_size ({bs})")
        if sink_tokens is None:
            sink_tokens = bs
        if recent_tokens is None:
            recent_tokens = bs if policy == "window" else self.max_tokens // 2
        self.sink_blocks = -(-_count("sink_tokens", sink_tokens) // bs)
        self.recent_blocks = max(1, -(-_count("recent_tokens", recent_tokens) // bs))
        self.max_step_tokens = self.max_tokens - (self.sink_blocks + self.recent_blocks) * bs
        if self.max_step_tokens < 1:
            raise ValueError(
                f"max_tokens={max_tokens} leaves no room for a new token next to "
                f"{self.sink_blocks} sink and {self.recent_blocks} recent blocks of {bs}"
            )
        self._seen: dict[Hashable, int] = {}  # tokens seen: the next RoPE position
        self._positions: dict[Hashable, list[int]] = {}  # real position of each stored token
        self._scores: dict[Hashable, np.ndarray] = {}  # h2o: attention gathered per stored token
        self._pending: list[tuple[PagedStep, mx.array]] = []  # h2o: [B, S] per layer, last step

    # -- what a sequence holds (provided) --------------------------------------------------------
    def tokens_seen(self, seq_id: Hashable) -> int:
        """Tokens the sequence has been given so far (stored or evicted): its next position."""
        if seq_id not in self._seen:
            raise ValueError(f"unknown sequence {seq_id!r}")
        return self._seen[seq_id]

    def kept_positions(self, seq_id: Hashable) -> list[int]:
        """Real positions of the tokens still stored, in table order (increasing)."""
        if seq_id not in self._positions:
            raise ValueError(f"unknown sequence {seq_id!r}")
        return list(self._positions[seq_id])

    def token_scores(self, seq_id: Hashable) -> np.ndarray:
        """h2o: attention each stored token has received so far (summed over layers, query
        heads and queries), in table order."""
        if self.policy != "h2o":
            raise RuntimeError("only the h2o policy scores tokens")
        self._fold_scores()
        if seq_id not in self._scores:
            raise ValueError(f"unknown sequence {seq_id!r}")
        return self._scores[seq_id].copy()

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Start `child_id` as a copy of `parent_id`, sharing its blocks (Day 5's fork)."""
        self._fold_scores()
        self.manager.fork(parent_id, child_id)
        self._seen[child_id] = self._seen[parent_id]
        self._positions[child_id] = list(self._positions[parent_id])
        if self.policy == "h2o":
            self._scores[child_id] = self._scores[parent_id].copy()

    def free(self, seq_id: Hashable) -> None:
        self._fold_scores()
        super().free(seq_id)
        for d in (self._seen, self._positions, self._scores):
            d.pop(seq_id, None)

    def _fold_scores(self) -> None:
        """Add the last forward pass's attention (one [B, S] array per layer) to the tokens'
        scores. A host read: it waits for that forward pass."""
        if not self._pending:
            return
        step = self._pending[0][0]
        total = np.array(sum(c for _, c in self._pending), dtype=np.float64)
        self._pending = []
        for b, s in enumerate(step.seq_ids):
            if s in self._scores:  # stored tokens after that step, unchanged since
                n = len(self._scores[s])
                self._scores[s] += total[b, :n]

    def _least_stored(self, seq_id: Hashable) -> int:
        """Tokens `seq_id` would still store with every unprotected block evicted."""
        if seq_id not in self:
            return 0
        blocks = len(self.block_table(seq_id))
        evictable = max(0, blocks - self.sink_blocks - self.recent_blocks)
        return self.seq_len(seq_id) - evictable * self.block_size

    def _evict(self, seq_id: Hashable, victims: list[int]) -> None:
        """Drop logical blocks `victims` from the table, the positions and the scores."""
        self.manager.evict(seq_id, victims)
        bs, gone = self.block_size, set(victims)
        keep = [t for t in range(len(self._positions[seq_id])) if t // bs not in gone]
        self._positions[seq_id] = [self._positions[seq_id][t] for t in keep]
        if self.policy == "h2o":
            self._scores[seq_id] = self._scores[seq_id][keep]

    # -- task 4: evict, then step with the true RoPE positions ----------------------------------
    def begin_step(self, seq_ids: Sequence[Hashable], num_new_tokens: Sequence[int]) -> PagedStep:
        """Evict blocks so that every sequence stays within `max_tokens` after this step, then
        prepare the step as PagedKVCache does, with RoPE offsets that count tokens seen.

        Evicted blocks are free before the step takes new ones. An OutOfBlocksError (pool too
        small) leaves the sequences as they were apart from those evictions, which stand.
        """
        seq_ids, num_new = self._check_step(seq_ids, num_new_tokens)
        self._fold_scores()
        for s, n in zip(seq_ids, num_new, strict=True):
            room = self.max_tokens - self._least_stored(s)
            if n > room:
                raise ValueError(
                    f"sequence {s!r}: {n} new tokens, but only {room} fit within "
                    f"max_tokens={self.max_tokens} next to its protected blocks: chunk it "
                    f"(a step of {self.max_step_tokens} tokens always fits)"
                )
            end = self._seen.get(s, 0) + n
            if self.max_positions is not None and end > self.max_positions:
                raise ValueError(
                    f"sequence {s!r} would reach position {end}, past max_position_embeddings "
                    f"({self.max_positions})"
                )
        # TODO(Week 3 Day 10, task 4):
        # 1. For each known sequence that would pass max_tokens (seq_len + n > max_tokens): evict
        #    k = ceil(over / block_size) logical blocks out of len(self.block_table(s)).
        #    window: sink_window_victims(blocks, k, self.sink_blocks, self.recent_blocks);
        #    h2o: the blocks' scores are sums of self._scores[s] over each block_size run of tokens
        #    (np.add.reduceat), then h2o_victims(...). self._evict(s, victims) drops them from the
        #    manager, the positions and the scores.
        # 2. seen = tokens seen before this step (self._seen.get(s, 0)), then
        #    step = super().begin_step(...): allocation, slots, tables and masks use the
        #    *stored* lengths.
        # 3. Then record the new tokens: self._seen[s] += n, their real positions appended to
        #    self._positions[s] (setdefault), and for h2o n zero scores appended to self._scores[s].
        # 4. step.offset = the tokens seen before the step (an int for one sequence, else an int32
        #    mx.array): RoPE must keep counting real positions. Return the step.
        raise NotImplementedError(
            "Week 3 Day 10, task 4: implement `EvictingPagedKVCache.begin_step` in "
            "src/tiny_llm/kv_eviction.py"
        )


class EvictingLayerCache(PagedLayerCache):
    """A layer of the evicting cache: stores and attends as Day 3's; for h2o it also adds up,
    for every stored slot, the attention this step's real queries gave it."""

    # -- task 5: the attention H2O needs ----------------------------------------------------------
    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        out = super().attend(q, k, v, scale)
        pool = self.pool
        if pool.policy != "h2o":
            return out
        # TODO(Week 3 Day 10, task 5): add up the attention this step's real queries give each
        # stored slot, for the cache to fold into the tokens' scores at the next begin_step:
        # 1. step = pool.step. Gather this layer's keys through step.block_tables (ids clipped to
        #    [0, num_blocks), as gather_kv_batch does): [B, H_kv, S, D] with
        #    S = max_blocks * block_size.
        # 2. mask: step.mask when the step has one (L > 1); for a decode step, 0 where slot
        #    j < step.context_lens[b] and -inf elsewhere, shaped [B, 1, 1, S].
        # 3. weights = attention_weights(q, keys, scale, mask)  # [B, H_q, L, S]
        # 4. Sum over heads, zero the padding queries (column i of row b is real when
        #    i < step.num_new[b]), sum over queries: per_slot [B, S].
        # 5. pool._pending.append((step, per_slot)); return out. Read nothing on the host here.
        raise NotImplementedError(
            "Week 3 Day 10, task 5: implement `EvictingLayerCache.attend` in "
            "src/tiny_llm/kv_eviction.py"
        )
