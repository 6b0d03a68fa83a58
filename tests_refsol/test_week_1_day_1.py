"""Week 1 Day 1: softmax, linear, scaled dot-product attention, multi-head attention.

Oracles are float64 NumPy written here; inputs are rounded to the tested dtype first, so the
tolerances (grading.TOL, stated in every failure message) only cover the solution's own rounding.
"""

import importlib
import math

import mlx.core as mx
import numpy as np
import pytest

from tiny_llm_common.grading import TOL, assert_allclose, solution, to_numpy

sol = solution()
basics = importlib.import_module(f"{sol.__name__}.basics")
attention = importlib.import_module(f"{sol.__name__}.attention")

DTYPES = ["float32", "float16", "bfloat16"]


def rand(rng: np.random.Generator, shape, dtype: str, scale: float = 1.0) -> mx.array:
    return mx.array((rng.standard_normal(shape) * scale).astype(np.float32)).astype(
        getattr(mx, dtype)
    )


def np_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x.astype(np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - np.where(np.isfinite(m), m, 0.0))
    return e / np.sum(e, axis=axis, keepdims=True)


def np_attention(q, k, v, scale=None, mask=None) -> np.ndarray:
    q, k, v = (to_numpy(t).astype(np.float64) for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = np.einsum("...ld,...sd->...ls", q, k) * scale
    if mask is not None:
        scores = scores + to_numpy(mask).astype(np.float64)
    return np.einsum("...ls,...sd->...ld", np_softmax(scores), v)


# --- task 1: softmax ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "axis"), [((7,), -1), ((3, 10), -1), ((3, 10), 0), ((2, 4, 33), 1)]
)
def test_softmax_matches_float64(shape, axis, dtype):
    x = rand(np.random.default_rng(1), shape, dtype, scale=3.0)
    out = basics.softmax(x, axis=axis)
    assert out.dtype == x.dtype, f"softmax returned {out.dtype} for a {x.dtype} input"
    tol = TOL[dtype]
    assert_allclose(out, np_softmax(to_numpy(x), axis), atol=tol, rtol=tol, what=f"softmax {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_is_stable_for_large_logits(dtype):
    # exp(1000) overflows in every float type: only the max-subtracted form is finite here.
    x = mx.array([[1000.0, 1001.0, 1002.0], [-1000.0, -1001.0, -1000.5]]).astype(getattr(mx, dtype))
    out = basics.softmax(x)
    assert np.isfinite(to_numpy(out)).all(), f"softmax of large logits is not finite: {out}"
    assert_allclose(out, np_softmax(to_numpy(x)), atol=TOL[dtype], rtol=TOL[dtype], what="softmax")


def test_softmax_of_masked_entries_is_zero():
    x = mx.array([[0.5, -math.inf, 2.0, -math.inf], [-math.inf, 1.0, -math.inf, -math.inf]])
    out = to_numpy(basics.softmax(x))
    assert (out[np.isinf(to_numpy(x))] == 0).all(), f"-inf logits must get probability 0: {out}"
    assert_allclose(out, np_softmax(to_numpy(x)), atol=TOL["float32"], what="softmax with -inf")


# --- task 2: linear -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    ("lead", "n_in", "n_out"), [((5,), 16, 8), ((2, 3), 64, 24), ((1, 1, 4), 7, 3)]
)
def test_linear_matches_float64(lead, n_in, n_out, bias, dtype):
    rng = np.random.default_rng(n_in * 100 + n_out)
    x = rand(rng, (*lead, n_in), dtype)
    w = rand(rng, (n_out, n_in), dtype, scale=1 / math.sqrt(n_in))  # [out, in], the hub's layout
    b = rand(rng, (n_out,), dtype) if bias else None
    out = basics.linear(x, w, b)
    expected = to_numpy(x).astype(np.float64) @ to_numpy(w).astype(np.float64).T
    if bias:
        expected = expected + to_numpy(b)
    tol = TOL[dtype]
    assert_allclose(out, expected, atol=tol, rtol=tol, what=f"linear {dtype} bias={bias}")


