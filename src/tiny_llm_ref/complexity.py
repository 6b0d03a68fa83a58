"""Week 2 Day 2: what the KV cache saves, counted and measured.

Counts for generating `new_tokens` tokens after a prompt of `prompt_len` tokens, with Week 1's
`simple_generate` (cached=False: every step runs the whole sequence so far) or Day 1's
`generate_with_cache` (cached=True: the prompt once, then one token per step), and a least-squares
fit of measured times to a power law t = c * N^e.
"""

from __future__ import annotations

import math

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
    if new_tokens == 0:
        return 0
    if cached:
        return prompt_len + new_tokens - 1
    return new_tokens * prompt_len + new_tokens * (new_tokens - 1) // 2


def attention_scores(prompt_len: int, new_tokens: int, cached: bool) -> int:
    """Query-key dot products per head and layer, as the dense (masked) attention computes them.

    A call with L queries over S keys computes L * S scores (the causal mask hides some but they
    are computed). Without a cache step i is a square (prompt_len + i)^2; with one, the prefill
    is prompt_len^2 and step i >= 1 is one query over prompt_len + i keys.
    """
    _check_lengths(prompt_len, new_tokens)
    if new_tokens == 0:
        return 0
    P, T = prompt_len, new_tokens
    if cached:
        # P^2 + sum_{i=1}^{T-1} (P + i)
        return P * P + (T - 1) * P + T * (T - 1) // 2
    # sum_{i=0}^{T-1} (P + i)^2 = T P^2 + 2 P sum(i) + sum(i^2)
    return T * P * P + P * T * (T - 1) + (T - 1) * T * (2 * T - 1) // 6


def attention_flops(args: ModelArgs, prompt_len: int, new_tokens: int, cached: bool) -> int:
    """Floating-point operations of attention (Q K^T and P V, 2 flops per multiply-add) over
    every query head and layer."""
    per_score = 2 * 2 * args.head_dim  # one dot product for the score, one axpy for P V
    heads = args.num_attention_heads * args.num_hidden_layers
    return per_score * heads * attention_scores(prompt_len, new_tokens, cached)


def dense_flops_per_token(args: ModelArgs) -> int:
    """2 flops per weight of every matrix one position multiplies: Q, K, V, O and the three
    MLP projections of every layer, and the output projection (lm_head)."""
    d, hd = args.hidden_size, args.head_dim
    q_o = 2 * d * args.num_attention_heads * hd
    k_v = 2 * d * args.num_key_value_heads * hd
    mlp = 3 * d * args.intermediate_size
    return 2 * ((q_o + k_v + mlp) * args.num_hidden_layers + d * args.vocab_size)


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
    ns, times = list(ns), list(times)
    if len(ns) != len(times) or len(ns) < 2:
        raise ValueError(f"need two or more (n, time) pairs, got {len(ns)} and {len(times)}")
    if any(
        not (n > 0 and t > 0) or math.isinf(n) or math.isinf(t)
        for n, t in zip(ns, times, strict=True)
    ):
        raise ValueError("sizes and times must be positive and finite for a log-log fit")
    xs = [math.log(n) for n in ns]
    ys = [math.log(t) for t in times]
    mx_, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx_) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("all sizes are equal: no slope to fit")
    e = sum((x - mx_) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return e, math.exp(my - e * mx_)
