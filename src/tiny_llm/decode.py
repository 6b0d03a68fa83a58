"""Week 2 Day 1 (generation with a KV cache) and Day 6 (a batch of requests decoded together).

Prefill runs the whole prompt through the model once and fills the cache; every decode step
after that feeds only the newest token, whose query attends over the cached keys and values.

Chapters: book/src/week2-01-kv-cache.md (Day 1), book/src/week2-06-batching.md (Day 6).
"""

from collections.abc import Callable

import mlx.core as mx

from .kv_cache import make_batch_cache, make_cache  # noqa: F401

Sampler = Callable[[mx.array], mx.array]
CACHE_KINDS = ("contiguous", "paged")


def _greedy(logits: mx.array) -> mx.array:
    return mx.argmax(logits, axis=-1)


def _check_max_tokens(max_tokens) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")


def _eos_ids(tokenizer) -> set[int]:
    return set() if tokenizer is None else {int(t) for t in tokenizer.eos_token_ids}


PAGED_BLOCK_SIZE = 16


def _paged_layers(model, max_len: int) -> Callable[[int], list]:
    """Week 3 Day 3: a paged cache with room for one sequence of `max_len` tokens. The returned
    function prepares a step of `n` new tokens (blocks, slots, tables: once for all layers)
    and returns the per-layer caches the model takes."""
    # TODO(Week 3 Day 3, task 3): pool = PagedKVCache(model, ceil(max_len / PAGED_BLOCK_SIZE),
    # PAGED_BLOCK_SIZE) (from .paged_kv_cache); return a function of n that calls
    # pool.begin_step([0], [n]) and returns pool.layers().
    raise NotImplementedError(
        "Week 3 Day 3, task 3: implement `_paged_layers` in src/tiny_llm/decode.py"
    )


def generate_with_cache(
    model,
    tokenizer,
    prompt_tokens: list[int],
    max_tokens: int,
    cache_kind: str = "contiguous",
    sampler: Sampler | None = None,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Generate up to `max_tokens` tokens after `prompt_tokens` with a KV cache; return them.

    Same contract as Week 1's `simple_generate` (greedy by default, stops before an EOS token,
    `on_token` per returned token, `tokenizer` may be None), but the model runs once on the
    prompt and then once per new token on that token alone. `cache_kind`: "contiguous" (this
    week) or "paged" (Week 3).
    """
    if cache_kind not in CACHE_KINDS:
        raise ValueError(f"cache_kind must be one of {CACHE_KINDS}, got {cache_kind!r}")
    if cache_kind == "paged":
        # TODO(Week 3 Day 3, task 3): remove this raise. In your loop below, build
        # `layers_for = _paged_layers(model, len(prompt) + max_tokens)` for "paged" and run
        # each step as model(x, layers_for(x.shape[1])) (the contiguous cache: always `cache`).
        raise NotImplementedError(
            'Week 3 Day 3, task 3: implement `generate_with_cache` with cache_kind="paged" '
            "in src/tiny_llm/decode.py"
        )
    # TODO(Week 2 Day 1, task 3):
    # 1. Check max_tokens (_check_max_tokens) and that the prompt is not empty (ValueError).
    # 2. cache = make_cache(model); eos = _eos_ids(tokenizer); sampler defaults to _greedy.
    # 3. Prefill: logits = model(prompt as [1, L] int32, cache); the next token is
    #    sampler(logits[:, -1, :]).
    # 4. Decode: until max_tokens or EOS (not returned, not streamed), append the token, call
    #    on_token(token), and run model([[token]], cache) -- one token, not the whole sequence.
    # (Faster: build the next step before reading this token with .item() and start it with
    #  mx.async_eval, so Python and the computation overlap. See the chapter.)
    raise NotImplementedError(
        "Week 2 Day 1, task 3: implement `generate_with_cache` in src/tiny_llm/decode.py"
    )


def batch_generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_tokens: int,
    sampler: Sampler | None = None,
) -> list[list[int]]:
    """Greedy (or `sampler`) generation for several prompts at once; one list of new tokens
    per prompt, in order.

    Prompts are left-padded to the longest one and prefilled in one [B, L] call; each decode
    step then runs all unfinished requests as one [B, 1] batch. A request leaves the batch
    when it samples an EOS token (not returned) or has `max_tokens` tokens.
    """
    _check_max_tokens(max_tokens)
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts or any(not p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    # TODO(Week 2 Day 6, task 3):
    # 1. Left-pad every prompt to the longest (pads[b] = longest - len, any token id as padding)
    #    and make_batch_cache(model, pads).
    # 2. Prefill all rows in one model([B, L]) call.
    # 3. Loop: sample one token per row from logits[:, -1, :]; EOS finishes a request (not
    #    returned), as does reaching max_tokens. Drop finished rows from every layer's cache
    #    with filter(...) and from the batch; stop when none is left; otherwise run the model
    #    on the remaining rows' tokens as [rows, 1].
    raise NotImplementedError(
        "Week 2 Day 6, task 3: implement `batch_generate` in src/tiny_llm/decode.py"
    )
