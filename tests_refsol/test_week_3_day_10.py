"""Week 3 optional Day 10: evicting whole blocks (src/tiny_llm/kv_eviction.py).

Oracles: NumPy (which blocks a policy drops, attention weights in float64), mlx-lm's own
`RotatingKVCache` (sinks + a window, block size 1), and mlx-lm's model over the *whole* sequence
with a mask that hides exactly the tokens the policy evicted, computed here step by step: with
the right RoPE positions, attending over the kept keys of a shrunken cache is the same as
attending over all keys with the evicted ones masked out. For H2O the test recomputes every
attention weight from mlx-lm's queries and keys in float64, sums them per token and picks the
victims itself. Blocks freed are checked through the pool's public free-block count.
"""

from __future__ import annotations

import importlib
import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache, RotatingKVCache

from tiny_llm_common.checkpoints import random_checkpoint
from tiny_llm_common.grading import assert_allclose, solution_name
from tiny_llm_common.models.mlx_lm_oracle import build_mlx_lm_model

ev = importlib.import_module(f"{solution_name()}.kv_eviction")
sol_model = importlib.import_module(f"{solution_name()}.model")
bm = importlib.import_module(f"{solution_name()}.block_manager")

LOGIT_ATOL = 2e-4  # float32 logits of tiny random models, as on Week 3 Day 3
SCORE_ATOL = 1e-3  # accumulated attention: sums of up to a few hundred float32 weights
PROMPT = [3, 141, 59, 26, 5, 200, 17, 8, 99, 12, 250, 7, 33]
CHECKPOINTS = {"llama": ("llama", 4), "qwen2": ("qwen2", 5)}


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def checkpoint(request):
    family, seed = CHECKPOINTS[request.param]
    args, weights = random_checkpoint(family, seed=seed)
    return args, sol_model.Model(args, weights), build_mlx_lm_model(args, weights)


# --- Task 1: which blocks go --------------------------------------------------------------------
def np_window(n_blocks, k, sinks, recent):
    return list(range(sinks, n_blocks - recent))[:k]


def np_h2o(scores, k, sinks, recent):
    cand = np.arange(sinks, len(scores) - recent)
    order = np.lexsort((cand, np.asarray(scores)[cand]))  # by score, then older first
    return sorted(cand[order[:k]].tolist())


@pytest.mark.parametrize("n_blocks,k,sinks,recent", [(8, 1, 1, 1), (8, 3, 0, 2), (10, 5, 2, 3)])
def test_sink_window_victims_are_the_oldest_unprotected(n_blocks, k, sinks, recent):
    assert ev.sink_window_victims(n_blocks, k, sinks, recent) == np_window(
        n_blocks, k, sinks, recent
    )
    assert ev.sink_window_victims(n_blocks, 0, sinks, recent) == []


def test_h2o_victims_are_the_least_attended_unprotected():
    rng = np.random.default_rng(0)
    for trial in range(50):
        n = int(rng.integers(3, 16))
        sinks, recent = int(rng.integers(0, 2)), int(rng.integers(1, 3))
        if n - sinks - recent < 1:
            continue
        k = int(rng.integers(1, n - sinks - recent + 1))
        scores = rng.integers(0, 4, n).astype(float)  # many ties: the older block goes first
        got = ev.h2o_victims(scores, k, sinks, recent)
        assert got == np_h2o(scores, k, sinks, recent), f"trial {trial}: scores {scores}"


def test_victim_functions_reject_impossible_requests():
    with pytest.raises(ValueError, match="protected"):
        ev.sink_window_victims(4, 3, 1, 1)  # only blocks 1 and 2 may go
    with pytest.raises(ValueError, match="protected"):
        ev.h2o_victims([1.0, 2.0, 3.0], 2, 1, 1)
    with pytest.raises(ValueError):
        ev.h2o_victims(np.ones((2, 3)), 1, 0, 1)


