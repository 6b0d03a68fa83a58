"""Week 2 Day 5: decode attention, one new query per sequence over a contiguous KV cache.

    out[b, h] = softmax(scale * q[b, h] . key[b, kv(h), t] for t < lengths[b]) @ value[b, kv(h), t]

with kv(h) = h // (H_q // H_kv) (grouped-query attention). query is [B, H_q, D], key and value
[B, H_kv, S, D]: a cache buffer with room for S tokens, of which sequence b has filled the first
lengths[b]. A sequence of length 0 gets zeros.

- `decode_attention_mlx` (task 1) is the op in MLX ops: the specification the kernels are held to.
- `decode_attention` calls the extension's primitive (tasks 2 to 4 are its C++ and Metal kernels,
  in src/extensions*/src/decode_attention.*): the same op, reading K and V once, in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from .kernels import extension

#: Head dims the kernels are built for.
KERNEL_HEAD_DIMS = (64, 128)


def check_decode_args(query: mx.array, key: mx.array, value: mx.array) -> None:
    """ValueError/TypeError unless query [B, H_q, D] and key/value [B, H_kv, S, D] fit together."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, mx.array):
            raise TypeError(f"decode_attention: {name} must be an mx.array, got {type(x).__name__}")
    floats = (mx.float32, mx.float16, mx.bfloat16)
    if query.dtype not in floats or key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(
            "decode_attention: query, key and value must share one of float32, float16, "
            f"bfloat16; got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if query.ndim != 3:
        raise ValueError(f"decode_attention: query must be [B, H_q, D], got shape {query.shape}")
    if key.ndim != 4 or key.shape != value.shape:
        raise ValueError(
            "decode_attention: key and value must both be [B, H_kv, S, D], got key "
            f"{key.shape} and value {value.shape}"
        )
    B, H_q, D = query.shape
    if key.shape[0] != B or key.shape[3] != D:
        raise ValueError(
            f"decode_attention: query {query.shape} and key {key.shape} disagree on B or D"
        )
    if key.shape[1] < 1 or H_q % key.shape[1]:
        raise ValueError(
            f"decode_attention: {H_q} query heads are not a multiple of {key.shape[1]} KV heads"
        )


def as_lengths(lengths: mx.array | Sequence[int] | None, key: mx.array) -> mx.array:
    """lengths as a [B] int32 array; None means every sequence fills the whole buffer (S)."""
    if lengths is None:
        return mx.full((key.shape[0],), key.shape[2], dtype=mx.int32)
    if not isinstance(lengths, mx.array):
        lengths = mx.array(list(lengths), dtype=mx.int32)
    return lengths


def decode_attention_mlx(
    query: mx.array,
    key: mx.array,
    value: mx.array,
    lengths: mx.array | Sequence[int] | None = None,
    scale: float | None = None,
) -> mx.array:
    """Decode attention in MLX ops: keys at or past lengths[b] are masked out; float32 inside."""
    check_decode_args(query, key, value)
    B, H_q, D = query.shape
    H_kv, S = key.shape[1], key.shape[2]
    lengths = as_lengths(lengths, key)
    scale = D**-0.5 if scale is None else scale
    # The query heads that share a KV head become the rows of one matmul: [B, H_kv, G, D].
    q = query.reshape(B, H_kv, H_q // H_kv, D).astype(mx.float32) * scale
    scores = q @ key.astype(mx.float32).swapaxes(-1, -2)  # [B, H_kv, G, S]
    visible = mx.arange(S)[None, :] < lengths[:, None]  # [B, S]
    scores = mx.where(visible[:, None, None, :], scores, -mx.inf)
    weights = mx.softmax(scores, axis=-1, precise=True)
    out = weights @ value.astype(mx.float32)  # [B, H_kv, G, D]
    # A sequence with no keys: softmax over nothing is 0/0; define its output as zeros.
    out = mx.where((lengths > 0)[:, None, None, None], out, 0.0)
    return out.reshape(B, H_q, D).astype(query.dtype)


def decode_attention(
    query: mx.array,
    key: mx.array,
    value: mx.array,
    lengths: mx.array | Sequence[int] | None = None,
    scale: float | None = None,
    *,
    stream: mx.Stream | mx.Device | None = None,
) -> mx.array:
    """Decode attention with the extension's kernel (C++ on the CPU, Metal on the GPU).

    Same contract as `decode_attention_mlx`; D must be 64 or 128 and lengths int32. Shapes and
    dtypes are checked when the op is built (ValueError/TypeError); lengths are values, checked
    by the CPU kernel before it reads K/V (an error from mx.eval); on the GPU an out-of-range
    length makes that sequence's output NaN.
    """
    # Shapes and dtypes are checked by the C++ op itself (decode_attention.cpp).
    for name, x in (("query", query), ("key", key)):
        if not isinstance(x, mx.array):
            raise TypeError(f"decode_attention: {name} must be an mx.array, got {type(x).__name__}")
    lengths = as_lengths(lengths, key)
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    return extension()._ext.decode_attention(query, key, value, lengths, scale, stream=stream)
