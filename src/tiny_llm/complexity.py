"""Week 2 Day 2: what the KV cache saves, counted and measured.

Counts for generating `new_tokens` tokens after a prompt of `prompt_len` tokens, with Week 1's
`simple_generate` (cached=False: every step runs the whole sequence so far) or Day 1's
`generate_with_cache` (cached=True: the prompt once, then one token per step), and a least-squares
fit of measured times to a power law t = c * N^e.

Chapter: book/src/week2-02-complexity.md.
"""

from __future__ import annotations

import math  # noqa: F401 (math.log, math.exp for the fit)

from tiny_llm_common.weights import ModelArgs


def _check_lengths(prompt_len: int, new_tokens: int) -> None:
    for name, value, low in (("prompt_len", prompt_len, 1), ("new_tokens", new_tokens, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")


def forward_calls(new_tokens: int, cached: bool) -> int:
    """Model calls to generate `new_tokens` tokens: one per token either way (the lecture's N)."""
    _check_lengths(1, new_tokens)
    return new_tokens


def tokens_processed(prompt_len: int, new_tokens: int, cached: bool) -> int:
    """Token positions pushed through the model (each costs the dense layers once).

    Without a cache, step i (0-based) runs prompt_len + i positions. With one, the prefill runs
    the prompt and each of the other new_tokens - 1 steps runs one position (the last token
    sampled is never fed back).
    """
    _check_lengths(prompt_len, new_tokens)
    # TODO(Week 2 Day 2, task 1): 0 when new_tokens == 0; otherwise a closed form for each case
    # (no loops: N can be a million). Without a cache: the sum of prompt_len + i for i < T.
    raise NotImplementedError(
        "Week 2 Day 2, task 1: implement `tokens_processed` in src/tiny_llm/complexity.py"
    )


def attention_scores(prompt_len: int, new_tokens: int, cached: bool) -> int:
    """Query-key dot products per head and layer, as the dense (masked) attention computes them.

    A call with L queries over S keys computes L * S scores (the causal mask hides some but they
    are computed). Without a cache step i is a square (prompt_len + i)^2; with one, the prefill
    is prompt_len^2 and step i >= 1 is one query over prompt_len + i keys.
    """
    _check_lengths(prompt_len, new_tokens)
    # TODO(Week 2 Day 2, task 2): closed forms again (sum of i is T(T-1)/2, sum of i^2 is
    # (T-1)T(2T-1)/6 for i < T). Integers only: use // and keep the result an int.
    raise NotImplementedError(
        "Week 2 Day 2, task 2: implement `attention_scores` in src/tiny_llm/complexity.py"
    )


def attention_flops(args: ModelArgs, prompt_len: int, new_tokens: int, cached: bool) -> int:
    """Floating-point operations of attention (Q K^T and P V, 2 flops per multiply-add) over
    every query head and layer."""
    per_score = 2 * 2 * args.head_dim  # one dot product for the score, one axpy for P V
    heads = args.num_attention_heads * args.num_hidden_layers
    return per_score * heads * attention_scores(prompt_len, new_tokens, cached)


def dense_flops_per_token(args: ModelArgs) -> int:
    """2 flops per weight of every matrix one position multiplies: Q, K, V, O and the three
    MLP projections of every layer, and the output projection (lm_head)."""
    # TODO(Week 2 Day 2, task 3): count the weights of one layer's seven matrices from args
    # (q and o: hidden x heads * head_dim; k and v: hidden x kv_heads * head_dim; gate, up,
    # down: hidden x intermediate), times the layers, plus lm_head (hidden x vocab); times 2.
    raise NotImplementedError(
        "Week 2 Day 2, task 3: implement `dense_flops_per_token` in src/tiny_llm/complexity.py"
    )


def dense_flops(args: ModelArgs, prompt_len: int, new_tokens: int, cached: bool) -> int:
    """Flops of the matrices (everything but attention's scores) to generate `new_tokens`."""
    return dense_flops_per_token(args) * tokens_processed(prompt_len, new_tokens, cached)


def attention_share(args: ModelArgs, context: int) -> float:
    """The fraction of one decode step's flops spent in attention at `context` cached tokens."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be an int >= 1, got {context!r}")
    attn = 4 * args.head_dim * args.num_attention_heads * args.num_hidden_layers * context
    return attn / (attn + dense_flops_per_token(args))


def fit_power_law(ns, times) -> tuple[float, float]:
    """Least-squares fit of log t = e * log n + log c; returns (e, c), so t ~ c * n^e."""
    # TODO(Week 2 Day 2, task 4): ValueError for fewer than two pairs, lengths that differ,
    # non-positive or non-finite values, or all sizes equal. Then the ordinary least-squares
    # line through (log n, log t): e = cov(x, y) / var(x), log c = mean(y) - e * mean(x).
    raise NotImplementedError(
        "Week 2 Day 2, task 4: implement `fit_power_law` in src/tiny_llm/complexity.py"
    )
