"""Week 3 optional Day 8: multi-head, grouped-query and multi-query attention, measured in a pool.

The KV cache stores what `k_proj` and `v_proj` produce, so its size follows the number of KV
heads, not query heads. Today's functions put numbers on that for one model shape: the bytes a
block of the paged pool holds, the tokens (and seeded requests) a pool of fixed size serves, what
the Week 3 decode kernel reads per token for each grouping, and a checkpoint converted to another
number of KV heads (repeating heads: exact; mean-pooling them: the GQA paper's starting point
before uptraining).

Chapter: book/src/week3-08-gqa-measured.md.
"""

from __future__ import annotations

import dataclasses  # noqa: F401 (dataclasses.replace)
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

import mlx.core as mx

from tiny_llm_common.weights import ModelArgs, QuantizedWeights

from .kv_memory import kv_bytes_per_token  # noqa: F401

# The Week 3 kernel serves at most this many query heads of one KV head per threadgroup
# (PAGED_ATTENTION_MAX_HEADS in src/extensions_ref/src/paged_attention_params.h).
KERNEL_MAX_HEADS = 8


def _positive(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


@dataclass(frozen=True)
class DecodeTraffic:
    """What the Week 3 paged kernel does for one new token of one sequence, all layers."""

    threadgroups: int  # layers x H_kv x slices: one per (KV head, slice of <= 8 query heads)
    query_heads_per_kv_head: int  # H_q / H_kv, the group size
    kv_bytes_read: int  # K and V rows read from the pool (a row once per threadgroup)
    kv_bytes_stored: int  # K and V bytes the sequence holds: the floor for kv_bytes_read


# -- task 1: the same model with another number of KV heads -------------------------------------
def with_kv_heads(args: ModelArgs, num_kv_heads: int) -> ModelArgs:
    """A copy of `args` with `num_kv_heads` KV heads: num_attention_heads for multi-head
    attention, 1 for multi-query, any other divisor of the query heads for grouped-query."""
    # TODO(Week 3 Day 8, task 1): check num_kv_heads with _positive, then a ValueError unless it
    # divides args.num_attention_heads (every query head reads exactly one KV head, and every KV
    # head serves as many). Return dataclasses.replace(args, num_key_value_heads=...): a copy.
    raise NotImplementedError(
        "Week 3 Day 8, task 1: implement `with_kv_heads` in src/tiny_llm/kv_budget.py"
    )


# -- task 2: a pool of fixed size ---------------------------------------------------------------
def block_bytes(args: ModelArgs, block_size: int, dtype: mx.Dtype | str) -> int:
    """Bytes one block id of the paged pool holds: `block_size` tokens' keys and values in
    every layer (what `PagedKVCache.bytes_per_block` reports)."""
    # TODO(Week 3 Day 8, task 2): block_size (checked with _positive) tokens of
    # kv_bytes_per_token(args, dtype) (Week 2 Day 3) each.
    raise NotImplementedError(
        "Week 3 Day 8, task 2: implement `block_bytes` in src/tiny_llm/kv_budget.py"
    )


def max_tokens_in_pool(
    args: ModelArgs, pool_bytes: int, block_size: int, dtype: mx.Dtype | str
) -> int:
    """Tokens a pool of `pool_bytes` bytes can hold: whole blocks only."""
    # TODO(Week 3 Day 8, task 2): pool_bytes checked with _positive(..., minimum=0); whole
    # blocks of block_bytes(...) bytes, block_size tokens each.
    raise NotImplementedError(
        "Week 3 Day 8, task 2: implement `max_tokens_in_pool` in src/tiny_llm/kv_budget.py"
    )


# -- task 3: the seeded workload in that pool ---------------------------------------------------
def requests_in_pool(lengths: Iterable[int], num_blocks: int, block_size: int) -> int:
    """How many requests, taken in order, fit in `num_blocks` blocks at once, each at its full
    length (ceil(length / block_size) blocks each): the largest k with sum of the first k <= pool.
    """
    # TODO(Week 3 Day 8, task 3): check num_blocks (>= 0) and block_size (>= 1). Walk `lengths`
    # (any iterable; each an int >= 1) adding ceil(length / block_size) blocks; stop at the
    # first request that no longer fits and return how many did.
    raise NotImplementedError(
        "Week 3 Day 8, task 3: implement `requests_in_pool` in src/tiny_llm/kv_budget.py"
    )


# -- task 4: what the decode kernel reads -------------------------------------------------------
def decode_traffic(
    args: ModelArgs,
    context_len: int,
    dtype: mx.Dtype | str,
    max_heads: int = KERNEL_MAX_HEADS,
) -> DecodeTraffic:
    """The Week 3 kernel's work for one decode token over `context_len` stored tokens.

    One threadgroup per (KV head, slice): a slice is at most `max_heads` of the query heads that
    share the KV head, so a group of G query heads takes ceil(G / max_heads) slices, and each
    slice reads the KV head's rows once for all its query heads.
    """
    # TODO(Week 3 Day 8, task 4): check context_len (>= 0) and max_heads (>= 1).
    # group = H_q / H_kv, slices = ceil(group / max_heads),
    # threadgroups = layers x H_kv x slices,
    # kv_bytes_stored = context_len x kv_bytes_per_token(args, dtype),
    # kv_bytes_read = kv_bytes_stored x slices (each slice reads its KV head's rows once).
    raise NotImplementedError(
        "Week 3 Day 8, task 4: implement `decode_traffic` in src/tiny_llm/kv_budget.py"
    )


# -- task 5: convert a checkpoint to another number of KV heads ---------------------------------
def _dense(w) -> mx.array:
    if isinstance(w, QuantizedWeights):
        return mx.dequantize(
            w.weight, w.scales, w.biases, group_size=w.group_size, bits=w.bits
        ).astype(mx.float32)
    return w.astype(mx.float32)


def regroup_kv_heads(
    args: ModelArgs, weights: dict, num_kv_heads: int
) -> tuple[ModelArgs, dict[str, mx.array | QuantizedWeights]]:
    """The checkpoint converted to `num_kv_heads` KV heads: (new args, new weights).

    More heads (a multiple of the current count): each KV head's k/v_proj rows (and biases) are
    repeated, so the model computes exactly the same function with a bigger cache. Fewer (a
    divisor): each run of adjacent KV heads is mean-pooled into one, float32 (the GQA paper's
    conversion; without uptraining the model gets worse). Other tensors are shared, not copied.
    """
    # TODO(Week 3 Day 8, task 5): new_args = with_kv_heads(args, num_kv_heads); a ValueError
    # unless the new count is a multiple or a divisor of the old one. Copy the dict, then for
    # every layer i replace model.layers.{i}.self_attn.{k,v}_proj.weight (and .bias when
    # present; a missing .weight is a KeyError). Their rows are head-major, [H_kv * head_dim, ...]:
    # - more heads (r = new / old): repeat each head's rows r times in place ([h0, h0, h1, h1]),
    #   so new head j serves the query heads old head j // r served. For QuantizedWeights repeat
    #   the rows of .weight, .scales and .biases alike: exact, and it stays quantized.
    # - fewer heads: _dense(w), reshape to [new, old // new, head_dim, ...], mean over axis 1,
    #   reshape back: adjacent KV heads merge, as their groups of query heads do.
    raise NotImplementedError(
        "Week 3 Day 8, task 5: implement `regroup_kv_heads` in src/tiny_llm/kv_budget.py"
    )
