"""Week 3 Day 4: continuous batching (src/tiny_llm/scheduler.py, src/tiny_llm/engine.py).

Oracle: mlx-lm's own model and KVCache (`generate_step`, greedy) decoding each request ALONE.
Every request the engine serves, whatever else shares its batches, must produce exactly those
tokens. The seeds of the tiny random checkpoints and of the prompts are chosen so that the
oracle's two best tokens are never within 1e-3 of each other (the oracle checks it), far above
the ~1e-5 float32 difference between a batched paged forward pass and mlx-lm's.

Pools here are large enough that no sequence is ever preempted (that is Day 7). Blocks are
checked through the public API only: `cache.num_used_blocks`, `cache.manager.ref_count`.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest

from tiny_llm_common.checkpoints import random_checkpoint
from tiny_llm_common.grading import solution_name
from tiny_llm_common.models.mlx_lm_oracle import build_mlx_lm_model
from tiny_llm_common.models.mlx_lm_oracle import greedy_tokens as solo

sol_model = importlib.import_module(f"{solution_name()}.model")
engine_mod = importlib.import_module(f"{solution_name()}.engine")
seq_mod = importlib.import_module(f"{solution_name()}.sequence")
LLMEngine, SamplingParams = engine_mod.LLMEngine, seq_mod.SamplingParams

# Seeds whose greedy tokens vary and never nearly tie (as on Day 3).
CHECKPOINTS = {"llama": ("llama", 4), "qwen2": ("qwen2", 5)}
BS = 4  # small blocks: prompts and outputs cross many block boundaries


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def checkpoint(request):
    family, seed = CHECKPOINTS[request.param]
    args, weights = random_checkpoint(family, seed=seed)
    return args, sol_model.Model(args, weights), build_mlx_lm_model(args, weights)


@pytest.fixture(scope="module")
def llama():
    args, weights = random_checkpoint("llama", seed=4)
    return args, sol_model.Model(args, weights), build_mlx_lm_model(args, weights)


def random_prompts(vocab, count, seed, longest=30):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, vocab, int(rng.integers(1, longest + 1)))]
            for _ in range(count)]  # fmt: skip


def assert_pool_empty(engine):
    cache = engine.cache
    assert not engine.has_unfinished()
    assert cache.num_used_blocks == 0 and cache.num_free_blocks == cache.num_blocks, (
        f"{cache.num_used_blocks} blocks still used after every request finished"
    )
    held = [b for b in range(cache.num_blocks) if cache.manager.ref_count(b)]
    assert not held, f"blocks {held} still have a reference count"


class ToyTokenizer:
    """The part of a tokenizer the engine uses: EOS ids, encode and decode."""

    def __init__(self, eos_token_ids=()):
        self.eos_token_ids = list(eos_token_ids)

    def encode(self, text):
        return list(text.encode())  # bytes: ids < 256 = the tiny models' vocabulary

    def decode(self, tokens):
        return " ".join(f"<{t}>" for t in tokens)


class CountingModel:
    """Wraps the model to record the token array of every forward pass."""

    def __init__(self, model):
        self.model, self.args, self.shapes = model, model.args, []

    def __call__(self, tokens, cache=None):
        self.shapes.append(tuple(tokens.shape))
        return self.model(tokens, cache)


# -- Every request equals its solo decoding ------------------------------------------------------
def test_generate_equals_solo_decoding(checkpoint):
    """12 prompts of 1 to 30 tokens and 1 to 20 output tokens, at most 4 running at once: every
    output equals mlx-lm decoding that prompt alone, and the pool is empty afterwards."""
    args, model, oracle = checkpoint
    prompts = random_prompts(args.vocab_size, 12, seed=5)
    rng = np.random.default_rng(1005)
    lens = [int(rng.integers(1, 21)) for _ in prompts]
    expected = [solo(oracle, p, n) for p, n in zip(prompts, lens, strict=True)]
    engine = LLMEngine(model, None, num_blocks=128, block_size=BS, max_num_seqs=4)
    outs = engine.generate(prompts, [SamplingParams(max_tokens=n) for n in lens])
    assert len(outs) == len(prompts), "one RequestOutput per prompt"
    for i, (out, p, want) in enumerate(zip(outs, prompts, expected, strict=True)):
        assert out.prompt_tokens == p, f"request {i}: prompt_tokens"
        assert len(out.outputs) == 1 and out.outputs[0].index == 0
        got = out.outputs[0].tokens
        assert got == want, f"request {i} (prompt of {len(p)}): {got} != solo {want}"
        assert out.outputs[0].finish_reason == "length"
    assert len({o.request_id for o in outs}) == len(outs), "request ids must be distinct"
    assert max(s.running for s in engine.stats.steps) <= 4, "max_num_seqs=4 exceeded"
    assert engine.stats.generated_tokens == sum(lens)
    assert engine.stats.prompt_tokens == sum(map(len, prompts))
    assert engine.stats.preemptions == 0
    assert_pool_empty(engine)


def test_requests_added_between_steps_are_served(checkpoint):
    """Requests arrive while others are decoding; each finishes once, with its solo tokens."""
    args, model, oracle = checkpoint
    prompts = random_prompts(args.vocab_size, 7, seed=1, longest=20)
    lens = [9, 3, 12, 1, 7, 10, 5]
    expected = [solo(oracle, p, n) for p, n in zip(prompts, lens, strict=True)]
    engine = LLMEngine(model, None, num_blocks=96, block_size=BS)
    ids, results, step = {}, {}, 0
    arrivals = {0: [0, 1], 2: [2], 3: [3, 4], 6: [5], 9: [6]}  # step -> prompts that arrive
    while engine.has_unfinished() or step <= max(arrivals):
        for i in arrivals.get(step, []):
            ids[engine.add_request(prompts[i], SamplingParams(max_tokens=lens[i]))] = i
        for out in engine.step():
            assert out.request_id not in results, f"request {out.request_id} returned twice"
            results[out.request_id] = out
        step += 1
        assert step < 200, "the engine does not finish"
    assert sorted(results) == sorted(ids)
    for rid, i in ids.items():
        assert results[rid].outputs[0].tokens == expected[i], f"prompt {i} (arrived late)"
    assert_pool_empty(engine)


def test_one_forward_per_step_and_short_requests_retire_first(llama):
    """Three requests admitted together: one prefill pass, then one [running, 1] decode pass
    per step. A short request is returned the step it finishes, its blocks free at once, while
    the longer ones go on (no waiting for the whole batch)."""
    args, model, oracle = llama
    prompts = [[5, 9, 200, 17, 3, 3, 41, 8, 90, 11], [60, 61, 62, 1, 2], [7, 250, 100]]
    lens = [12, 3, 7]
    expected = [solo(oracle, p, n) for p, n in zip(prompts, lens, strict=True)]
    counting = CountingModel(model)
    engine = LLMEngine(counting, None, num_blocks=64, block_size=BS)
    ids = [
        engine.add_request(p, SamplingParams(max_tokens=n))
        for p, n in zip(prompts, lens, strict=True)
    ]
    finished_at = {}
    for k in range(1, max(lens) + 1):
        for out in engine.step():
            finished_at[ids.index(out.request_id)] = k
            assert out.outputs[0].tokens == expected[ids.index(out.request_id)]
        # After step k every live request holds prompt + k - 1 tokens (its last token is fed
        # next step); a finished one holds nothing.
        used = sum(
            math.ceil((len(p) + k - 1) / BS) for p, n in zip(prompts, lens, strict=True) if n > k
        )
        assert engine.cache.num_used_blocks == used, f"after step {k}: blocks in use"
    assert not engine.has_unfinished() and engine.step() == []
    assert finished_at == {i: n for i, n in enumerate(lens)}, "a request finished late"
    running = [sum(n >= k for n in lens) for k in range(2, max(lens) + 1)]
    assert counting.shapes == [(3, 10)] + [(r, 1) for r in running], (
        "expected one prefill pass [3, 10], then one decode pass [running, 1] per step"
    )
    assert_pool_empty(engine)


def test_a_waiting_request_is_admitted_when_blocks_free_up(llama):
    """A 5-block pool: the first request grows to 4 blocks, so the second (3 blocks for its
    prompt) waits until the first finishes, then runs. Nobody is preempted."""
    args, model, oracle = llama
    a, b = [4, 8, 15, 16, 23, 42, 7, 9], [100, 90, 80, 70, 60, 50, 40, 30, 20]
    engine = LLMEngine(model, None, num_blocks=5, block_size=BS)
    ra = engine.add_request(a, SamplingParams(max_tokens=8))
    assert engine.step() == []  # a's prefill
    rb = engine.add_request(b, SamplingParams(max_tokens=8))
    results, a_done = {}, None
    while engine.has_unfinished():
        for out in engine.step():
            results[out.request_id] = out
            a_done = len(engine.stats.steps) if out.request_id == ra else a_done
        assert engine.cache.num_used_blocks <= 5
        assert len(engine.stats.steps) < 100, "the engine does not finish"
    prefills = [i + 1 for i, s in enumerate(engine.stats.steps) if s.is_prefill]
    assert len(prefills) == 2 and prefills[0] == 1, f"prefill steps {prefills}"
    assert a_done is not None and prefills[1] > a_done, "b was admitted before a's blocks freed"
    assert engine.stats.preemptions == 0, "admission must leave running sequences room to grow"
    assert results[ra].outputs[0].tokens == solo(oracle, a, 8)
    assert results[rb].outputs[0].tokens == solo(oracle, b, 8)
    assert_pool_empty(engine)


def test_waiting_requests_are_admitted_in_order(llama):
    """FIFO: while the head of the queue waits for blocks, a smaller request behind it that
    would fit must not overtake it."""
    args, model, oracle = llama
    a, b, c = [4, 8, 15, 16, 23, 42, 7, 9], list(range(60, 73)), [200, 201]  # 2, 4, 1 blocks
    engine = LLMEngine(model, None, num_blocks=6, block_size=BS)
    ra = engine.add_request(a, SamplingParams(max_tokens=8))
    engine.step()
    rb = engine.add_request(b, SamplingParams(max_tokens=3))
    rc = engine.add_request(c, SamplingParams(max_tokens=3))
    admitted, results = {ra}, {}
    while engine.has_unfinished():
        results.update((r.request_id, r) for r in engine.step())
        admitted |= {s.request_id for s in engine.scheduler.running} | set(results)
        assert rc not in admitted or rb in admitted, "c was admitted before b, queued first"
        assert len(engine.stats.steps) < 100, "the engine does not finish"
    assert engine.stats.preemptions == 0
    for rid, prompt, n in ((ra, a, 8), (rb, b, 3), (rc, c, 3)):
        assert results[rid].outputs[0].tokens == solo(oracle, prompt, n)
    assert_pool_empty(engine)


# -- Stopping ------------------------------------------------------------------------------------
def test_eos_stops_a_request_with_finish_reason_stop(llama):
    args, model, oracle = llama
    prompt = [3, 141, 59, 26, 5, 200, 17, 8, 99]
    full = solo(oracle, prompt, 16)
    k = next(i for i in range(2, 16) if full[i] not in full[:i])  # first new token from 2 on
    tok = ToyTokenizer(eos_token_ids=[full[k]])
    engine = LLMEngine(model, tok, num_blocks=64, block_size=BS)
    other = [9, 9, 1, 77]
    outs = engine.generate(
        [prompt, prompt, other],
        [
            SamplingParams(max_tokens=16),
            SamplingParams(max_tokens=16, ignore_eos=True),
            SamplingParams(max_tokens=5),
        ],
    )
    stopped, ignored, third = (o.outputs[0] for o in outs)
    assert stopped.tokens == full[:k], "output must end before the EOS token"
    assert stopped.finish_reason == "stop"
    assert stopped.text == tok.decode(full[:k]), "text is the tokenizer's decode of the tokens"
    assert ignored.tokens == full and ignored.finish_reason == "length", "ignore_eos=True"
    want = solo(oracle, other, 5)
    cut = next((i for i, t in enumerate(want) if t == full[k]), None)
    assert third.tokens == (want if cut is None else want[:cut])
    assert_pool_empty(engine)


def test_text_prompts_go_through_the_tokenizer(llama):
    args, model, oracle = llama
    tok = ToyTokenizer()
    engine = LLMEngine(model, tok, num_blocks=32, block_size=BS)
    (out,) = engine.generate(["paged attention"], SamplingParams(max_tokens=6))
    want = solo(oracle, tok.encode("paged attention"), 6)
    assert out.prompt_tokens == tok.encode("paged attention")
    assert out.outputs[0].tokens == want and out.outputs[0].text == tok.decode(want)


def test_a_sequence_that_fills_the_pool_stops_with_length(llama):
    """An 8-block pool of 4 holds 32 tokens: a 28-token prompt gets 4 tokens, a 31-token one 1."""
    args, model, oracle = llama
    rng = np.random.default_rng(5)
    for n_prompt, n_out in ((28, 4), (31, 1)):
        prompt = [int(t) for t in rng.integers(0, args.vocab_size, n_prompt)]
        engine = LLMEngine(model, None, num_blocks=8, block_size=BS)
        (out,) = engine.generate([prompt], SamplingParams(max_tokens=10))
        assert out.outputs[0].tokens == solo(oracle, prompt, n_out), f"prompt of {n_prompt}"
        assert out.outputs[0].finish_reason == "length"
        assert_pool_empty(engine)


# -- Bad requests ----------------------------------------------------------------------------------
def test_invalid_requests_are_rejected_and_the_others_served(llama):
    args, model, oracle = llama
    engine = LLMEngine(model, None, num_blocks=8, block_size=BS)  # at most 32 tokens a sequence
    good = [[1, 2, 3], [200, 100, 50, 25]]
    first = engine.add_request(good[0], SamplingParams(max_tokens=5))
    engine.step()
    bad_prompts = {
        "empty prompt": ([], ValueError),
        "prompt filling the pool": (list(range(32)), ValueError),
        "prompt larger than the pool": (list(range(40)), ValueError),
        "token out of the vocabulary": ([1, args.vocab_size], ValueError),
        "negative token": ([1, -1], ValueError),
        "float token": ([1, 2.5], ValueError),
        "a string": ("hello", TypeError),
        "not a sequence": (7, TypeError),
    }
    for what, (prompt, error) in bad_prompts.items():
        with pytest.raises(error):
            engine.add_request(prompt, SamplingParams(max_tokens=5))
            pytest.fail(f"{what}: accepted")
    for bad in (dict(max_tokens=0), dict(max_tokens=-3), dict(n=0), dict(temperature=-1.0)):
        with pytest.raises(ValueError):
            engine.add_request(good[1], SamplingParams(**bad))
    with pytest.raises(TypeError):
        engine.add_request(good[1], {"max_tokens": 5})
    second = engine.add_request(good[1], SamplingParams(max_tokens=5))
    results = engine.run()
    assert sorted(results) == sorted([first, second]), "only the valid requests were queued"
    assert results[first].outputs[0].tokens == solo(oracle, good[0], 5)
    assert results[second].outputs[0].tokens == solo(oracle, good[1], 5)
    assert_pool_empty(engine)
    with pytest.raises(ValueError):  # generate checks every prompt before queueing any
        engine.generate([good[0], []], SamplingParams(max_tokens=2))
    assert not engine.has_unfinished(), "generate queued prompts before rejecting the batch"
    assert engine.step() == [] and engine.run() == {}
