"""Week 3 Day 3: the paged KV cache inside the model (src/tiny_llm/paged_kv_cache.py).

Oracle: mlx-lm's own model classes with mlx-lm's own KVCache (`generate_step` for greedy
tokens, `make_prompt_cache` for teacher-forced logits), built from the same weights. Nothing
here compares with the learner's earlier days. Block tables are checked through the public API
for their length, distinct in-range ids and stability (a table only grows at its end), never
for exact ids.
"""

from __future__ import annotations

import importlib
import math

import mlx.core as mx
import numpy as np
import pytest

from tiny_llm_common.checkpoints import random_checkpoint
from tiny_llm_common.grading import assert_allclose, solution_name
from tiny_llm_common.models.mlx_lm_oracle import build_mlx_lm_model

sol_model = importlib.import_module(f"{solution_name()}.model")
pkv = importlib.import_module(f"{solution_name()}.paged_kv_cache")
bm = importlib.import_module(f"{solution_name()}.block_manager")
PagedKVCache, OutOfBlocksError = pkv.PagedKVCache, bm.OutOfBlocksError

PROMPT = [3, 141, 59, 26, 5, 200, 17, 8, 99]
PROMPTS = [PROMPT, [7, 7, 1], [100, 2, 3, 4, 5, 6]]
LOGIT_ATOL = 2e-4  # float32 logits of tiny random models, as on Week 2 Day 1
# Seeds whose 128 greedy tokens vary (63 and 13 distinct ids) and never nearly tie.
CHECKPOINTS = {"llama": ("llama", 4), "qwen2": ("qwen2", 5)}


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def checkpoint(request):
    family, seed = CHECKPOINTS[request.param]
    args, weights = random_checkpoint(family, seed=seed)
    return args, sol_model.Model(args, weights), build_mlx_lm_model(args, weights)


def oracle_tokens(oracle, prompt, steps):
    """Greedy tokens from mlx-lm's generate_step (mlx-lm's model and KVCache)."""
    from mlx_lm.generate import generate_step

    out = []
    for token, logprobs in generate_step(mx.array(prompt), oracle, max_tokens=steps):
        top2 = np.sort(np.array(logprobs))[-2:]
        assert top2[1] - top2[0] > 1e-3, "the oracle nearly ties: pick another seed"
        out.append(int(token))
    return out


def oracle_logits(oracle, chunks):
    """mlx-lm's last-position logits after each chunk, through its own KVCache."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(oracle)
    return [oracle(mx.array([c], dtype=mx.int32), cache=cache)[0, -1] for c in chunks]


def run(model, cache, seq_ids, rows):
    """One step: each sequence's new tokens (a list per row, right-padded); last-token logits."""
    cache.begin_step(seq_ids, [len(r) for r in rows])
    width = max(map(len, rows))
    tokens = mx.array([r + [0] * (width - len(r)) for r in rows], dtype=mx.int32)
    logits = model(tokens, cache.layers())
    return [logits[b, len(r) - 1] for b, r in enumerate(rows)]


def paged_greedy(model, cache, prompt, steps, seq_id="s"):
    (logits,) = run(model, cache, [seq_id], [prompt])
    out = []
    for _ in range(steps):
        out.append(int(mx.argmax(logits).item()))
        (logits,) = run(model, cache, [seq_id], [[out[-1]]])
    return out


def check_table(cache, seq_id, n_tokens, previous=None):
    table = cache.block_table(seq_id)
    assert cache.seq_len(seq_id) == n_tokens
    assert len(table) == math.ceil(n_tokens / cache.block_size), f"{n_tokens} tokens: {table}"
    assert len(set(table)) == len(table), f"a block appears twice in {table}"
    assert all(0 <= b < cache.num_blocks for b in table), table
    if previous is not None:
        assert table[: len(previous)] == previous, f"blocks moved: {previous} -> {table}"
    return table


