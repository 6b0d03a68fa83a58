"""Week 1 Day 2: rotary positional embeddings (RoPE) in both layouts.

Two float64 NumPy oracles written independently: the interleaved ("traditional") layout as a
complex multiplication z * e^(i * pos * theta), the half-split (Hugging Face) layout with the
rotate_half formula x * cos + rotate_half(x) * sin.

Tolerance: grading.TOL for the dtype, plus the rounding of the angle itself, which the solution
holds in float32 like every implementation (MLX, PyTorch): pos * theta carries a relative error of
about 2^-23, so positions up to P add P * 2^-22 per unit of |x|. The messages state the total.
"""

import importlib

import mlx.core as mx
import numpy as np
import pytest

from tiny_llm_common.grading import TOL, assert_allclose, solution, to_numpy

sol = solution()
pe = importlib.import_module(f"{sol.__name__}.positional_encoding")

DTYPES = ["float32", "float16", "bfloat16"]


def rand(rng: np.random.Generator, shape, dtype: str) -> mx.array:
    return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(getattr(mx, dtype))


def inv_freqs(dims: int, base: float) -> np.ndarray:
    return base ** (-np.arange(0, dims, 2, dtype=np.float64) / dims)  # theta_i = base^(-2i/dims)


def positions(offset, B: int, L: int) -> np.ndarray:
    """[B, L] absolute positions for one offset or one per sequence."""
    offs = np.broadcast_to(
        np.asarray(to_numpy(offset) if isinstance(offset, mx.array) else offset), (B,)
    )
    return offs.reshape(B, 1).astype(np.float64) + np.arange(L)[None, :]


