"""Week 2 Day 3: how many bytes the KV cache needs, and how much a max-length reservation wastes.

Each layer stores one key and one value vector of `head_dim` numbers per KV head for every
token, so a token costs 2 x layers x kv_heads x head_dim x (bytes per number), whatever the
number of query heads: grouped-query attention shrinks the cache by heads / kv_heads.

Chapter: book/src/week2-03-kv-memory.md.
"""

from __future__ import annotations

import numbers  # noqa: F401 (numbers.Integral)

import mlx.core as mx

from tiny_llm_common.weights import ModelArgs

_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1}


def dtype_size(dtype: mx.Dtype | str) -> int:
    """Bytes per number: an mx.Dtype (mx.float16) or its name ("float16")."""
    if isinstance(dtype, mx.Dtype):
        return dtype.size
    if isinstance(dtype, str) and dtype in _SIZES:
        return _SIZES[dtype]
    raise TypeError(f"dtype must be an mx.Dtype or one of {sorted(_SIZES)}, got {dtype!r}")


def kv_bytes_per_token(args: ModelArgs, dtype: mx.Dtype | str) -> int:
    """Bytes of keys and values one token adds to the cache, all layers together."""
    # TODO(Week 2 Day 3, task 1): 2 (a key and a value) x layers x KV heads x head_dim x
    # dtype_size(dtype). Which head count? The cache stores what k_proj and v_proj produce.
    raise NotImplementedError(
        "Week 2 Day 3, task 1: implement `kv_bytes_per_token` in src/tiny_llm/kv_memory.py"
    )


def kv_bytes(args: ModelArgs, n_tokens: int, dtype: mx.Dtype | str) -> int:
    """Bytes of the cache holding `n_tokens` tokens (of one sequence or summed over several)."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 0:
        raise ValueError(f"n_tokens must be an int >= 0, got {n_tokens!r}")
    return n_tokens * kv_bytes_per_token(args, dtype)


def gqa_savings(args: ModelArgs) -> float:
    """The fraction of a multi-head (one KV head per query head) cache that GQA does not store:
    1 - kv_heads / heads (0 for multi-head attention, 1 - 1/heads for multi-query)."""
    # TODO(Week 2 Day 3, task 2): one line from args.num_key_value_heads and
    # args.num_attention_heads.
    raise NotImplementedError(
        "Week 2 Day 3, task 2: implement `gqa_savings` in src/tiny_llm/kv_memory.py"
    )


def contiguous_waste(lengths: list[int], max_len: int) -> float:
    """The fraction of max-length reservations that holds no token.

    Each request reserves `max_len` slots up front (a contiguous buffer cannot grow in place);
    at the end it holds `lengths[i]` tokens. Waste = 1 - sum(lengths) / (len(lengths) * max_len).
    """
    # TODO(Week 2 Day 3, task 3): ValueError for max_len < 1 (or not an int), no lengths, or a
    # length outside [0, max_len] (NumPy integers are fine: numbers.Integral; bools are not).
    # Then 1 - (tokens held) / (slots reserved).
    raise NotImplementedError(
        "Week 2 Day 3, task 3: implement `contiguous_waste` in src/tiny_llm/kv_memory.py"
    )