# --- Generation against mlx-lm --------------------------------------------------------------
def test_greedy_128_tokens_match_mlx_lm(checkpoint):
    args, model, oracle = checkpoint
    expected = oracle_tokens(oracle, PROMPT, 128)
    cache = PagedKVCache(model, num_blocks=40, block_size=4)  # 137 tokens: 35 blocks
    out = paged_greedy(model, cache, PROMPT, 128)
    first_bad = next(
        (i for i, (a, b) in enumerate(zip(out, expected, strict=False)) if a != b), None
    )
    assert out == expected, f"paged greedy differs from mlx-lm from token {first_bad} on"


def test_generate_with_cache_paged_matches_mlx_lm(checkpoint):
    """Task 3: `generate_with_cache(..., cache_kind="paged")` (Week 2's loop on this cache)."""
    decode = importlib.import_module(f"{solution_name()}.decode")
    args, model, oracle = checkpoint
    expected = oracle_tokens(oracle, PROMPT, 40)
    streamed = []
    out = decode.generate_with_cache(
        model, None, PROMPT, 40, cache_kind="paged", on_token=streamed.append
    )
    assert out == expected, f"paged generate_with_cache {out} != mlx-lm's {expected}"
    assert streamed == expected, "on_token must see each returned token once, in order"


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_prefill_chunks_and_decode_logits_match_mlx_lm(checkpoint, block_size):
    """5 + 4 prompt tokens (the second chunk attends to cached and new tokens), then decode."""
    args, model, oracle = checkpoint
    chunks = [PROMPT[:5], PROMPT[5:], [12], [250], [0], [77]]
    expected = oracle_logits(oracle, chunks)
    cache = PagedKVCache(args, num_blocks=16, block_size=block_size)
    for step, chunk in enumerate(chunks):
        (logits,) = run(model, cache, ["s"], [chunk])
        assert_allclose(logits, expected[step], atol=LOGIT_ATOL, what=f"logits, step {step}")


@pytest.mark.slow
def test_smollm2_paged_generation_matches_mlx_lm():
    from tiny_llm_common.models import load_model

    loaded = load_model("smollm2", verbose=False)
    prompt = loaded.tokenizer.encode("The three primary colours are")
    oracle = build_mlx_lm_model(loaded.args, loaded.weights)
    expected = oracle_tokens(oracle, prompt, 24)
    model = sol_model.Model(loaded.args, loaded.weights)
    cache = PagedKVCache(model, num_blocks=10, block_size=4)
    out = paged_greedy(model, cache, prompt, 24)
    dec = loaded.tokenizer.decode
    assert out == expected, f"SmolLM2 paged: {dec(out)!r} != mlx-lm's {dec(expected)!r}"
    check_table(cache, "s", len(prompt) + 24)


# --- Block tables through the public API -------------------------------------------------------
def test_block_tables_grow_one_block_at_a_time_and_free_returns_them(checkpoint):
    args, model, _ = checkpoint
    cache = PagedKVCache(model, num_blocks=12, block_size=4)
    assert cache.num_free_blocks == 12 and "s" not in cache
    (logits,) = run(model, cache, ["s"], [PROMPT])
    table = check_table(cache, "s", 9)  # 3 blocks, the last holding 1 token
    assert cache.layers()[0].offset == 0, "offset is the length before the step"
    for n in range(10, 30):
        (logits,) = run(model, cache, ["s"], [[int(mx.argmax(logits).item())]])
        assert cache.layers()[0].offset == n - 1
        table = check_table(cache, "s", n, previous=table)
        assert cache.num_used_blocks == len(table) and cache.num_free_blocks == 12 - len(table)
    cache.free("s")
    assert "s" not in cache and cache.num_free_blocks == 12 and cache.num_used_blocks == 0