# --- task 3: scaled dot-product attention ---------------------------------------------------


def random_mask(rng: np.random.Generator, L: int, S: int) -> mx.array:
    """An additive [L, S] mask: a mix of -inf, 0 and small offsets; every row keeps a key."""
    m = rng.uniform(-2, 1, (L, S)).astype(np.float32)
    m[rng.random((L, S)) < 0.3] = -np.inf
    m[np.arange(L), rng.integers(0, S, L)] = 0.0
    return mx.array(m)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("lead", "L", "S", "D"),
    [((), 4, 4, 8), ((3,), 5, 9, 16), ((2, 3), 1, 6, 32), ((2, 2), 7, 7, 64)],
)
@pytest.mark.parametrize("masked", [False, True])
def test_attention_simple(lead, L, S, D, masked, dtype):
    rng = np.random.default_rng(L * 1000 + S * 10 + D)
    q, k, v = (
        rand(rng, (*lead, L, D), dtype),
        rand(rng, (*lead, S, D), dtype),
        rand(rng, (*lead, S, D), dtype),
    )
    mask = random_mask(rng, L, S).astype(getattr(mx, dtype)) if masked else None
    out = attention.scaled_dot_product_attention_simple(q, k, v, mask=mask)
    tol = TOL[dtype]
    assert_allclose(
        out, np_attention(q, k, v, mask=mask), atol=tol, rtol=tol, what=f"attention {dtype}"
    )


def test_attention_simple_uses_scale():
    rng = np.random.default_rng(7)
    q, k, v = (rand(rng, (2, 3, 6, 8), "float32") for _ in range(3))
    out = attention.scaled_dot_product_attention_simple(q, k, v, scale=0.7)
    assert_allclose(
        out, np_attention(q, k, v, scale=0.7), atol=TOL["float32"], what="attention scale=0.7"
    )


# --- task 4: multi-head attention -----------------------------------------------------------


def np_multi_head(x_q, x_k, x_v, wq, wk, wv, wo, num_heads, mask=None) -> np.ndarray:
    def heads(x, w):  # [B, N, E] -> [B, H, N, D], with the head index the slow part of E
        y = to_numpy(x).astype(np.float64) @ to_numpy(w).astype(np.float64).T
        b, n, e = y.shape
        return y.reshape(b, n, num_heads, e // num_heads).transpose(0, 2, 1, 3)

    out = np_attention(heads(x_q, wq), heads(x_k, wk), heads(x_v, wv), mask=mask)
    b, h, n, d = out.shape
    return out.transpose(0, 2, 1, 3).reshape(b, n, h * d) @ to_numpy(wo).astype(np.float64).T


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(
    ("B", "L", "S", "E", "H"), [(1, 4, 4, 16, 2), (2, 3, 7, 32, 4), (3, 1, 5, 48, 6)]
)
@pytest.mark.parametrize("masked", [False, True])
def test_multi_head_attention(B, L, S, E, H, masked, dtype):
    rng = np.random.default_rng(B * 100 + S * 10 + H)
    x_q, x_k, x_v = (
        rand(rng, (B, L, E), dtype),
        rand(rng, (B, S, E), dtype),
        rand(rng, (B, S, E), dtype),
    )
    ws = [rand(rng, (E, E), dtype, scale=1 / math.sqrt(E)) for _ in range(4)]
    mask = random_mask(rng, L, S).astype(getattr(mx, dtype)) if masked else None
    mha = attention.MultiHeadAttention(E, H, *ws)
    out = mha(x_q, x_k, x_v, mask=mask)
    expected = np_multi_head(x_q, x_k, x_v, *ws, num_heads=H, mask=mask)
    tol = TOL[dtype]
    assert_allclose(out, expected, atol=tol, rtol=tol, what=f"MultiHeadAttention {dtype}")


def test_multi_head_attention_rejects_uneven_heads():
    w = mx.zeros((10, 10))
    with pytest.raises(ValueError):
        attention.MultiHeadAttention(10, 3, w, w, w, w)
