"""Week 2 Day 1 (generation with a KV cache) and Day 6 (a batch of requests decoded together).

Prefill runs the whole prompt through the model once and fills the cache; every decode step
after that feeds only the newest token, whose query attends over the cached keys and values.
"""

from collections.abc import Callable

import mlx.core as mx

from .kv_cache import make_batch_cache, make_cache

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
    from .paged_kv_cache import PagedKVCache

    pool = PagedKVCache(model, -(-max_len // PAGED_BLOCK_SIZE), PAGED_BLOCK_SIZE)

    def layers_for(n: int) -> list:
        pool.begin_step([0], [n])
        return pool.layers()

    return layers_for


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
    _check_max_tokens(max_tokens)
    tokens = [int(t) for t in prompt_tokens]
    if not tokens:
        raise ValueError("prompt_tokens is empty: the model needs at least one token to go on")
    eos = _eos_ids(tokenizer)
    sampler = sampler or _greedy
    if cache_kind == "paged":
        layers_for = _paged_layers(model, len(tokens) + max_tokens)
    else:
        cache = make_cache(model)
        layers_for = lambda n: cache  # noqa: E731

    def step(inputs: list[int] | mx.array) -> mx.array:
        """Run the model on `inputs` ([1, L]) after the cached tokens; the next token [1]."""
        x = mx.array(inputs, dtype=mx.int32).reshape(1, -1)
        logits = model(x, layers_for(x.shape[1]))
        return sampler(logits[:, -1, :])

    generated: list[int] = []
    next_token = step(tokens)  # prefill: the whole prompt in one forward pass
    mx.async_eval(next_token)
    while True:
        # Queue the following step before reading this token, so building its graph in Python
        # overlaps the computation (the last step's work is wasted when EOS or the limit ends
        # the loop: one forward pass of one token).
        current = next_token
        if len(generated) + 1 < max_tokens:
            next_token = step(current)
            mx.async_eval(next_token)
        token = int(current.item())
        if token in eos:
            break
        generated.append(token)
        if on_token is not None:
            on_token(token)
        if len(generated) == max_tokens:
            break
    return generated


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
    eos = _eos_ids(tokenizer)
    sampler = sampler or _greedy
    longest = max(len(p) for p in prompts)
    pads = [longest - len(p) for p in prompts]
    # Padding tokens are never attended to; any valid id will do.
    padded = [[0] * pad + p for pad, p in zip(pads, prompts, strict=True)]
    cache = make_batch_cache(model, pads)
    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))  # request index of each batch row

    logits = model(mx.array(padded, dtype=mx.int32), cache)
    while True:
        next_tokens = sampler(logits[:, -1, :]).tolist()  # [rows]
        keep = []
        for row, (request, token) in enumerate(zip(active, next_tokens, strict=True)):
            if token in eos:
                continue
            outputs[request].append(token)
            if len(outputs[request]) < max_tokens:
                keep.append(row)
        if not keep:
            return outputs
        if len(keep) < len(active):  # finished requests stop: drop their rows
            for layer_cache in cache:
                layer_cache.filter(keep)
            active = [active[row] for row in keep]
            next_tokens = [next_tokens[row] for row in keep]
        logits = model(mx.array(next_tokens, dtype=mx.int32)[:, None], cache)