def test_layers_do_no_bookkeeping(checkpoint):
    """Blocks, slots and tables come from begin_step, once per step: the forward pass itself
    must not ask the block manager anything (once per layer would be num_layers times)."""
    args, model, _ = checkpoint
    cache = PagedKVCache(model, num_blocks=8, block_size=4)
    calls = []

    class Spy:
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            calls.append(name)
            return getattr(self._inner, name)

        def __contains__(self, item):
            calls.append("__contains__")
            return item in self._inner

    for rows in ([PROMPT], [[5]], [[6]]):
        cache.begin_step(["s"], [len(rows[0])])
        real, cache.manager = cache.manager, Spy(cache.manager)
        try:
            mx.eval(model(mx.array(rows, dtype=mx.int32), cache.layers()))
        finally:
            cache.manager = real
        assert calls == [], f"the forward pass called the block manager: {calls}"


def test_memory_report(checkpoint):
    args, model, _ = checkpoint
    cache = PagedKVCache(model, num_blocks=10, block_size=8, dtype=mx.float16)
    per_block = 2 * args.num_hidden_layers * 8 * args.num_key_value_heads * args.head_dim * 2
    assert cache.bytes_per_block == per_block and cache.nbytes == 10 * per_block
    run(model, cache, ["a"], [PROMPT])
    usage = cache.usage()
    assert (usage.used_blocks, usage.stored_tokens, usage.allocated_slots) == (2, 9, 16)


# --- Batches -----------------------------------------------------------------------------------
def test_batch_of_three_equals_each_alone(checkpoint):
    """Three prompts of 9, 3 and 6 tokens prefilled in one [3, 9] call, then decoded as one
    [3, 1] batch: every sequence gets mlx-lm's logits and tokens for it alone."""
    args, model, oracle = checkpoint
    steps = 10
    expected = [oracle_tokens(oracle, p, steps) for p in PROMPTS]
    cache = PagedKVCache(model, num_blocks=24, block_size=4)
    ids = ["a", "b", "c"]
    logits = run(model, cache, ids, PROMPTS)
    assert isinstance(cache.layers()[0].offset, mx.array), "a batch has one offset per sequence"
    alone = [oracle_logits(oracle, [p]) for p in PROMPTS]
    for b in range(3):
        assert_allclose(logits[b], alone[b][0], atol=LOGIT_ATOL, what=f"prefill logits, row {b}")
    out = [[] for _ in ids]
    for _ in range(steps):
        tokens = [int(mx.argmax(x).item()) for x in logits]
        for b, t in enumerate(tokens):
            out[b].append(t)
        logits = run(model, cache, ids, [[t] for t in tokens])
    assert out == expected, "a batched sequence must generate what it generates alone"
    for b, p in enumerate(PROMPTS):
        check_table(cache, ids[b], len(p) + steps)
    tables = [cache.block_table(s) for s in ids]
    assert len({x for t in tables for x in t}) == sum(map(len, tables)), "tables overlap"


def test_mixed_step_prefill_joins_running_decodes(checkpoint):
    """A new prompt is prefilled in the same forward pass as another sequence's decode step."""
    args, model, oracle = checkpoint
    a, c = PROMPTS[0], PROMPTS[2]
    exp_a = oracle_logits(oracle, [a, [17], [4]])
    exp_c = oracle_logits(oracle, [c, [9]])
    cache = PagedKVCache(model, num_blocks=16, block_size=4)
    (la,) = run(model, cache, ["a"], [a])
    assert_allclose(la, exp_a[0], atol=LOGIT_ATOL, what="a alone")
    la, lc = run(model, cache, ["a", "c"], [[17], c])  # a decodes, c prefills
    assert_allclose(la, exp_a[1], atol=LOGIT_ATOL, what="a's decode next to c's prefill")
    assert_allclose(lc, exp_c[0], atol=LOGIT_ATOL, what="c's prefill next to a's decode")
    lc, la = run(model, cache, ["c", "a"], [[9], [4]])  # rows in another order
    assert_allclose(la, exp_a[2], atol=LOGIT_ATOL, what="a, second row")
    assert_allclose(lc, exp_c[1], atol=LOGIT_ATOL, what="c, first row")


