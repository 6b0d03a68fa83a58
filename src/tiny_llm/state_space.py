"""Week 3 optional Day 11: a constant-size recurrent state next to a growing KV cache.

Softmax attention must keep every key and value, because softmax(q . k_s) can only be computed
once q is known. Drop the softmax and the past collapses into one matrix per head:

    y_t = sum_{s <= t} gamma^(t - s) (q_t . k_s) v_s  =  q_t S_t,
    S_t = gamma S_{t-1} + k_t^T v_t                     (S: [D_k, D_v], whatever t is)

This is linear attention with a decay (RetNet's retention; a diagonal state-space model of the
same shape). It has two equal forms: the *recurrent* one (a constant-size state, one update per
token: how it decodes) and the *parallel* one (a masked [L, L] matrix, like causal attention:
how it trains). The price of the constant state is capacity: `associative_recall` measures how
well key -> value pairs written into a D x D state can be read back, next to softmax attention
over a cache that keeps them all.

Chapter: book/src/week3-11-state-space.md.
"""

from __future__ import annotations

import numbers  # noqa: F401 (numbers.Integral)
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from tiny_llm_common.weights import ModelArgs

from .kv_memory import dtype_size, kv_bytes_per_token  # noqa: F401


def _decay_array(decay, heads: int) -> mx.array:
    """decay as [H, 1, 1] float32, checked to lie in (0, 1]."""
    d = np.asarray(np.array(decay) if isinstance(decay, mx.array) else decay, dtype=np.float64)
    if d.ndim > 1 or (d.ndim == 1 and d.shape[0] != heads):
        raise ValueError(f"decay must be a number or one per head ({heads}), got shape {d.shape}")
    if not np.all((d > 0) & (d <= 1)):
        raise ValueError(f"decay must lie in (0, 1], got {d}")
    return mx.array(np.broadcast_to(d, (heads,)).astype(np.float32))[:, None, None]


def _check_qkv(q: mx.array, k: mx.array, v: mx.array) -> None:
    if q.ndim != 4 or q.shape != k.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q {q.shape}, k {k.shape} must be [B, H, L, D_k] and v {v.shape} [B, H, L, D_v]"
        )


# -- task 1: one step of the recurrence (how it decodes) ---------------------------------------
def recurrent_step(
    state: mx.array, q: mx.array, k: mx.array, v: mx.array, decay
) -> tuple[mx.array, mx.array]:
    """One token: S' = decay * S + k^T v, y = q S'.

    state [B, H, D_k, D_v]; q, k [B, H, D_k]; v [B, H, D_v]; decay a number or one per head.
    Returns (y [B, H, D_v], the new state), float32.
    """
    # TODO(Week 3 Day 11, task 1): the shape checks of the docstring (ValueError), then
    # g = _decay_array(decay, H) ([H, 1, 1], checked to lie in (0, 1]); everything in float32:
    # state' = g * state + (outer product of k and v: k[..., :, None] * v[..., None, :]),
    # y = q state' (a [1, D_k] @ [D_k, D_v] product per head). Return (y, state').
    raise NotImplementedError(
        "Week 3 Day 11, task 1: implement `recurrent_step` in src/tiny_llm/state_space.py"
    )


# -- task 2: the whole sequence, token by token ------------------------------------------------
def recurrent_form(
    q: mx.array, k: mx.array, v: mx.array, decay, state: mx.array | None = None
) -> tuple[mx.array, mx.array]:
    """Run `recurrent_step` over the L tokens of q, k [B, H, L, D_k], v [B, H, L, D_v], from
    `state` (zeros when None). Returns (y [B, H, L, D_v], the final state [B, H, D_k, D_v])."""
    # TODO(Week 3 Day 11, task 2): _check_qkv(q, k, v); a zero float32 state [B, H, D_k, D_v]
    # when none is given; recurrent_step for t = 0 .. L - 1 (q[:, :, t], ...), stacking the ys on
    # axis 2. L = 0 gives an empty y [B, H, 0, D_v] and the state unchanged.
    raise NotImplementedError(
        "Week 3 Day 11, task 2: implement `recurrent_form` in src/tiny_llm/state_space.py"
    )


