"""Week 1 Day 4: RMSNorm, SiLU and the SwiGLU MLP.

Oracles are float64 NumPy written here; inputs are rounded to the tested dtype first.
Tolerances: grading.TOL for the dtype (absolute and relative), stated in every failure message.
"""

import importlib
import math

import mlx.core as mx
import numpy as np
import pytest

from tiny_llm_common.grading import TOL, assert_allclose, solution, to_numpy

sol = solution()
basics = importlib.import_module(f"{sol.__name__}.basics")
layer_norm = importlib.import_module(f"{sol.__name__}.layer_norm")
mlp = importlib.import_module(f"{sol.__name__}.mlp")

DTYPES = ["float32", "float16", "bfloat16"]


def rand(
    rng: np.random.Generator, shape, dtype: str, scale: float = 1.0, mean: float = 0.0
) -> mx.array:
    x = (mean + rng.standard_normal(shape) * scale).astype(np.float32)
    return mx.array(x).astype(getattr(mx, dtype))


def f64(x) -> np.ndarray:
    return to_numpy(x).astype(np.float64)


def np_rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def np_silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


# --- task 1: RMSNorm ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "eps"), [((16,), 1e-5), ((3, 64), 1e-6), ((2, 5, 576), 1e-5)])
def test_rms_norm(shape, eps, dtype):
    rng = np.random.default_rng(shape[-1])
    x = rand(rng, shape, dtype, scale=2.0, mean=0.5)
    w = rand(rng, shape[-1:], dtype, scale=0.5, mean=1.0)
    out = layer_norm.RMSNorm(shape[-1], w, eps=eps)(x)
    assert out.dtype == x.dtype, f"RMSNorm returned {out.dtype} for a {x.dtype} input"
    tol = TOL[dtype]
    assert_allclose(
        out, np_rms_norm(f64(x), f64(w), eps), atol=tol, rtol=tol, what=f"RMSNorm {dtype}"
    )


def test_rms_norm_eps_matters_for_tiny_inputs():
    # With x ~ 1e-3, mean(x^2) ~ 1e-6 is comparable to eps: forgetting or misplacing eps shows.
    rng = np.random.default_rng(2)
    x = rand(rng, (4, 32), "float32", scale=1e-3)
    w = rand(rng, (32,), "float32", mean=1.0, scale=0.1)
    out = layer_norm.RMSNorm(32, w, eps=1e-6)(x)
    assert_allclose(
        out, np_rms_norm(f64(x), f64(w), 1e-6), atol=TOL["float32"], rtol=1e-4, what="RMSNorm eps"
    )


def test_rms_norm_float16_does_not_overflow():
    # |x| = 300: x*x = 90000 is past float16's largest value (65504); the sum must be float32.
    x = mx.array(
        np.full((2, 64), 300.0, np.float32) * np.sign(np.arange(-64, 64).reshape(2, 64) + 0.5)
    ).astype(mx.float16)
    w = mx.ones((64,), dtype=mx.float16)
    out = layer_norm.RMSNorm(64, w, eps=1e-5)(x)
    assert np.isfinite(to_numpy(out)).all(), "RMSNorm overflowed in float16: accumulate in float32"
    assert_allclose(
        out,
        np_rms_norm(f64(x), f64(w), 1e-5),
        atol=TOL["float16"],
        rtol=TOL["float16"],
        what="RMSNorm |x|=300",
    )


# --- task 2: SiLU ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu(dtype):
    x = mx.array(np.linspace(-30, 30, 241, dtype=np.float32)).astype(getattr(mx, dtype))
    out = basics.silu(x)
    assert out.dtype == x.dtype, f"silu returned {out.dtype} for a {x.dtype} input"
    tol = TOL[dtype]
    assert_allclose(out, np_silu(f64(x)), atol=tol, rtol=tol, what=f"silu {dtype}")


# --- task 3: SwiGLU MLP ---------------------------------------------------------------------


def np_mlp(x, w_gate, w_up, w_down) -> np.ndarray:
    x, w_gate, w_up, w_down = map(f64, (x, w_gate, w_up, w_down))
    return (np_silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("lead", "dim", "hidden"), [((4,), 16, 40), ((2, 3), 32, 80), ((1, 7), 64, 96)]
)
def test_mlp(lead, dim, hidden, dtype):
    rng = np.random.default_rng(dim + hidden)
    x = rand(rng, (*lead, dim), dtype)
    w_gate = rand(rng, (hidden, dim), dtype, scale=1 / math.sqrt(dim))  # [out, in]
    w_up = rand(rng, (hidden, dim), dtype, scale=1 / math.sqrt(dim))
    w_down = rand(rng, (dim, hidden), dtype, scale=1 / math.sqrt(hidden))
    out = mlp.MLP(dim, hidden, w_gate, w_up, w_down)(x)
    tol = TOL[dtype]
    assert_allclose(out, np_mlp(x, w_gate, w_up, w_down), atol=tol, rtol=tol, what=f"MLP {dtype}")


def test_mlp_gate_and_up_are_not_interchangeable():
    # silu(gate) * up != gate * silu(up): swapping the two weights must change the result.
    rng = np.random.default_rng(8)
    x = rand(rng, (3, 16), "float32")
    w_gate, w_up, w_down = (
        rand(rng, (24, 16), "float32"),
        rand(rng, (24, 16), "float32"),
        rand(rng, (16, 24), "float32"),
    )
    out = mlp.MLP(16, 24, w_gate, w_up, w_down)(x)
    assert_allclose(
        out, np_mlp(x, w_gate, w_up, w_down), atol=1e-4, rtol=TOL["float32"], what="MLP"
    )
    swapped = np_mlp(x, w_up, w_gate, w_down)
    assert np.max(np.abs(to_numpy(out) - swapped)) > 0.1, (
        "MLP must apply silu to the gate projection"
    )
