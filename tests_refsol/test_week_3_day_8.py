"""Week 3 optional Day 8: MHA, GQA and MQA in a pool of fixed size (src/tiny_llm/kv_budget.py).

Oracles: byte counts written out here from the config (2 x layers x KV heads x head_dim x bytes
x block size), a real paged pool filled until it refuses a block, a NumPy count of the seeded
workload, the Week 3 kernel's launch rule (one threadgroup per KV head and slice of at most 8
query heads), and mlx-lm's model for converted checkpoints: repeated KV heads must give exactly
the original logits, mean-pooled ones the logits of weights pooled here in float64 NumPy.
"""

from __future__ import annotations

import dataclasses
import importlib
import math

import mlx.core as mx
import numpy as np
import pytest

from tiny_llm_common.checkpoints import random_checkpoint
from tiny_llm_common.grading import assert_allclose, solution_name
from tiny_llm_common.models.mlx_lm_oracle import build_mlx_lm_model
from tiny_llm_common.weights import ModelArgs
from tiny_llm_common.workload import make_workload

kb = importlib.import_module(f"{solution_name()}.kv_budget")
sol_model = importlib.import_module(f"{solution_name()}.model")
pkv = importlib.import_module(f"{solution_name()}.paged_kv_cache")
bm = importlib.import_module(f"{solution_name()}.block_manager")

# SmolLM2-135M's config.json: 30 layers, 9 query heads, 3 KV heads, head_dim 64.
SMOLLM2 = ModelArgs("llama", 576, 30, 1536, 9, 3, 49152, head_dim=64)
SIZES = {"float32": 4, "float16": 2, "bfloat16": 2}
LOGIT_ATOL = 2e-4
PROMPT = [[3, 141, 59, 26, 5, 200, 17, 8, 99, 12, 250, 7]]


def closed_form_block(layers, kv_heads, head_dim, size, block_size):
    return 2 * layers * kv_heads * head_dim * size * block_size


# --- Task 1 --------------------------------------------------------------------------------------
def test_with_kv_heads_gives_mha_gqa_and_mqa_of_the_same_shape():
    for n in (9, 3, 1):
        v = kb.with_kv_heads(SMOLLM2, n)
        assert v.num_key_value_heads == n
        assert dataclasses.replace(v, num_key_value_heads=3) == SMOLLM2, "only the KV heads change"
    assert SMOLLM2.num_key_value_heads == 3, "the input must not be modified"
    for bad in (2, 4, 10, 0, -3):
        with pytest.raises(ValueError):
            kb.with_kv_heads(SMOLLM2, bad)
    with pytest.raises(TypeError):
        kb.with_kv_heads(SMOLLM2, 1.5)