# -- task 3: the same thing as one masked matrix product (how it trains) -----------------------
def parallel_form(q: mx.array, k: mx.array, v: mx.array, decay) -> mx.array:
    """y = (q k^T * W) v with W[t, s] = decay^(t - s) for s <= t, else 0 ([B, H, L, L]).

    Equal to `recurrent_form(q, k, v, decay)[0]`, in float32."""
    # TODO(Week 3 Day 11, task 3): _check_qkv; g = _decay_array(decay, H); gap[t, s] = t - s;
    # W = g ** gap where gap >= 0, else 0 ([H, L, L]; clamp the exponent at 0 before the power so
    # that the masked entries stay finite); y = ((q @ k^T) * W) @ v, in float32.
    raise NotImplementedError(
        "Week 3 Day 11, task 3: implement `parallel_form` in src/tiny_llm/state_space.py"
    )


# -- task 4: memory per sequence -----------------------------------------------------------------
def state_bytes(args: ModelArgs, dtype: mx.Dtype | str) -> int:
    """Bytes of the recurrent state of one sequence if every attention layer of `args` were a
    linear-attention layer: one [head_dim, head_dim] matrix per KV head (query heads that share
    a KV head read the same sum of k^T v), per layer. Independent of the sequence length."""
    # TODO(Week 3 Day 11, task 4): layers x KV heads x head_dim x head_dim x dtype_size(dtype).
    raise NotImplementedError(
        "Week 3 Day 11, task 4: implement `state_bytes` in src/tiny_llm/state_space.py"
    )


def paged_kv_bytes(args: ModelArgs, n_tokens: int, block_size: int, dtype: mx.Dtype | str) -> int:
    """Bytes the paged cache allocates for one sequence of `n_tokens`: whole blocks."""
    # TODO(Week 3 Day 11, task 4): ValueError unless n_tokens >= 0 and block_size >= 1 are ints;
    # ceil(n_tokens / block_size) whole blocks of block_size tokens, kv_bytes_per_token each.
    raise NotImplementedError(
        "Week 3 Day 11, task 4: implement `paged_kv_bytes` in src/tiny_llm/state_space.py"
    )


def breakeven_tokens(args: ModelArgs) -> float:
    """Tokens at which the KV cache (2 x D numbers per KV head and layer per token) holds as many
    numbers as the state (D x D per KV head and layer): D / 2."""
    # TODO(Week 3 Day 11, task 4): solve 2 x D x N = D x D for N.
    raise NotImplementedError(
        "Week 3 Day 11, task 4: implement `breakeven_tokens` in src/tiny_llm/state_space.py"
    )


# -- the experiment (provided): what a constant-size state forgets ------------------------------
@dataclass(frozen=True)
class RecallResult:
    n_pairs: int
    dim: int
    linear_error: float  # mean relative error of values read back from the D x D state
    softmax_error: float  # the same through softmax attention over all stored keys
    state_numbers: int  # dim * dim, whatever n_pairs is
    cache_numbers: int  # 2 * dim * n_pairs


def associative_recall(n_pairs: int, dim: int = 64, seed: int = 0, sharpness: float = 8.0):
    """Write `n_pairs` random (unit key, value) pairs, then query with each key.

    Linear attention sums them into S = sum_i k_i^T v_i and answers q S: exact while the keys are
    orthogonal, so it degrades once n_pairs approaches dim. Softmax attention with
    scale `sharpness * sqrt(dim)` over all stored keys picks the matching one.
    """
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n_pairs, dim))
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    values = rng.standard_normal((n_pairs, dim))
    q, k, v = (mx.array(x[None, None].astype(np.float32)) for x in (keys, keys, values))
    _, state = recurrent_form(q, k, v, 1.0)  # gamma = 1: nothing fades, all n pairs are kept
    linear = np.array((q @ state)[0, 0], dtype=np.float64)  # every key against the final state
    scores = keys @ keys.T * sharpness * np.sqrt(dim)
    p = np.exp(scores - scores.max(axis=1, keepdims=True))
    soft = (p / p.sum(axis=1, keepdims=True)) @ values

    def rel(x):
        return float(np.mean(np.linalg.norm(x - values, axis=1) / np.linalg.norm(values, axis=1)))

    return RecallResult(n_pairs, dim, rel(linear), rel(soft), dim * dim, 2 * dim * n_pairs)