def test_forked_sequences_copy_their_shared_last_block(checkpoint):
    """Fork a 6-token sequence (its last block half full), then decode the two differently:
    each sees only its own continuation (copy-on-write of the shared block in every layer)."""
    args, model, oracle = checkpoint
    cache = PagedKVCache(model, num_blocks=10, block_size=4)
    run(model, cache, ["p"], [PROMPT[:6]])
    cache.manager.fork("p", "q")
    lp, lq = run(model, cache, ["p", "q"], [[11], [22]])
    exp_p, exp_q = (
        oracle_logits(oracle, [PROMPT[:6], [11]]),
        oracle_logits(oracle, [PROMPT[:6], [22]]),
    )
    assert_allclose(lp, exp_p[1], atol=LOGIT_ATOL, what="parent after the fork")
    assert_allclose(lq, exp_q[1], atol=LOGIT_ATOL, what="child after the fork")
    tp, tq = cache.block_table("p"), cache.block_table("q")
    assert tp[0] == tq[0] and tp[1] != tq[1], f"full block shared, partial one copied: {tp} {tq}"


# --- Out of blocks and misuse --------------------------------------------------------------------
def snapshot(cache, ids):
    return (
        cache.num_free_blocks,
        {s: (cache.seq_len(s), cache.block_table(s)) for s in ids if s in cache},
        [s in cache for s in ids],
    )


def test_out_of_blocks_leaves_the_cache_unchanged(checkpoint):
    args, model, oracle = checkpoint
    cache = PagedKVCache(model, num_blocks=4, block_size=4)
    run(model, cache, ["a"], [PROMPT[:7]])  # 2 blocks, 1 slot left in the second
    run(model, cache, ["b"], [[1, 2, 3, 4, 5]])  # 2 blocks: the pool is full
    (la,) = run(model, cache, ["a"], [[12]])  # fills a's last slot, no new block
    before = snapshot(cache, ["a", "b", "c"])
    assert not cache.can_begin_step(["a"], [1])
    with pytest.raises(OutOfBlocksError):
        cache.begin_step(["a"], [1])
    with pytest.raises(OutOfBlocksError):
        cache.begin_step(["c"], [2])  # a new sequence
    with pytest.raises(OutOfBlocksError):  # the whole batch fails, a's 0-block share included
        cache.begin_step(["b", "c"], [1, 1])
    assert snapshot(cache, ["a", "b", "c"]) == before, "a failed step changed the cache"
    cache.free("b")
    (la,) = run(model, cache, ["a"], [[250]])  # a's stored keys and values survived
    expected = oracle_logits(oracle, [PROMPT[:7], [12], [250]])[2]
    assert_allclose(la, expected, atol=LOGIT_ATOL, what="logits after the refused steps")


def test_misuse_raises(checkpoint):
    args, model, _ = checkpoint
    cache = PagedKVCache(model, num_blocks=8, block_size=4)
    tokens = mx.array([PROMPT[:3]], dtype=mx.int32)
    with pytest.raises(RuntimeError):
        model(tokens, cache.layers())  # no begin_step
    cache.begin_step(["s"], [3])
    model(tokens, cache.layers())
    with pytest.raises(RuntimeError):
        model(tokens, cache.layers())  # a second pass on the same step
    cache.begin_step(["s"], [2])
    with pytest.raises(ValueError):
        model(tokens, cache.layers())  # 3 tokens for a step of 2
    for ids, counts in ((["s"], [0]), (["s", "s"], [1, 1]), (["s", "t"], [1]), (["s"], [1.0])):
        with pytest.raises(ValueError):
            cache.begin_step(ids, counts)
    with pytest.raises(ValueError):
        cache.begin_step(["t"], [args.max_position_embeddings + 1])
    with pytest.raises(TypeError):
        PagedKVCache(object(), num_blocks=4)
    with pytest.raises(ValueError):
        PagedKVCache(model, num_blocks=0)