# --- Task 2 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(SIZES))
@pytest.mark.parametrize("kv_heads", [9, 3, 1])
def test_block_bytes_and_tokens_in_pool_match_the_closed_form(kv_heads, dtype):
    args = kb.with_kv_heads(SMOLLM2, kv_heads)
    for bs in (1, 16, 128):
        want = closed_form_block(30, kv_heads, 64, SIZES[dtype], bs)
        assert kb.block_bytes(args, bs, dtype) == want
        pool = 256 * 2**20
        assert kb.max_tokens_in_pool(args, pool, bs, dtype) == pool // want * bs
    # a pool one byte short of a block holds nothing more
    one = closed_form_block(30, kv_heads, 64, SIZES[dtype], 16)
    assert kb.max_tokens_in_pool(args, 5 * one - 1, 16, dtype) == 4 * 16
    assert kb.max_tokens_in_pool(args, 0, 16, dtype) == 0
    with pytest.raises(ValueError):
        kb.block_bytes(args, 0, dtype)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_a_real_pool_holds_exactly_max_tokens_in_pool(kv_heads):
    """A random model's PagedKVCache, sized in bytes, filled until it refuses."""
    args, _ = random_checkpoint("llama", seed=0)
    args = kb.with_kv_heads(args, kv_heads)
    bs, pool_bytes = 4, 40_000
    tokens = kb.max_tokens_in_pool(args, pool_bytes, bs, mx.float16)
    per_block = kb.block_bytes(args, bs, mx.float16)
    cache = pkv.PagedKVCache(args, tokens // bs, bs, dtype=mx.float16)
    assert cache.bytes_per_block == per_block and cache.nbytes <= pool_bytes
    assert cache.nbytes + per_block > pool_bytes, "a whole block more would not fit"
    for i in range(tokens // 32):
        cache.begin_step([i], [32])
    left = tokens - 32 * (tokens // 32)
    if left:
        cache.begin_step(["rest"], [left])
    assert cache.num_free_blocks == 0
    with pytest.raises(bm.OutOfBlocksError):
        cache.begin_step(["one more"], [1])


# --- Task 3 --------------------------------------------------------------------------------------
def test_requests_in_pool_on_the_seeded_workload():
    lengths = [r.total_len for r in make_workload(500, seed=3)]
    for bs, blocks in ((16, 0), (16, 1000), (16, 3000), (128, 500), (1, 10**7)):
        per = np.ceil(np.array(lengths) / bs)
        want = int(np.searchsorted(np.cumsum(per), blocks, side="right"))
        assert kb.requests_in_pool(lengths, blocks, bs) == want, (bs, blocks)
    assert kb.requests_in_pool([], 10, 16) == 0
    assert kb.requests_in_pool(iter([16, 16, 1]), 2, 16) == 2  # any iterable
    with pytest.raises(ValueError):
        kb.requests_in_pool([5, 0], 10, 16)


# --- Task 4 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_heads,slices", [(9, 1), (3, 1), (1, 2)])
def test_decode_traffic_follows_the_kernel_launch(kv_heads, slices):
    """SmolLM2's 9 query heads: MHA groups of 1, GQA of 3, MQA of 9 (> 8: two slices)."""
    args = kb.with_kv_heads(SMOLLM2, kv_heads)
    ctx = 1000
    t = kb.decode_traffic(args, ctx, "float16")
    stored = ctx * closed_form_block(30, kv_heads, 64, 2, 1)
    assert t.threadgroups == 30 * kv_heads * slices
    assert t.query_heads_per_kv_head == 9 // kv_heads
    assert t.kv_bytes_stored == stored
    assert t.kv_bytes_read == stored * slices
    wide = kb.decode_traffic(args, ctx, "float16", max_heads=16)  # a kernel with room for 16
    assert wide.threadgroups == 30 * kv_heads and wide.kv_bytes_read == stored
    one = kb.decode_traffic(args, ctx, "float16", max_heads=1)  # one query head per group
    assert one.kv_bytes_read == stored * (9 // kv_heads)
    assert kb.decode_traffic(args, 0, "float16").kv_bytes_read == 0


# --- Task 5 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,quantize", [("llama", (32, 4)), ("qwen2", None)])
def test_repeating_kv_heads_changes_nothing_but_the_cache(family, quantize):
    args, weights = random_checkpoint(family, seed=1, quantize=quantize)
    oracle = build_mlx_lm_model(args, weights)  # the original checkpoint
    mha_args, mha = kb.regroup_kv_heads(args, weights, args.num_attention_heads)
    assert mha_args.num_key_value_heads == args.num_attention_heads == 4
    assert args.num_key_value_heads == 2, "the input args must not change"
    out = sol_model.Model(mha_args, mha)(mx.array(PROMPT, dtype=mx.int32))
    assert_allclose(out, oracle(mx.array(PROMPT, dtype=mx.int32)), atol=LOGIT_ATOL, what="MHA")
    cache = pkv.PagedKVCache(mha_args, 4, 4)
    assert cache.bytes_per_block == 2 * pkv.PagedKVCache(args, 4, 4).bytes_per_block


def np_pool_rows(w: np.ndarray, old: int, new: int, head_dim: int) -> np.ndarray:
    rest = w.shape[1:]
    return w.reshape(new, old // new, head_dim, *rest).mean(axis=1).reshape(new * head_dim, *rest)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_mean_pooled_kv_heads_match_numpy(family):
    args, weights = random_checkpoint(family, seed=2)
    mqa_args, mqa = kb.regroup_kv_heads(args, weights, 1)
    assert mqa_args.num_key_value_heads == 1
    expected = dict(weights)
    for name, w in weights.items():
        if ".k_proj." in name or ".v_proj." in name:
            pooled = np_pool_rows(np.array(w, dtype=np.float64), 2, 1, args.head_dim)
            assert_allclose(mqa[name], pooled, atol=1e-6, what=name)
            expected[name] = mx.array(pooled.astype(np.float32))
    oracle = build_mlx_lm_model(mqa_args, expected)
    out = sol_model.Model(mqa_args, mqa)(mx.array(PROMPT, dtype=mx.int32))
    assert_allclose(out, oracle(mx.array(PROMPT, dtype=mx.int32)), atol=LOGIT_ATOL, what="MQA")


def test_regroup_rejects_impossible_head_counts():
    args, weights = random_checkpoint("llama", seed=0, num_attention_heads=6, num_key_value_heads=2)
    with pytest.raises(ValueError):
        kb.regroup_kv_heads(args, weights, 3)  # 2 -> 3: neither a multiple nor a divisor
    with pytest.raises(ValueError):
        kb.regroup_kv_heads(args, weights, 4)  # does not divide 6 query heads
    new_args, _ = kb.regroup_kv_heads(args, weights, 6)
    assert math.gcd(new_args.num_key_value_heads, 6) == 6
