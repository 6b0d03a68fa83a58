"""Week 3 optional Day 11: a constant-size state next to the cache (src/tiny_llm/state_space.py).

Oracles: the recurrence and its parallel form written out in float64 NumPy (a loop over tokens,
and the direct double sum y_t = sum_{s<=t} decay^(t-s) (q_t . k_s) v_s); byte counts from the
config; a real paged pool's used blocks; the state array's own nbytes; and the recall error of
random unit keys, sqrt((n - 1) / dim) in expectation.
"""

from __future__ import annotations

import importlib

import mlx.core as mx
import numpy as np
import pytest

from tiny_llm_common.checkpoints import random_checkpoint
from tiny_llm_common.grading import assert_allclose, solution_name
from tiny_llm_common.weights import ModelArgs

ss = importlib.import_module(f"{solution_name()}.state_space")
pkv = importlib.import_module(f"{solution_name()}.paged_kv_cache")

SMOLLM2 = ModelArgs("llama", 576, 30, 1536, 9, 3, 49152, head_dim=64)
ATOL = 1e-4  # float32 sums of up to 40 terms of unit-scale products


def rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def np_recurrent(q, k, v, decay, state=None):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, H, L, dk = q.shape
    g = np.broadcast_to(np.asarray(decay, np.float64), (H,))[None, :, None, None]
    s = np.zeros((B, H, dk, v.shape[3])) if state is None else np.asarray(state, np.float64)
    ys = []
    for t in range(L):
        s = g * s + k[:, :, t, :, None] * v[:, :, t, None, :]
        ys.append(np.einsum("bhd,bhde->bhe", q[:, :, t], s))
    return np.stack(ys, axis=2), s


def np_direct(q, k, v, decay):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, H, L, _ = q.shape
    g = np.broadcast_to(np.asarray(decay, np.float64), (H,))
    y = np.zeros((B, H, L, v.shape[3]))
    for h in range(H):
        for t in range(L):
            for s in range(t + 1):
                w = g[h] ** (t - s) * np.einsum("bd,bd->b", q[:, h, t], k[:, h, s])
                y[:, h, t] += w[:, None] * v[:, h, s]
    return y


DECAYS = [1.0, 0.9, [0.5, 0.95, 1.0]]


@pytest.mark.parametrize("decay", DECAYS)
def test_recurrent_step_matches_numpy(decay):
    state = rand((2, 3, 5, 4), 0)
    q, k, v = rand((2, 3, 5), 1), rand((2, 3, 5), 2), rand((2, 3, 4), 3)
    y, new = ss.recurrent_step(mx.array(state), mx.array(q), mx.array(k), mx.array(v), decay)
    want_y, want_s = np_recurrent(q[:, :, None], k[:, :, None], v[:, :, None], decay, state)
    assert_allclose(new, want_s, atol=ATOL, what="new state")
    assert_allclose(y, want_y[:, :, 0], atol=ATOL, what="y")


@pytest.mark.parametrize("decay", DECAYS)
def test_recurrent_and_parallel_forms_match_numpy_and_each_other(decay):
    q, k, v = rand((2, 3, 17, 8), 4), rand((2, 3, 17, 8), 5), rand((2, 3, 17, 6), 6)
    want = np_direct(q, k, v, decay)
    want_y, want_s = np_recurrent(q, k, v, decay)
    assert_allclose(want_y, want, atol=1e-9, what="the two NumPy oracles")
    lazy = [mx.array(x) * 1.0 for x in (q, k, v)]  # not evaluated yet
    y, state = ss.recurrent_form(*lazy, decay)
    assert_allclose(y, want, atol=ATOL, what="recurrent form")
    assert_allclose(state, want_s, atol=ATOL, what="final state")
    assert state.shape == (2, 3, 8, 6), "the state does not grow with L"
    assert_allclose(ss.parallel_form(*lazy, decay), want, atol=ATOL, what="parallel form")


