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
    # TODO:
    # 1. Raise ValueError unless max_tokens is an int >= 1 (a bool is not a count) and the
    #    prompt has at least one token.
    # 2. Loop at most max_tokens times: run model(mx.array([tokens], dtype=mx.int32)) on the
    #    whole sequence, take logits[:, -1, :] ([1, vocab]), pick the next token with
    #    sampler(...) (default mx.argmax(..., axis=-1)) and turn it into a Python int.
    # 3. Stop on an EOS token (not returned, not streamed); otherwise append it to the
    #    sequence and the result and call on_token(token).
    raise NotImplementedError(
        "Week 1 Day 6, task 1: implement `simple_generate` in src/tiny_llm/generate.py"
    )