def rope_interleaved(x: np.ndarray, pos: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Features (2i, 2i+1) as the complex number x[2i] + i x[2i+1], turned by pos * theta_i."""
    z = x[..., 0::2] + 1j * x[..., 1::2]  # [B, L, H, D/2]
    turned = z * np.exp(1j * pos[:, :, None, None] * theta)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = turned.real, turned.imag
    return out


def rope_half_split(x: np.ndarray, pos: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Hugging Face's form: feature i pairs with i + D/2; cos/sin repeat over the two halves."""
    ang = pos[:, :, None, None] * np.concatenate([theta, theta])  # [B, L, 1, D]
    half = x.shape[-1] // 2
    rotate_half = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * np.cos(ang) + rotate_half * np.sin(ang)


def oracle(x: mx.array, offset, theta: np.ndarray, traditional: bool) -> np.ndarray:
    xs = to_numpy(x).astype(np.float64)
    pos = positions(offset, xs.shape[0], xs.shape[1])
    return (rope_interleaved if traditional else rope_half_split)(xs, pos, theta)


def tolerance(dtype: str, x: mx.array, max_pos: int) -> float:
    return TOL[dtype] + max_pos * 2.0**-22 * float(np.max(np.abs(to_numpy(x))))


CASES = [  # (B, L, H, D, offset)
    (1, 8, 2, 16, 0),
    (2, 5, 3, 8, 7),
    (3, 1, 4, 64, 40),
    (2, 6, 1, 32, [0, 11]),
    (3, 4, 2, 16, "array"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("traditional", [True, False], ids=["interleaved", "half_split"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_L{}_H{}_D{}_off{}".format(*c))
def test_rope_matches_oracle(case, traditional, dtype):
    B, L, H, D, offset = case
    if offset == "array":  # per-sequence offsets as an mx.array, as a batched KV cache keeps them
        offset = mx.array([3, 0, 17], dtype=mx.int32)
    rng = np.random.default_rng(B * 1000 + L * 100 + D)
    x = rand(rng, (B, L, H, D), dtype)
    rope = pe.RoPE(D, seq_len=64, traditional=traditional)
    out = rope(x, offset)
    assert out.dtype == x.dtype, f"RoPE returned {out.dtype} for a {x.dtype} input"
    expected = oracle(x, offset, inv_freqs(D, 10000.0), traditional)
    tol = tolerance(dtype, x, 64)
    assert_allclose(
        out, expected, atol=tol, rtol=TOL[dtype], what=f"RoPE traditional={traditional} {dtype}"
    )


@pytest.mark.parametrize("traditional", [True, False], ids=["interleaved", "half_split"])
def test_rope_base_and_explicit_freqs(traditional):
    rng = np.random.default_rng(5)
    x = rand(rng, (2, 5, 3, 32), "float32")
    # Llama 3 uses base 500000; a rope_scaling rule hands its own frequencies in through `freqs`.
    out = pe.RoPE(32, seq_len=100, base=500000.0, traditional=traditional)(x, 90)
    expected = oracle(x, 90, inv_freqs(32, 500000.0), traditional)
    tol = tolerance("float32", x, 100)
    assert_allclose(out, expected, atol=tol, what=f"RoPE base=500000 traditional={traditional}")

    theta = rng.uniform(0.01, 1.0, 16).astype(np.float32)
    out = pe.RoPE(32, seq_len=100, traditional=traditional, freqs=mx.array(theta))(x, [3, 50])
    expected = oracle(x, [3, 50], theta.astype(np.float64), traditional)
    assert_allclose(out, expected, atol=tol, what=f"RoPE explicit freqs traditional={traditional}")


def test_layouts_are_the_same_rotation_up_to_a_permutation():
    # De-interleaving the features turns the traditional layout into the half-split one.
    rng = np.random.default_rng(9)
    D = 16
    x = rand(rng, (2, 7, 3, D), "float32")
    perm = np.concatenate([np.arange(0, D, 2), np.arange(1, D, 2)])  # (0,2,..,1,3,..)
    a = pe.RoPE(D, 32, traditional=True)(x, 5)
    b = pe.RoPE(D, 32, traditional=False)(x[..., mx.array(perm)], 5)
    assert_allclose(
        to_numpy(a)[..., perm], b, atol=TOL["float32"], what="interleaved vs half-split"
    )


def test_position_zero_is_identity_and_norms_are_kept():
    rng = np.random.default_rng(11)
    x = rand(rng, (1, 6, 2, 16), "float32")
    for traditional in (True, False):
        out = to_numpy(pe.RoPE(16, 16, traditional=traditional)(x))
        assert_allclose(
            out[:, 0], to_numpy(x)[:, 0], atol=TOL["float32"], what="RoPE at position 0"
        )
        # A rotation keeps the length of every pair, hence of the whole head vector.
        norms = np.linalg.norm(out, axis=-1)
        assert_allclose(norms, np.linalg.norm(to_numpy(x), axis=-1), atol=1e-5, what="head norms")


def test_attention_scores_depend_only_on_relative_position():
    # q_m . k_n after RoPE depends on m - n only: the property that makes a KV cache possible.
    rng = np.random.default_rng(13)
    q, k = rand(rng, (1, 1, 1, 32), "float32"), rand(rng, (1, 1, 1, 32), "float32")
    rope = pe.RoPE(32, 128, traditional=False)
    dots = [float((rope(q, m + 5) * rope(k, m)).sum()) for m in (0, 20, 70)]
    assert np.allclose(dots, dots[0], atol=1e-4), f"q.k at distance 5 varies with position: {dots}"


def test_rope_rejects_bad_input():
    with pytest.raises(ValueError):
        pe.RoPE(15, 16)  # odd dims cannot be paired
    rope = pe.RoPE(16, 16)
    with pytest.raises(ValueError):
        rope(mx.zeros((1, 2, 1, 8)))  # wrong head dim
    with pytest.raises(ValueError):
        rope(mx.zeros((1, 4, 1, 16)), 13)  # positions 13..16 are past seq_len
    with pytest.raises(ValueError):
        rope(mx.zeros((2, 1, 1, 16)), [1, 2, 3])  # three offsets for two sequences
