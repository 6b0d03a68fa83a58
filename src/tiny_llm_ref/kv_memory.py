"""Week 2 Day 3: how many bytes the KV cache needs, and how much a max-length reservation wastes.

Each layer stores one key and one value vector of `head_dim` numbers per KV head for every
token, so a token costs 2 x layers x kv_heads x head_dim x (bytes per number), whatever the
number of query heads: grouped-query attention shrinks the cache by heads / kv_heads.
"""

from __future__ import annotations

import numbers

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
    return 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * dtype_size(dtype)


def kv_bytes(args: ModelArgs, n_tokens: int, dtype: mx.Dtype | str) -> int:
    """Bytes of the cache holding `n_tokens` tokens (of one sequence or summed over several)."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 0:
        raise ValueError(f"n_tokens must be an int >= 0, got {n_tokens!r}")
    return n_tokens * kv_bytes_per_token(args, dtype)


def gqa_savings(args: ModelArgs) -> float:
    """The fraction of a multi-head (one KV head per query head) cache that GQA does not store:
    1 - kv_heads / heads (0 for multi-head attention, 1 - 1/heads for multi-query)."""
    return 1.0 - args.num_key_value_heads / args.num_attention_heads


def contiguous_waste(lengths: list[int], max_len: int) -> float:
    """The fraction of max-length reservations that holds no token.

    Each request reserves `max_len` slots up front (a contiguous buffer cannot grow in place);
    at the end it holds `lengths[i]` tokens. Waste = 1 - sum(lengths) / (len(lengths) * max_len).
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")
    lengths = list(lengths)
    if not lengths:
        raise ValueError("lengths is empty: no requests, no waste to measure")
    for n in lengths:  # NumPy integers are fine, floats and bools are not
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 0 <= n <= max_len:
            raise ValueError(f"every length must be an int in [0, {max_len}], got {n!r}")
    return 1.0 - sum(int(n) for n in lengths) / (len(lengths) * max_len)
