"""Week 1 Day 7: turning logits into the next token (greedy, temperature, top-k, top-p)."""

import math
from collections.abc import Callable

import mlx.core as mx

NEG_INF = float("-inf")


def apply_top_k(logprobs: mx.array, k: int) -> mx.array:
    """Keep the k largest entries of each row of `logprobs` [..., V]; set the others to -inf.

    k <= 0 or k >= V means no filter. Entries equal to the k-th largest value are all kept, so
    ties never make the result depend on the sort order.
    """
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    vocab = logprobs.shape[-1]
    if k <= 0 or k >= vocab:
        return logprobs
    # The k-th largest value of each row: topk gives the k largest in no particular order.
    kth = mx.min(mx.topk(logprobs, k, axis=-1), axis=-1, keepdims=True)
    return mx.where(logprobs >= kth, logprobs, mx.array(NEG_INF, dtype=logprobs.dtype))


def apply_top_p(logprobs: mx.array, p: float) -> mx.array:
    """Nucleus filter: keep the fewest most-probable tokens whose probabilities sum to >= p.

    `logprobs` [..., V] may be unnormalised (for instance already top-k filtered): the row is
    renormalised first, so p is a share of what is left. The most probable token is always
    kept; entries tied with the last kept one are kept too. p >= 1 means no filter.
    """
    if not isinstance(p, int | float) or isinstance(p, bool):
        raise TypeError(f"p must be a number, got {type(p).__name__}")
    if math.isnan(p) or p <= 0:
        raise ValueError(f"p must be > 0 (>= 1 means no filter), got {p!r}")
    if p >= 1.0:
        return logprobs
    probs = mx.softmax(logprobs.astype(mx.float32), axis=-1)
    desc = mx.sort(probs, axis=-1)[..., ::-1]
    # A token is kept if the tokens ranked above it sum to less than p; the top one always is.
    before = mx.cumsum(desc, axis=-1) - desc
    n_keep = mx.sum(before < p, axis=-1, keepdims=True)
    threshold = mx.take_along_axis(desc, mx.maximum(n_keep, 1) - 1, axis=-1)
    return mx.where(probs >= threshold, logprobs, mx.array(NEG_INF, dtype=logprobs.dtype))


def make_sampler(
    temp: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None
) -> Callable[[mx.array], mx.array]:
    """A function mapping logits [B, V] to token ids [B] (int32).

    temp == 0 is greedy (argmax; top_k and top_p are then irrelevant). Otherwise the logits are
    divided by `temp`, turned into log-probabilities, filtered by top-k then top-p, and one token
    per row is drawn. With a `seed` the sampler owns an `mx.random` key and splits it on every
    call, so the same seed gives the same stream of tokens whatever else uses the global RNG;
    without one it draws from the global RNG.
    """
    _check_sampler_args(temp, top_k, top_p, seed)
    key = None if seed is None else mx.random.key(seed)

    def sample(logits: mx.array) -> mx.array:
        nonlocal key
        if logits.ndim != 2:
            raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
        if temp == 0:
            return mx.argmax(logits, axis=-1).astype(mx.int32)
        scaled = logits.astype(mx.float32) / temp
        logprobs = scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)
        logprobs = apply_top_p(apply_top_k(logprobs, top_k), top_p)
        subkey = None
        if key is not None:
            key, subkey = mx.random.split(key)
        return mx.random.categorical(logprobs, axis=-1, key=subkey).astype(mx.int32)

    return sample


def _check_sampler_args(temp, top_k, top_p, seed) -> None:
    """Reject arguments that would silently sample from the wrong distribution."""
    if not isinstance(temp, int | float) or isinstance(temp, bool):
        raise TypeError(f"temp must be a number, got {type(temp).__name__}")
    if not math.isfinite(temp) or temp < 0:
        raise ValueError(f"temp must be finite and >= 0 (0 = greedy), got {temp!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = no filter), got {top_k}")
    if not isinstance(top_p, int | float) or isinstance(top_p, bool):
        raise TypeError(f"top_p must be a number, got {type(top_p).__name__}")
    if math.isnan(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = no filter), got {top_p!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
