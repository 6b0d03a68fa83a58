"""Week 1 Day 6: generation without a cache, the baseline the KV cache of Week 2 improves on."""

from collections.abc import Callable

import mlx.core as mx


def simple_generate(
    model,
    tokenizer,
    prompt_tokens: list[int],
    max_tokens: int,
    sampler: Callable[[mx.array], mx.array] | None = None,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Generate up to `max_tokens` tokens after `prompt_tokens`; return the new tokens.

    Every step runs `model` on the whole sequence so far (prompt + tokens generated) with no
    cache and picks the next token from the last position's logits `[1, vocab]` with
    `sampler` (default: greedy argmax). Stops early when the sampled token is one of
    `tokenizer.eos_token_ids`; the end-of-sequence token is neither returned nor streamed.
    `on_token(token_id)` is called once per returned token, as soon as it is chosen.
    `tokenizer` may be None: then only `max_tokens` stops the loop.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    tokens = [int(t) for t in prompt_tokens]
    if not tokens:
        raise ValueError("prompt_tokens is empty: the model needs at least one token to go on")
    eos = set() if tokenizer is None else {int(t) for t in tokenizer.eos_token_ids}
    if sampler is None:

        def sampler(logits):
            return mx.argmax(logits, axis=-1)

    generated: list[int] = []
    for _ in range(max_tokens):
        logits = model(mx.array([tokens], dtype=mx.int32))  # [1, L, vocab], recomputed each step
        token = int(sampler(logits[:, -1, :]).item())
        if token in eos:
            break
        tokens.append(token)
        generated.append(token)
        if on_token is not None:
            on_token(token)
    return generated