# --- Task 2: attention weights ------------------------------------------------------------------
def np_weights(q, k, scale, mask=None):
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    group = q.shape[1] // k.shape[1]
    k = np.repeat(k, group, axis=1)
    s = q @ k.swapaxes(-1, -2) * scale
    if mask is not None:
        s = s + np.asarray(mask, np.float64)
    s = s - s.max(axis=-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("h_q,h_kv", [(4, 4), (6, 2), (5, 1)])
def test_attention_weights_match_numpy(h_q, h_kv):
    rng = np.random.default_rng(h_q * 10 + h_kv)
    q = rng.standard_normal((2, h_q, 3, 8)).astype(np.float32)
    k = rng.standard_normal((2, h_kv, 7, 8)).astype(np.float32)
    visible = np.stack([np.tril(np.ones((3, 7), bool), k=4)] * 2)  # [2, 3, 7]
    visible[1, :, 5:] = False  # row 1 holds only 5 keys
    mask = np.where(visible, 0.0, -np.inf)[:, None].astype(np.float32)  # [2, 1, 3, 7]
    # lazy inputs: the computation must not rely on them being evaluated
    got = ev.attention_weights(mx.array(q) * 1.0, mx.array(k) + 0.0, 0.35, mx.array(mask))
    assert_allclose(got, np_weights(q, k, 0.35, mask), atol=1e-6, what="attention weights")
    got = ev.attention_weights(mx.array(q), mx.array(k), 0.35)
    assert_allclose(got, np_weights(q, k, 0.35), atol=1e-6, what="unmasked weights")


# --- Task 3: dropping blocks from a table --------------------------------------------------------
def test_evict_frees_blocks_and_compacts_the_table():
    mgr = ev.EvictingBlockManager(8, 4)
    table = mgr.allocate("a", 14)  # 3 full blocks and a partial one
    free = mgr.num_free_blocks
    freed = mgr.evict("a", [0, 2])
    assert sorted(freed) == sorted([table[0], table[2]])
    assert mgr.num_free_blocks == free + 2
    assert mgr.block_table("a") == [table[1], table[3]]
    assert mgr.seq_len("a") == 6
    # the stored tokens are found where the compacted table says
    assert mgr.slot_mapping("a", [0, 5]) == [table[1] * 4, table[3] * 4 + 1]
    assert mgr.can_allocate(4 * mgr.num_free_blocks)  # the freed blocks are usable at once
    with pytest.raises(ValueError):
        mgr.evict("a", [1])  # the partial last block holds tokens past the full ones
    with pytest.raises(ValueError):
        mgr.evict("a", [0, 0])
    with pytest.raises(ValueError):
        mgr.evict("zzz", [0])


def test_evict_keeps_blocks_another_sequence_holds():
    mgr = ev.EvictingBlockManager(8, 4)
    parent = mgr.allocate("p", 9)
    mgr.fork("p", "c")
    free = mgr.num_free_blocks
    assert mgr.evict("c", [0]) == []  # "p" still holds it
    assert mgr.num_free_blocks == free
    assert mgr.block_table("p") == parent and mgr.seq_len("p") == 9
    assert mgr.evict("p", [0]) == [parent[0]]
    assert mgr.num_free_blocks == free + 1


# --- The cache: oracles built on mlx-lm ------------------------------------------------------------
class MaskedKVCache(KVCache):
    """mlx-lm's KVCache, keeping every key, but showing each query only `visible` positions."""

    visible: np.ndarray | None = None  # [L, offset + L] bool, set before each call

    def make_mask(self, N, return_array=False, window_size=None):
        assert self.visible is not None and self.visible.shape[0] == N, "set visible first"
        return mx.array(self.visible)


class Recorder:
    """Wraps mlx-lm's attention and sums every query's float64 softmax weights per key
    position (over heads and queries; one sequence, so every query is real)."""

    def __init__(self, module):
        self.original = module.scaled_dot_product_attention
        self.per_position = None

    def __call__(self, queries, keys, values, cache, scale, mask, **kw):
        additive = None if mask is None else np.where(np.array(mask), 0.0, -np.inf)
        w = np_weights(np.array(queries), np.array(keys), scale, additive)
        per = w.sum(axis=(0, 1, 2))
        self.per_position = per if self.per_position is None else self.per_position + per
        return self.original(queries, keys, values, cache=cache, scale=scale, mask=mask, **kw)


def oracle_run(oracle, caches, tokens, kept_before, start):
    """One step of `tokens` at positions start.. through mlx-lm with only `kept_before` (and the
    step's own earlier tokens) visible."""
    n = len(tokens)
    visible = np.zeros((n, start + n), bool)
    visible[:, kept_before] = True
    for i in range(n):
        visible[i, start : start + i + 1] = True
    for c in caches:
        c.visible = visible
    return oracle(mx.array([tokens], dtype=mx.int32), cache=caches)[0, -1]


def steps_of(prompt, chunk, decode_tokens):
    out = [prompt[i : i + chunk] for i in range(0, len(prompt), chunk)]
    return out + [[t] for t in decode_tokens]


DECODE = [(37 * i + 11) % 256 for i in range(40)]


def test_window_matches_mlx_lm_rotating_cache(checkpoint):
    """Block size 1, 4 sinks, 16 tokens: what mlx-lm's RotatingKVCache(16, keep=4) keeps."""
    args, model, oracle = checkpoint
    cache = ev.EvictingPagedKVCache(
        model, 40, 1, max_tokens=16, policy="window", sink_tokens=4, recent_tokens=1
    )
    rotating = [RotatingKVCache(16, keep=4) for _ in range(args.num_hidden_layers)]
    for step, tokens in enumerate([PROMPT] + [[t] for t in DECODE]):
        cache.begin_step(["s"], [len(tokens)])
        got = model(mx.array([tokens], dtype=mx.int32), cache.layers())[0, -1]
        want = oracle(mx.array([tokens], dtype=mx.int32), cache=rotating)[0, -1]
        assert_allclose(got, want, atol=LOGIT_ATOL, what=f"logits, step {step}")
    seen = len(PROMPT) + len(DECODE)
    assert cache.tokens_seen("s") == seen
    assert cache.kept_positions("s") == [0, 1, 2, 3] + list(range(seen - 12, seen))
    assert cache.num_free_blocks == 40 - 16, "evicted blocks must go back to the pool"


@pytest.mark.parametrize("chunk", [4, 7])
def test_window_blocks_against_masked_mlx_lm(checkpoint, chunk):
    """Block size 4, one sink block, budget 24: the test simulates the policy itself."""
    args, model, oracle = checkpoint
    bs, budget = 4, 24
    cache = ev.EvictingPagedKVCache(model, 12, bs, max_tokens=budget, policy="window")
    caches = [MaskedKVCache() for _ in range(args.num_hidden_layers)]
    kept, pos = [], 0
    for step, tokens in enumerate(steps_of(PROMPT, chunk, DECODE[:30])):
        n = len(tokens)
        if len(kept) + n > budget:  # drop the oldest full blocks after the sink block
            k = math.ceil((len(kept) + n - budget) / bs)
            kept = kept[:bs] + kept[bs + k * bs :]
        cache.begin_step(["s"], [n])
        got = model(mx.array([tokens], dtype=mx.int32), cache.layers())[0, -1]
        want = oracle_run(oracle, caches, tokens, kept, pos)
        assert_allclose(got, want, atol=LOGIT_ATOL, what=f"logits, step {step}")
        kept += list(range(pos, pos + n))
        pos += n
        assert cache.kept_positions("s") == kept, f"step {step}"
        assert cache.seq_len("s") == len(kept) <= budget
        assert cache.num_free_blocks == 12 - math.ceil(len(kept) / bs)
    cache.free("s")
    assert cache.num_free_blocks == 12


def test_h2o_evicts_the_least_attended_blocks(checkpoint, monkeypatch):
    """Budget 24 = 1 sink block + 3 recent blocks + 2 chosen by attention, block size 4."""
    from mlx_lm.models import llama, qwen2

    args, model, oracle = checkpoint
    module = {"llama": llama, "qwen2": qwen2}[args.model_type]
    recorder = Recorder(module)
    monkeypatch.setattr(module, "scaled_dot_product_attention", recorder)
    bs, budget, sinks, recent = 4, 24, 1, 3
    cache = ev.EvictingPagedKVCache(
        model, 10, bs, max_tokens=budget, policy="h2o", sink_tokens=4, recent_tokens=12
    )
    caches = [MaskedKVCache() for _ in range(args.num_hidden_layers)]
    kept, pos, scores = [], 0, {}  # scores: real position -> attention gathered
    evictions = 0
    for step, tokens in enumerate(steps_of(PROMPT, 4, DECODE)):
        n = len(tokens)
        if len(kept) + n > budget:
            k = math.ceil((len(kept) + n - budget) / bs)
            blocks = [sum(scores[p] for p in kept[j : j + bs]) for j in range(0, len(kept), bs)]
            victims = np_h2o(blocks, k, sinks, recent)
            cand = sorted(blocks[sinks : len(blocks) - recent])
            if k < len(cand):
                assert cand[k] - cand[k - 1] > 1e-2, "the oracle nearly ties: pick another seed"
            kept = [p for t, p in enumerate(kept) if t // bs not in victims]
            evictions += k
        cache.begin_step(["s"], [n])
        got = model(mx.array([tokens], dtype=mx.int32), cache.layers())[0, -1]
        recorder.per_position = None
        want = oracle_run(oracle, caches, tokens, kept, pos)
        assert_allclose(got, want, atol=LOGIT_ATOL, what=f"logits, step {step}")
        kept += list(range(pos, pos + n))
        pos += n
        for p in kept:
            scores[p] = scores.get(p, 0.0) + recorder.per_position[p]
        assert cache.kept_positions("s") == kept, f"step {step}: kept different tokens"
        assert_allclose(
            cache.token_scores("s"),
            np.array([scores[p] for p in kept]),
            atol=SCORE_ATOL,
            what=f"accumulated attention, step {step}",
        )
        assert cache.num_free_blocks == 10 - math.ceil(len(kept) / bs)
    assert evictions > 5, "the test should evict"
    assert kept[:4] == [0, 1, 2, 3], "the sink block must stay"


def test_h2o_scores_count_only_real_queries(checkpoint):
    """Batched steps with padding: every real query spreads 1 per head per layer."""
    args, model, _ = checkpoint
    cache = ev.EvictingPagedKVCache(model, 30, 4, max_tokens=64, policy="h2o")
    rows = {"a": PROMPT, "b": PROMPT[:5], "c": PROMPT[:2]}  # step 0: padded prompts
    queries = dict.fromkeys(rows, 0)
    for step in range(4):
        toks = [p if step == 0 else [step * 10 + i] for i, p in enumerate(rows.values())]
        cache.begin_step(list(rows), [len(t) for t in toks])
        width = max(map(len, toks))
        batch = mx.array([t + [0] * (width - len(t)) for t in toks], dtype=mx.int32)
        mx.eval(model(batch, cache.layers()))
        for s, t in zip(rows, toks, strict=True):
            queries[s] += len(t)
    per_query = args.num_hidden_layers * args.num_attention_heads
    for s in rows:
        total = float(cache.token_scores(s).sum())
        assert abs(total - queries[s] * per_query) < 1e-3 * queries[s] * per_query, (
            f"{s}: {total} != {queries[s]} queries x {per_query} (padding must not count)"
        )


def test_rope_positions_keep_counting_after_eviction(checkpoint):
    """A batch of two sequences, one evicting: offsets are tokens seen, not tokens stored."""
    args, model, _ = checkpoint
    cache = ev.EvictingPagedKVCache(model, 20, 4, max_tokens=16, policy="window")
    cache.begin_step(["a"], [8])
    cache.begin_step(["a", "b"], [8, 3])
    step = cache.begin_step(["a", "b"], [1, 1])
    assert cache.seq_len("a") == 13 and cache.tokens_seen("a") == 17
    assert np.array(step.offset).tolist() == [16, 3]
    assert cache.layers()[0].offset is step.offset


def test_bad_budgets_and_steps_are_clear_errors(checkpoint):
    args, model, _ = checkpoint
    with pytest.raises(ValueError):
        ev.EvictingPagedKVCache(model, 10, 4, max_tokens=18)  # not whole blocks
    with pytest.raises(ValueError):
        ev.EvictingPagedKVCache(model, 10, 4, max_tokens=8, recent_tokens=4)  # no room left
    with pytest.raises(ValueError):
        ev.EvictingPagedKVCache(model, 10, 4, max_tokens=16, policy="lru")
    cache = ev.EvictingPagedKVCache(model, 10, 4, max_tokens=16, policy="window")
    assert cache.max_step_tokens == 8
    with pytest.raises(ValueError, match="chunk"):
        cache.begin_step(["s"], [17])
    cache.begin_step(["s"], [16])  # a new sequence may fill its budget
    with pytest.raises(ValueError, match="chunk"):
        cache.begin_step(["s"], [9])  # 1 sink + 1 recent block stay: 8 tokens fit
    cache.begin_step(["s"], [8])
    with pytest.raises(RuntimeError):
        cache.token_scores("s")  # window does not score
    with pytest.raises(bm.OutOfBlocksError):
        full = ev.EvictingPagedKVCache(model, 2, 4, max_tokens=16, policy="window")
        full.begin_step(["s"], [8])
        full.begin_step(["t"], [1])
