"""Week 3 Day 7: preemption under memory pressure (src/tiny_llm/scheduler.py).

Random workloads run through a pool so small that sequences are preempted often (each test
asserts that they were, so the pressure is real), and then through a pool that never runs
short. Oracles: the unpressured run, and mlx-lm decoding each request ALONE (greedy), or, for
seeded sampling, drawing from mlx-lm's logits with `sample_rows`'s documented key scheme
(sample i of a request with seed s draws token t with key (s + i) * 1_000_003 + t, by the
Gumbel-max trick). Every output must be exactly the same, and afterwards the pool must be
entirely free: no block used, no reference count left.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from tiny_llm_common.checkpoints import random_checkpoint
from tiny_llm_common.grading import solution_name
from tiny_llm_common.models.mlx_lm_oracle import build_mlx_lm_model
from tiny_llm_common.models.mlx_lm_oracle import greedy_tokens as solo
from tiny_llm_common.models.mlx_lm_oracle import seeded_samples as oracle_samples

sol_model = importlib.import_module(f"{solution_name()}.model")
engine_mod = importlib.import_module(f"{solution_name()}.engine")
seq_mod = importlib.import_module(f"{solution_name()}.sequence")
LLMEngine, SamplingParams = engine_mod.LLMEngine, seq_mod.SamplingParams

CHECKPOINTS = {"llama": ("llama", 4), "qwen2": ("qwen2", 5)}
BS = 4


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def checkpoint(request):
    family, seed = CHECKPOINTS[request.param]
    args, weights = random_checkpoint(family, seed=seed)
    return args, sol_model.Model(args, weights), build_mlx_lm_model(args, weights)


@pytest.fixture(scope="module")
def llama():
    args, weights = random_checkpoint("llama", seed=4)
    return args, sol_model.Model(args, weights), build_mlx_lm_model(args, weights)


def workload(seed, count, longest_prompt, longest_output, prefix=()):
    rng = np.random.default_rng(seed)
    prompts = [list(prefix) + [int(t) for t in rng.integers(0, 256, int(rng.integers(1, longest_prompt + 1)))]
               for _ in range(count)]  # fmt: skip
    return prompts, [int(rng.integers(1, longest_output + 1)) for _ in prompts]


def run(model, prompts, params, num_blocks, **kw):
    engine = LLMEngine(model, None, num_blocks=num_blocks, block_size=BS, **kw)
    outs = engine.generate(prompts, params)
    return engine, [[o.tokens for o in out.outputs] for out in outs]


def assert_pool_empty(engine):
    cache = engine.cache
    assert not engine.has_unfinished()
    assert cache.num_used_blocks == 0 and cache.num_free_blocks == cache.num_blocks, (
        f"{cache.num_used_blocks} blocks leaked"
    )
    held = [b for b in range(cache.num_blocks) if cache.manager.ref_count(b)]
    assert not held, f"blocks {held} still have a reference count"


# -- Greedy workloads ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [16, 21])  # workloads whose oracle never nearly ties
def test_random_workload_under_pressure_equals_the_unpressured_run(checkpoint, seed):
    """12 requests of up to 30 + 25 tokens through 14 blocks of 4 (56 tokens in all)."""
    args, model, oracle = checkpoint
    prompts, lens = workload(seed, 12, 30, 25)
    params = [SamplingParams(max_tokens=n) for n in lens]
    expected = [[solo(oracle, p, n)] for p, n in zip(prompts, lens, strict=True)]
    free_engine, free_run = run(model, prompts, params, num_blocks=256)
    engine, pressured = run(model, prompts, params, num_blocks=14, max_num_seqs=8)
    assert free_engine.stats.preemptions == 0
    assert engine.stats.preemptions > 0, "the pool was meant to be too small: no preemption"
    for i, want in enumerate(expected):
        assert free_run[i] == want, f"request {i}, unpressured"
        assert pressured[i] == want, f"request {i}: preempted and resumed, it must not change"
    assert engine.stats.computed_tokens > free_engine.stats.computed_tokens, (
        "a preempted sequence is recomputed"
    )
    assert max(s.used_blocks for s in engine.stats.steps) <= 14
    assert_pool_empty(engine)
    assert_pool_empty(free_engine)


def test_the_most_recently_admitted_sequence_is_preempted(llama):
    """Whenever a step preempts k sequences, they are the last k running before it; they hold
    no block, have nothing cached, and wait at the front of the queue in their old order."""
    args, model, oracle = llama
    prompts, lens = workload(2, 10, 20, 25)
    engine = LLMEngine(model, None, num_blocks=14, block_size=BS)
    ids = [
        engine.add_request(p, SamplingParams(max_tokens=n))
        for p, n in zip(prompts, lens, strict=True)
    ]
    sched, results, seen = engine.scheduler, {}, 0
    while engine.has_unfinished():
        before = [s.seq_id for s in sched.running]
        preempted = engine.stats.preemptions
        results.update((r.request_id, r) for r in engine.step())
        k = engine.stats.preemptions - preempted
        if k:
            seen += k
            front = list(sched.waiting)[:k]
            assert [s.seq_id for s in front] == before[-k:], "not the most recent ones"
            for s in front:
                assert s.seq_id not in engine.cache and s.num_cached == 0
                assert s.output, "a preempted sequence keeps what it generated"
    assert seen > 0, "the pool was meant to be too small: no preemption"
    for rid, p, n in zip(ids, prompts, lens, strict=True):
        assert results[rid].outputs[0].tokens == solo(oracle, p, n)
    assert_pool_empty(engine)


def test_a_request_that_needs_the_whole_pool(llama):
    """One request grows to all 8 blocks while others come and go: everyone else is preempted
    or waits, and it still finishes with its solo tokens."""
    args, model, oracle = llama
    big = [int(t) for t in np.random.default_rng(4).integers(0, 256, 20)]
    prompts = [[5, 6, 7], big, [9, 10, 11, 12, 13], [14, 15]]
    lens = [10, 11, 10, 10]  # 20 + 11 = 31 tokens: 8 blocks with its last token
    engine, got = run(model, prompts, [SamplingParams(max_tokens=n) for n in lens], num_blocks=8)
    assert engine.stats.preemptions > 0
    for i, (p, n) in enumerate(zip(prompts, lens, strict=True)):
        assert got[i] == [solo(oracle, p, n)], f"request {i}"
    assert_pool_empty(engine)


# -- With prefix caching, and with parallel sampling ----------------------------------------------
SYSTEM = [17, 3, 200, 41, 41, 9, 150, 8, 77, 5, 5, 120, 64]  # 13 tokens: 3 full blocks


def test_prefix_caching_under_pressure(llama):
    args, model, oracle = llama
    prompts, lens = workload(3, 10, 14, 20, prefix=SYSTEM)
    params = [SamplingParams(max_tokens=n) for n in lens]
    engine, got = run(model, prompts, params, num_blocks=16, enable_prefix_caching=True)
    assert engine.stats.preemptions > 0, "the pool was meant to be too small: no preemption"
    assert engine.stats.cached_prompt_tokens > 0, "no prefix was reused"
    for i, (p, n) in enumerate(zip(prompts, lens, strict=True)):
        assert got[i] == [solo(oracle, p, n)], f"request {i}"
    assert_pool_empty(engine)


def test_parallel_sampling_under_pressure(llama):
    """4 requests of n=3 seeded samples: preempted forks are recomputed alone, and still draw
    exactly the oracle's tokens (and the unpressured run's)."""
    args, model, oracle = llama
    prompts, lens = workload(5, 4, 12, 12)
    params = [SamplingParams(max_tokens=n, temperature=0.9, n=3, seed=100 * i)
              for i, n in enumerate(lens)]  # fmt: skip
    free_engine, free_run = run(model, prompts, params, num_blocks=128)
    engine, pressured = run(model, prompts, params, num_blocks=12)
    assert engine.stats.preemptions > 0, "the pool was meant to be too small: no preemption"
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        want = oracle_samples(oracle, p, sp)
        assert free_run[i] == want, f"request {i}, unpressured"
        assert pressured[i] == want, f"request {i}, under pressure"
    assert_pool_empty(engine)
    assert_pool_empty(free_engine)
