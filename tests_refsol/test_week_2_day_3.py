"""Week 2 Day 3: the KV cache's size, GQA's saving and the waste of max-length reservations.

Oracles: the closed form written out here with published shapes (Llama-2-7B's config: 32 layers,
32 heads, head_dim 128, float16, so 0.5 MiB per token); the bytes the Day 1 cache actually
holds after running a model; and a NumPy count of the slots a workload leaves empty.
"""

import importlib

import mlx.core as mx
import numpy as np
import pytest

from tiny_llm_common.checkpoints import random_checkpoint
from tiny_llm_common.grading import solution
from tiny_llm_common.weights import ModelArgs
from tiny_llm_common.workload import make_workload

sol = solution()
for _module in ("kv_memory", "kv_cache", "model"):
    importlib.import_module(f"{sol.__name__}.{_module}")
km = sol.kv_memory

# Hard-coded from the models' config.json (the oracle's facts, not computed by the course).
LLAMA2_7B = ModelArgs("llama", 4096, 32, 11008, 32, 32, 32000)  # multi-head: 32 KV heads
QWEN2_05B = ModelArgs("qwen2", 896, 24, 4864, 14, 2, 151936)  # head_dim 64
QWEN3_06B = ModelArgs("qwen3", 1024, 28, 3072, 16, 8, 151936, head_dim=128)


# --- Task 1: kv_bytes_per_token -----------------------------------------------------------------


def test_llama2_7b_is_half_a_mebibyte_per_token():
    assert km.kv_bytes_per_token(LLAMA2_7B, mx.float16) == 524_288 == 2**19
    assert km.kv_bytes_per_token(LLAMA2_7B, "float16") == 524_288
    # A 4096-token context: 2 GiB for one request.
    assert km.kv_bytes(LLAMA2_7B, 4096, mx.float16) == 2 * 2**30


@pytest.mark.parametrize(
    "args,expected",  # 2 x layers x kv_heads x head_dim x 2 bytes
    [(QWEN2_05B, 2 * 24 * 2 * 64 * 2), (QWEN3_06B, 2 * 28 * 8 * 128 * 2)],
    ids=["qwen2-0.5b", "qwen3-0.6b"],
)
def test_gqa_models_count_kv_heads(args, expected):
    assert km.kv_bytes_per_token(args, mx.bfloat16) == expected
    assert km.kv_bytes_per_token(args, mx.float32) == 2 * expected


def test_kv_bytes_checks_its_arguments():
    assert km.kv_bytes(QWEN2_05B, 0, mx.float16) == 0
    with pytest.raises(ValueError):
        km.kv_bytes(QWEN2_05B, -1, mx.float16)
    with pytest.raises(TypeError):
        km.kv_bytes_per_token(QWEN2_05B, "float17")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_formula_matches_the_real_cache(family):
    """Run a model with the Day 1 cache and weigh what it stores."""
    args, weights = random_checkpoint(family, seed=0)
    model = sol.model.Model(args, weights)
    cache = sol.kv_cache.make_cache(model, step=16)
    model(mx.array([list(range(21))], dtype=mx.int32), cache)
    model(mx.array([[5]], dtype=mx.int32), cache)  # 22 tokens
    stored = sum(k.nbytes + v.nbytes for k, v in (c.state for c in cache))
    assert stored == km.kv_bytes(args, 22, mx.float32)
    # The buffers hold whole steps: 22 tokens in steps of 16 is 32 slots.
    assert sum(c.nbytes for c in cache) == km.kv_bytes(args, 32, mx.float32)


def test_formula_matches_a_float16_cache():
    args = ModelArgs("llama", 64, 1, 128, 8, 2, 10, head_dim=16)
    cache = sol.kv_cache.KVCache(max_len=40)
    x = mx.zeros((1, 8, 7, 16), dtype=mx.float16)
    kv = mx.zeros((1, 2, 7, 16), dtype=mx.float16)
    cache.attend(x, kv, kv, 0.25)
    keys, values = cache.state
    assert keys.nbytes + values.nbytes == km.kv_bytes(args, 7, mx.float16)
    assert cache.nbytes == km.kv_bytes(args, 40, mx.float16), "max_len reserves 40 slots"


# --- Task 2: gqa_savings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,saved",
    [(LLAMA2_7B, 0.0), (QWEN2_05B, 1 - 2 / 14), (QWEN3_06B, 0.5)],
    ids=["mha", "qwen2-0.5b", "qwen3-0.6b"],
)
def test_gqa_savings(args, saved):
    assert km.gqa_savings(args) == pytest.approx(saved, abs=1e-12)


def test_gqa_savings_agrees_with_bytes():
    mha = ModelArgs("qwen2", 896, 24, 4864, 14, 14, 151936)  # the same shape, 14 KV heads
    ratio = km.kv_bytes_per_token(QWEN2_05B, "float16") / km.kv_bytes_per_token(mha, "float16")
    assert km.gqa_savings(QWEN2_05B) == pytest.approx(1 - ratio, abs=1e-12)


# --- Task 3: contiguous_waste -------------------------------------------------------------------


def test_contiguous_waste_small():
    assert km.contiguous_waste([1024], 4096) == pytest.approx(0.75)
    assert km.contiguous_waste([50, 80], 4096) == pytest.approx(1 - 130 / 8192)
    assert km.contiguous_waste([8, 8], 8) == 0.0


def test_contiguous_waste_on_the_workload():
    requests = make_workload(200, seed=0, max_len=2048)
    lengths = [r.total_len for r in requests]
    slots = np.full(len(lengths), 2048)
    expected = float((slots - np.array(lengths)).sum() / slots.sum())
    assert km.contiguous_waste(lengths, 2048) == pytest.approx(expected, abs=1e-12)
    assert km.contiguous_waste(np.array(lengths), 2048) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("lengths,max_len", [([], 8), ([9], 8), ([-1], 8), ([2.5], 8), ([1], 0)])
def test_contiguous_waste_rejects_bad_input(lengths, max_len):
    with pytest.raises(ValueError):
        km.contiguous_waste(lengths, max_len)
