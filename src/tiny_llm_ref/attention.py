"""Week 1 Days 1 and 3: scaled dot-product attention, multi-head and grouped-query."""

import math

import mlx.core as mx

from .basics import linear, softmax


def scaled_dot_product_attention_simple(
    query: mx.array,
    key: mx.array,
    value: mx.array,
    scale: float | None = None,
    mask: mx.array | None = None,
) -> mx.array:
    """softmax(Q K^T * scale + mask) V for query [..., L, D], key/value [..., S, D]."""
    factor = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query @ key.swapaxes(-2, -1)) * factor
    if mask is not None:
        scores = scores + mask
    return softmax(scores, axis=-1) @ value


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
        # query [B, L, E], key/value [B, S, E] -> [B, H, L/S, D]
        def heads(x, w):
            b, n, _ = x.shape
            return linear(x, w).reshape(b, n, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

        q, k, v = heads(query, self.wq), heads(key, self.wk), heads(value, self.wv)
        out = scaled_dot_product_attention_simple(q, k, v, mask=mask)
        b, _, n, _ = out.shape
        return linear(out.transpose(0, 2, 1, 3).reshape(b, n, self.hidden_size), self.wo)


def causal_mask(L: int, S: int, dtype: mx.Dtype = mx.float32) -> mx.array:
    """[L, S] additive mask: query i (the last L of S positions) sees keys 0 .. S - L + i."""
    if not 0 < L <= S:
        raise ValueError(
            f"causal_mask needs 0 < L <= S (queries are the last L keys), got L={L}, S={S}"
        )
    rows = mx.arange(L)[:, None] + (S - L)
    cols = mx.arange(S)[None, :]
    return mx.where(cols > rows, mx.array(-mx.inf, dtype=dtype), mx.array(0, dtype=dtype))


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
    n_rep = h_q // h_kv
    factor = 1.0 / math.sqrt(D) if scale is None else scale
    # Group the query heads instead of copying K/V n_rep times: [..., H_kv, n_rep, L, D].
    q = query.reshape(*batch, h_kv, n_rep, L, D)
    k = mx.expand_dims(key, -3)
    v = mx.expand_dims(value, -3)
    scores = (q @ k.swapaxes(-2, -1)) * factor
    if isinstance(mask, str):
        scores = scores + causal_mask(L, S, scores.dtype)
    elif mask is not None:
        m = mx.broadcast_to(mask, (*batch, h_q, L, S)).reshape(*batch, h_kv, n_rep, L, S)
        scores = scores + m
    out = softmax(scores, axis=-1) @ v
    return out.reshape(*batch, h_q, L, value.shape[-1])
