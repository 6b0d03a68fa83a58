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

import dataclasses
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

import mlx.core as mx

from tiny_llm_common.weights import ModelArgs, QuantizedWeights

from .kv_memory import kv_bytes_per_token

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
    n = _positive("num_kv_heads", num_kv_heads)
    heads = args.num_attention_heads
    if heads % n:
        raise ValueError(
            f"num_kv_heads must divide num_attention_heads ({heads}), got {n}: every query "
            "head reads exactly one KV head, and every KV head serves the same number"
        )
    return dataclasses.replace(args, num_key_value_heads=n)


# -- task 2: a pool of fixed size ---------------------------------------------------------------
def block_bytes(args: ModelArgs, block_size: int, dtype: mx.Dtype | str) -> int:
    """Bytes one block id of the paged pool holds: `block_size` tokens' keys and values in
    every layer (what `PagedKVCache.bytes_per_block` reports)."""
    return _positive("block_size", block_size) * kv_bytes_per_token(args, dtype)


def max_tokens_in_pool(
    args: ModelArgs, pool_bytes: int, block_size: int, dtype: mx.Dtype | str
) -> int:
    """Tokens a pool of `pool_bytes` bytes can hold: whole blocks only."""
    pool = _positive("pool_bytes", pool_bytes, minimum=0)
    return pool // block_bytes(args, block_size, dtype) * block_size


# -- task 3: the seeded workload in that pool ---------------------------------------------------
def requests_in_pool(lengths: Iterable[int], num_blocks: int, block_size: int) -> int:
    """How many requests, taken in order, fit in `num_blocks` blocks at once, each at its full
    length (ceil(length / block_size) blocks each): the largest k with sum of the first k <= pool.
    """
    num_blocks = _positive("num_blocks", num_blocks, minimum=0)
    block_size = _positive("block_size", block_size)
    used, fitted = 0, 0
    for n in lengths:
        used += -(-_positive(f"lengths[{fitted}]", n) // block_size)
        if used > num_blocks:
            break
        fitted += 1
    return fitted


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
    context_len = _positive("context_len", context_len, minimum=0)
    max_heads = _positive("max_heads", max_heads)
    group = args.num_attention_heads // args.num_key_value_heads
    slices = -(-group // max_heads)
    stored = context_len * kv_bytes_per_token(args, dtype)
    return DecodeTraffic(
        threadgroups=args.num_hidden_layers * args.num_key_value_heads * slices,
        query_heads_per_kv_head=group,
        kv_bytes_read=stored * slices,
        kv_bytes_stored=stored,
    )


# -- task 5: convert a checkpoint to another number of KV heads ---------------------------------
def _dense(w) -> mx.array:
    if isinstance(w, QuantizedWeights):
        return mx.dequantize(
            w.weight, w.scales, w.biases, group_size=w.group_size, bits=w.bits
        ).astype(mx.float32)
    return w.astype(mx.float32)


def _regroup_rows(w, old: int, new: int, head_dim: int):
    """Rows [old * head_dim, ...] (head-major) -> [new * head_dim, ...]."""
    if new >= old:  # repeat each head new / old times, in place: exact, stays quantized
        r = new // old

        def repeat(a: mx.array) -> mx.array:
            rest = a.shape[1:]
            a = a.reshape(old, 1, head_dim, *rest)
            return mx.broadcast_to(a, (old, r, head_dim, *rest)).reshape(new * head_dim, *rest)

        if isinstance(w, QuantizedWeights):
            return QuantizedWeights(
                repeat(w.weight), repeat(w.scales), repeat(w.biases), w.group_size, w.bits
            )
        return repeat(w)
    # Mean-pool each run of old / new adjacent heads: the rows the merged group's queries read.
    a = _dense(w)
    rest = a.shape[1:]
    return a.reshape(new, old // new, head_dim, *rest).mean(axis=1).reshape(new * head_dim, *rest)


def regroup_kv_heads(
    args: ModelArgs, weights: dict, num_kv_heads: int
) -> tuple[ModelArgs, dict[str, mx.array | QuantizedWeights]]:
    """The checkpoint converted to `num_kv_heads` KV heads: (new args, new weights).

    More heads (a multiple of the current count): each KV head's k/v_proj rows (and biases) are
    repeated, so the model computes exactly the same function with a bigger cache. Fewer (a
    divisor): each run of adjacent KV heads is mean-pooled into one, float32 (the GQA paper's
    conversion; without uptraining the model gets worse). Other tensors are shared, not copied.
    """
    new_args = with_kv_heads(args, num_kv_heads)
    old, new = args.num_key_value_heads, new_args.num_key_value_heads
    if new % old and old % new:
        raise ValueError(
            f"can repeat {old} KV heads into a multiple of {old} or pool them into a divisor "
            f"of {old}, not into {new}"
        )
    out = dict(weights)
    for layer in range(args.num_hidden_layers):
        for proj in ("k_proj", "v_proj"):
            for kind in ("weight", "bias"):
                name = f"model.layers.{layer}.self_attn.{proj}.{kind}"
                if name not in weights:
                    if kind == "weight":
                        raise KeyError(f"missing {name}: not a checkpoint of {args.model_type}")
                    continue
                out[name] = _regroup_rows(weights[name], old, new, args.head_dim)
    return new_args, out