def test_recurrent_form_continues_from_a_state():
    """Decoding is prefill + steps: 11 tokens, then 6 more from the state, equals 17 at once."""
    q, k, v = (mx.array(rand((1, 2, 17, 4), i)) for i in (7, 8, 9))
    y_all, s_all = ss.recurrent_form(q, k, v, 0.8)
    y1, s1 = ss.recurrent_form(q[:, :, :11], k[:, :, :11], v[:, :, :11], 0.8)
    y2, s2 = ss.recurrent_form(q[:, :, 11:], k[:, :, 11:], v[:, :, 11:], 0.8, state=s1)
    assert_allclose(mx.concatenate([y1, y2], axis=2), y_all, atol=ATOL, what="prefill + decode")
    assert_allclose(s2, s_all, atol=ATOL, what="state")


def test_bad_decays_and_shapes_are_clear_errors():
    q = mx.zeros((1, 2, 3, 4))
    for bad in (0.0, -0.5, 1.5, [0.5, 0.5, 0.5]):
        with pytest.raises(ValueError):
            ss.parallel_form(q, q, q, bad)
        with pytest.raises(ValueError):
            ss.recurrent_form(q, q, q, bad)
    with pytest.raises(ValueError):
        ss.parallel_form(q, q[:, :, :2], q, 0.9)
    with pytest.raises(ValueError):
        ss.recurrent_step(mx.zeros((1, 2, 4, 5)), q[:, :, 0], q[:, :, 0], q[:, :, 0], 0.9)


# --- Task 4: bytes -------------------------------------------------------------------------------
def test_state_bytes_are_constant_and_match_the_array():
    assert ss.state_bytes(SMOLLM2, "float16") == 30 * 3 * 64 * 64 * 2 == 737_280
    assert ss.state_bytes(SMOLLM2, mx.float32) == 2 * ss.state_bytes(SMOLLM2, mx.bfloat16)
    # one layer's state, as recurrent_form returns it for SmolLM2's 3 KV heads, x 30 layers
    q = mx.array(rand((1, 3, 5, 64), 10))
    _, state = ss.recurrent_form(q, q, q, 1.0)
    assert 30 * state.nbytes == ss.state_bytes(SMOLLM2, state.dtype)
    assert ss.breakeven_tokens(SMOLLM2) == 32
    kv_per_token = 2 * 30 * 3 * 64 * 2
    assert kv_per_token * ss.breakeven_tokens(SMOLLM2) == ss.state_bytes(SMOLLM2, "float16")


@pytest.mark.parametrize("n_tokens", [1, 16, 17, 100])
def test_paged_kv_bytes_match_a_real_pool(n_tokens):
    args, _ = random_checkpoint("llama", seed=0)
    cache = pkv.PagedKVCache(args, 16, 8, dtype=mx.float16)
    cache.begin_step(["s"], [n_tokens])
    measured = cache.num_used_blocks * cache.bytes_per_block
    assert ss.paged_kv_bytes(args, n_tokens, 8, mx.float16) == measured
    per_token = 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * 2
    assert measured == -(-n_tokens // 8) * 8 * per_token
    assert ss.paged_kv_bytes(args, 0, 8, mx.float16) == 0
    with pytest.raises(ValueError):
        ss.paged_kv_bytes(args, -1, 8, mx.float16)


# --- The experiment ------------------------------------------------------------------------------
def test_associative_recall_shows_the_capacity_of_a_fixed_state():
    small, big = ss.associative_recall(16, 64, seed=1), ss.associative_recall(256, 64, seed=1)
    for r in (small, big):
        assert r.softmax_error < 1e-6, "softmax over every stored key finds the matching one"
        expected = np.sqrt((r.n_pairs - 1) / r.dim)  # crosstalk of n - 1 random unit keys
        assert 0.8 * expected < r.linear_error < 1.2 * expected, (r, expected)
        assert r.state_numbers == 64 * 64 and r.cache_numbers == 2 * 64 * r.n_pairs
    assert big.linear_error > 3 * small.linear_error
