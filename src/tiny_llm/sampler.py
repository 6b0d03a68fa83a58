"""Week 1 Day 7: turning logits into the next token (greedy, temperature, top-k, top-p).

Chapter: book/src/week1-07-sampling.md.
"""

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
    # TODO(Week 1 Day 7, task 1):
    # - k <= 0 or k >= V (logprobs.shape[-1]): return logprobs unchanged;
    # - the k-th largest value per row: mx.topk(logprobs, k, axis=-1) gives the k largest (in
    #   no particular order), so take their min (keepdims=True) -> [..., 1];
    # - mx.where(logprobs >= kth, logprobs, -inf in logprobs.dtype).
    raise NotImplementedError(
        "Week 1 Day 7, task 1: implement `apply_top_k` in src/tiny_llm/sampler.py"
    )


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
    # TODO(Week 1 Day 7, task 2):
    # - p >= 1: return logprobs unchanged;
    # - probs = mx.softmax(logprobs in float32, axis=-1) (renormalises what top-k left);
    # - sort each row in descending order (mx.sort is ascending: reverse with [..., ::-1]);
    # - a token is kept when the tokens ranked above it sum to less than p:
    #   before = cumsum(sorted) - sorted; n_keep = sum(before < p) (>= 1: the top one);
    # - threshold = the n_keep-th largest probability (mx.take_along_axis with n_keep - 1);
    # - keep entries with probs >= threshold, -inf elsewhere (in logprobs.dtype).
    raise NotImplementedError(
        "Week 1 Day 7, task 2: implement `apply_top_p` in src/tiny_llm/sampler.py"
    )


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
    # TODO(Week 1 Day 7, task 3): build and return `sample(logits)`:
    # - key = mx.random.key(seed) when seed is not None (else None: the global RNG);
    # - in sample: reject logits.ndim != 2 with ValueError; temp == 0 -> mx.argmax over V;
    #   otherwise scaled = logits (float32) / temp, logprobs = scaled - logsumexp(scaled),
    #   apply_top_k then apply_top_p, and mx.random.categorical(logprobs, key=subkey), where
    #   `key, subkey = mx.random.split(key)` advances the sampler's own stream (nonlocal key);
    # - return token ids as int32, shape [B].
    raise NotImplementedError(
        "Week 1 Day 7, task 3: implement `make_sampler` in src/tiny_llm/sampler.py"
    )


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
