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
    candidates = _evictable(num_blocks, num_evict, sink_blocks, recent_blocks)
    return list(candidates[:num_evict])


def h2o_victims(
    block_scores: Sequence[float] | np.ndarray,
    num_evict: int,
    sink_blocks: int,
    recent_blocks: int,
) -> list[int]:
    """The `num_evict` unprotected logical blocks with the smallest accumulated attention
    (`block_scores[j]` for block j; the older block first on a tie), in increasing order."""
    scores = np.asarray(block_scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"block_scores must be 1-D (one score per block), got {scores.shape}")
    allowed = _evictable(len(scores), num_evict, sink_blocks, recent_blocks)
    candidates = np.arange(allowed.start, allowed.stop)
    order = candidates[np.argsort(scores[candidates], kind="stable")]
    return sorted(int(j) for j in order[:num_evict])


# -- task 2: the attention weights H2O sums -----------------------------------------------------
def attention_weights(
    q: mx.array, k: mx.array, scale: float, mask: mx.array | None = None
) -> mx.array:
    """softmax(scale * q k^T + mask) for grouped-query attention, in float32.

    q [B, H_q, L, D], k [B, H_kv, S, D] -> [B, H_q, L, S]; query head h reads KV head
    h // (H_q / H_kv). `mask` is additive (0 / -inf), broadcastable to [B, H_q, L, S].
    """
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} must be [B, H_q, L, D] and [B, H_kv, S, D]")
    B, h_q, L, D = q.shape
    h_kv, S = k.shape[1], k.shape[2]
    if h_q % h_kv:
        raise ValueError(f"query heads ({h_q}) must be a multiple of KV heads ({h_kv})")
    group = h_q // h_kv
    qg = q.astype(mx.float32).reshape(B, h_kv, group, L, D)
    scores = (qg @ k.astype(mx.float32)[:, :, None].swapaxes(-1, -2)) * scale
    scores = scores.reshape(B, h_q, L, S)
    if mask is not None:
        scores = scores + mask.astype(mx.float32)
    return mx.softmax(scores, axis=-1)


# -- task 3: dropping blocks from a table -------------------------------------------------------
class EvictingBlockManager(BlockManager):
    """Day 1's block manager plus one operation: drop full blocks from a sequence's table."""

    def evict(self, seq_id: Hashable, logical_blocks: Sequence[int]) -> list[int]:
        """Remove logical blocks `logical_blocks` (full ones only) of `seq_id`; the blocks after
        them move up, the length drops by block_size each. Returns the physical blocks that
        became free (a block another sequence still holds is not freed)."""
        table = self._tables[self._known(seq_id)]
        full = self._lens[seq_id] // self.block_size
        drop = sorted({_count("logical block", j) for j in logical_blocks})
        if len(drop) != len(logical_blocks):
            raise ValueError(f"a logical block appears twice in {list(logical_blocks)}")
        if drop and drop[-1] >= full:
            raise ValueError(
                f"sequence {seq_id!r} has {full} full blocks; only those can be evicted, "
                f"got {drop[-1]}"
            )
        freed = []
        for j in drop:
            block = table[j]
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free.append(block)
                freed.append(block)
        keep = set(range(len(table))) - set(drop)
        table[:] = [table[j] for j in sorted(keep)]
        self._lens[seq_id] -= len(drop) * self.block_size
        return freed


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
        bs = self.block_size
        for s, n in zip(seq_ids, num_new, strict=True):
            over = (self.seq_len(s) + n - self.max_tokens) if s in self else 0
            if over <= 0:
                continue
            k, blocks = -(-over // bs), len(self.block_table(s))
            if self.policy == "window":
                victims = sink_window_victims(blocks, k, self.sink_blocks, self.recent_blocks)
            else:
                scores = self._scores[s]
                per_block = np.add.reduceat(scores, np.arange(0, len(scores), bs))
                victims = h2o_victims(per_block, k, self.sink_blocks, self.recent_blocks)
            self._evict(s, victims)

        seen = [self._seen.get(s, 0) for s in seq_ids]
        step = super().begin_step(seq_ids, num_new)
        for s, n, before in zip(seq_ids, num_new, seen, strict=True):
            self._seen[s] = before + n
            self._positions.setdefault(s, []).extend(range(before, before + n))
            if self.policy == "h2o":
                self._scores[s] = np.concatenate([self._scores.get(s, np.zeros(0)), np.zeros(n)])
        # The stored context shrank; the queries' positions did not.
        step.offset = seen[0] if len(seq_ids) == 1 else mx.array(seen, dtype=mx.int32)
        return step


class EvictingLayerCache(PagedLayerCache):
    """A layer of the evicting cache: stores and attends as Day 3's; for h2o it also adds up,
    for every stored slot, the attention this step's real queries gave it."""

    # -- task 5: the attention H2O needs ----------------------------------------------------------
    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        out = super().attend(q, k, v, scale)
        pool = self.pool
        if pool.policy != "h2o":
            return out
        step = pool.step
        key_cache = pool.keys[self.layer]
        num_blocks, bs, h_kv, d = key_cache.shape
        B, width = step.block_tables.shape
        ids = mx.clip(step.block_tables, 0, num_blocks - 1)
        keys = key_cache[ids].reshape(B, width * bs, h_kv, d).transpose(0, 2, 1, 3)
        if step.mask is None:  # decode: every slot below the context length is visible
            visible = mx.arange(width * bs)[None, :] < step.context_lens[:, None]
            mask = mx.where(visible, 0.0, -mx.inf)[:, None, None, :]
        else:
            mask = step.mask
        weights = attention_weights(q, keys, scale, mask)  # [B, H_q, L, S]
        real = mx.arange(step.length)[None, :] < mx.array(step.num_new)[:, None]  # [B, L]
        per_slot = (weights.sum(axis=1) * real[:, :, None]).sum(axis=1)  # [B, S]
        pool._pending.append((step, per_slot))
        return out
