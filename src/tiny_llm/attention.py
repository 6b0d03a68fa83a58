"""Week 1 Days 1 and 3: scaled dot-product attention, multi-head and grouped-query.

Chapters: book/src/week1-01-attention.md (Day 1), book/src/week1-03-gqa.md (Day 3).
"""

import math  # noqa: F401 (you will need math.sqrt)

import mlx.core as mx

from .basics import linear, softmax  # noqa: F401 (your Day 1 building blocks)


def scaled_dot_product_attention_simple(
    query: mx.array,
    key: mx.array,
    value: mx.array,
    scale: float | None = None,
    mask: mx.array | None = None,
) -> mx.array:
    """softmax(Q K^T * scale + mask) V for query [..., L, D], key/value [..., S, D].

    `scale` defaults to 1 / sqrt(D); `mask` is additive (0 = attend, -inf = do not), broadcastable
    to [..., L, S]. Returns [..., L, D].
    """
    # TODO(Week 1 Day 1, task 3):
    # - scores = query @ key^T (swap the last two axes of key: key.swapaxes(-2, -1)) -> [..., L, S];
    # - multiply by scale (1 / math.sqrt(D) when scale is None), then add mask if given;
    # - softmax over the last axis (the keys), then @ value -> [..., L, D].
    raise NotImplementedError(
        "Week 1 Day 1, task 3: implement `scaled_dot_product_attention_simple` in src/tiny_llm/attention.py"
    )


class MultiHeadAttention:
    """Multi-head attention with separate Q/K/V/O projections (no cache, no RoPE)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        wq: mx.array,
        wk: mx.array,
        wv: mx.array,
        wo: mx.array,
    ):
        if num_heads <= 0 or hidden_size % num_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})"
            )
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.wq, self.wk, self.wv, self.wo = wq, wk, wv, wo

    def __call__(
        self, query: mx.array, key: mx.array, value: mx.array, mask: mx.array | None = None
    ) -> mx.array:
        """query [B, L, E], key/value [B, S, E] (E = hidden_size) -> [B, L, E]."""
        # TODO(Week 1 Day 1, task 4):
        # - project: linear(query, self.wq) etc. (each weight is [E, E]);
        # - split heads: [B, L, E] -> reshape [B, L, H, D] -> transpose to [B, H, L, D]
        #   (H = self.num_heads, D = self.head_dim); same for key and value with S;
        # - scaled_dot_product_attention_simple(q, k, v, mask=mask) -> [B, H, L, D];
        # - merge heads back: transpose to [B, L, H, D], reshape [B, L, E], then linear(., self.wo).
        raise NotImplementedError(
            "Week 1 Day 1, task 4: implement `MultiHeadAttention.__call__` in src/tiny_llm/attention.py"
        )


def causal_mask(L: int, S: int, dtype: mx.Dtype = mx.float32) -> mx.array:
    """[L, S] additive mask: query i (the last L of S positions) sees keys 0 .. S - L + i."""
    if not 0 < L <= S:
        raise ValueError(
            f"causal_mask needs 0 < L <= S (queries are the last L keys), got L={L}, S={S}"
        )
    # TODO(Week 1 Day 3, task 1): 0 where key j <= S - L + i, -inf where j > S - L + i, in `dtype`.
    # Row i is the query at absolute position S - L + i (the L new tokens come after S - L
    # cached ones). mx.arange, broadcasting and mx.where are all you need.
    raise NotImplementedError(
        "Week 1 Day 3, task 1: implement `causal_mask` in src/tiny_llm/attention.py"
    )


def scaled_dot_product_attention_grouped(
    query: mx.array,
    key: mx.array,
    value: mx.array,
    scale: float | None = None,
    mask: "mx.array | str | None" = None,
) -> mx.array:
    """Grouped-query attention: query [..., H_q, L, D], key/value [..., H_kv, S, D].

    Query head h reads KV head h // (H_q // H_kv). `mask` is an additive array broadcastable to
    [..., H_q, L, S], the string "causal", or None.
    """
    *batch, h_q, L, D = query.shape
    h_kv, S = key.shape[-3], key.shape[-2]
    if key.shape[-1] != D or value.shape[-2] != S or value.shape[-3] != h_kv:
        raise ValueError(
            f"shapes do not fit: query {query.shape}, key {key.shape}, value {value.shape}"
        )
    if h_q % h_kv != 0:
        raise ValueError(f"query heads ({h_q}) must be a multiple of key/value heads ({h_kv})")
    if isinstance(mask, str) and mask != "causal":
        raise ValueError(f"unknown mask {mask!r}: use 'causal', an array or None")
    # TODO(Week 1 Day 3, task 2): with n_rep = h_q // h_kv,
    # - reshape query to [..., H_kv, n_rep, L, D] (consecutive query heads share a KV head) and
    #   give key/value a size-1 axis: [..., H_kv, 1, S, D] (mx.expand_dims(key, -3)), so the
    #   matmul broadcasts K/V over the group instead of copying them n_rep times;
    # - scores = q @ k^T * scale -> [..., H_kv, n_rep, L, S];
    # - mask "causal": add causal_mask(L, S, scores.dtype); an array: broadcast it to
    #   [..., H_q, L, S] (mx.broadcast_to) and reshape to [..., H_kv, n_rep, L, S] before adding;
    # - softmax over the keys, @ value, reshape back to [..., H_q, L, D].
    raise NotImplementedError(
        "Week 1 Day 3, task 2: implement `scaled_dot_product_attention_grouped` in src/tiny_llm/attention.py"
    )
