"""Week 1 Day 3: the causal mask and grouped-query attention (GQA).

The oracle is float64 NumPy that copies each KV head to the query heads that read it (query head
h reads KV head h // (H_q / H_kv)), the plain form the solution must match without copying.
Tolerances: grading.TOL for the dtype, stated in every failure message.
"""

import importlib
import math

import mlx.core as mx
import numpy as np
import pytest

from tiny_llm_common.grading import TOL, assert_allclose, solution, to_numpy

sol = solution()
attention = importlib.import_module(f"{sol.__name__}.attention")

DTYPES = ["float32", "float16", "bfloat16"]


def rand(rng: np.random.Generator, shape, dtype: str) -> mx.array:
    return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(getattr(mx, dtype))


def np_causal(L: int, S: int) -> np.ndarray:
    """Query i sits at absolute position S - L + i and may read keys 0 .. S - L + i."""
    m = np.zeros((L, S))
    for i in range(L):
        m[i, S - L + i + 1 :] = -np.inf
    return m


def np_gqa(q, k, v, scale=None, mask=None) -> np.ndarray:
    q, k, v = (to_numpy(t).astype(np.float64) for t in (q, k, v))
    n_rep = q.shape[-3] // k.shape[-3]
    k, v = np.repeat(k, n_rep, axis=-3), np.repeat(v, n_rep, axis=-3)  # KV head j -> j*n_rep..
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = np.einsum("...ld,...sd->...ls", q, k) * scale
    if mask is not None:
        scores = scores + mask
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    return np.einsum("...ls,...sd->...ld", p / p.sum(axis=-1, keepdims=True), v)


# --- task 1: causal mask --------------------------------------------------------------------


@pytest.mark.parametrize(("L", "S"), [(1, 1), (4, 4), (3, 7), (1, 9), (6, 10)])
def test_causal_mask(L, S):
    m = attention.causal_mask(L, S)
    assert m.dtype == mx.float32 and m.shape == (L, S), (
        f"got {m.dtype} {m.shape}, want float32 ({L}, {S})"
    )
    np.testing.assert_array_equal(
        to_numpy(m), np_causal(L, S), err_msg=f"causal_mask({L}, {S}): exact 0 / -inf"
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_causal_mask_dtype(dtype):
    m = attention.causal_mask(3, 5, getattr(mx, dtype))
    assert m.dtype == getattr(mx, dtype), f"causal_mask(..., {dtype}) returned {m.dtype}"
    np.testing.assert_array_equal(to_numpy(m), np_causal(3, 5))


def test_causal_mask_rejects_more_queries_than_keys():
    with pytest.raises(ValueError):
        attention.causal_mask(5, 3)


# --- task 2: grouped-query attention --------------------------------------------------------

SHAPES = [  # (batch dims, H_q, H_kv, L, S, D)
    ((), 4, 4, 5, 5, 8),  # H_q / H_kv = 1: plain multi-head
    ((2,), 6, 2, 3, 7, 16),  # 3 query heads per KV head
    ((2,), 8, 2, 1, 9, 32),  # 4 per KV head, one decode step over 9 cached keys
    ((2, 3), 4, 1, 4, 6, 8),  # multi-query, two batch axes
    ((1,), 9, 3, 6, 6, 64),  # SmolLM2-135M's heads
]


def shape_id(c):
    return "b{}_hq{}_hkv{}_L{}_S{}_D{}".format("x".join(map(str, c[0])) or "0", *c[1:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "causal", "array"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_grouped_attention(shape, mask_kind, dtype):
    batch, h_q, h_kv, L, S, D = shape
    rng = np.random.default_rng(h_q * 100 + L * 10 + S)
    q = rand(rng, (*batch, h_q, L, D), dtype)
    k, v = rand(rng, (*batch, h_kv, S, D), dtype), rand(rng, (*batch, h_kv, S, D), dtype)
    mask, np_mask = None, None
    if mask_kind == "causal":
        mask, np_mask = "causal", np_causal(L, S)
    elif mask_kind == "array":  # one additive mask per query head: broadcast over the batch
        m = rng.uniform(-3, 0, (h_q, L, S)).astype(np.float32)
        m[rng.random((h_q, L, S)) < 0.25] = -np.inf
        m[:, :, 0] = 0.0  # every row keeps one key
        mask = mx.array(m).astype(getattr(mx, dtype))
        np_mask = to_numpy(mask)
    out = attention.scaled_dot_product_attention_grouped(q, k, v, mask=mask)
    tol = TOL[dtype]
    what = f"GQA H_q={h_q} H_kv={h_kv} mask={mask_kind} {dtype}"
    assert_allclose(out, np_gqa(q, k, v, mask=np_mask), atol=tol, rtol=tol, what=what)


def test_grouped_attention_mask_with_batch_axis_and_scale():
    rng = np.random.default_rng(3)
    q, k, v = (
        rand(rng, (2, 6, 4, 8), "float32"),
        rand(rng, (2, 2, 5, 8), "float32"),
        rand(rng, (2, 2, 5, 8), "float32"),
    )
    m = rng.uniform(-2, 0, (2, 1, 4, 5)).astype(np.float32)  # per sequence, shared by the heads
    out = attention.scaled_dot_product_attention_grouped(q, k, v, scale=0.3, mask=mx.array(m))
    assert_allclose(
        out, np_gqa(q, k, v, scale=0.3, mask=m), atol=TOL["float32"], what="GQA [B,1,L,S] mask"
    )


def test_grouped_attention_value_dim_may_differ():
    rng = np.random.default_rng(4)
    q, k, v = (
        rand(rng, (1, 4, 3, 8), "float32"),
        rand(rng, (1, 2, 5, 8), "float32"),
        rand(rng, (1, 2, 5, 12), "float32"),
    )
    out = attention.scaled_dot_product_attention_grouped(q, k, v)
    assert_allclose(out, np_gqa(q, k, v), atol=TOL["float32"], what="GQA with D_v != D")


def test_grouped_attention_matches_simple_when_heads_are_equal():
    rng = np.random.default_rng(6)
    q, k, v = (rand(rng, (2, 3, 5, 16), "float32") for _ in range(3))
    a = attention.scaled_dot_product_attention_grouped(q, k, v, mask="causal")
    b = attention.scaled_dot_product_attention_simple(
        q, k, v, mask=mx.array(np_causal(5, 5).astype(np.float32))
    )
    assert_allclose(a, b, atol=TOL["float32"], what="grouped vs simple attention")


def test_grouped_attention_rejects_bad_input():
    q, kv = mx.zeros((1, 6, 2, 8)), mx.zeros((1, 4, 3, 8))
    with pytest.raises(ValueError):
        attention.scaled_dot_product_attention_grouped(q, kv, kv)  # 6 query heads, 4 KV heads
    kv = mx.zeros((1, 3, 3, 8))
    with pytest.raises(ValueError):
        attention.scaled_dot_product_attention_grouped(q, kv, kv, mask="sliding")
