"""Week 3 Day 5: parallel sampling and copy-on-write (src/tiny_llm/engine.py `_fork_samples`).

Oracles:
- for seeded sampling, mlx-lm's own model and KVCache give each sample's logits, and the draw
  follows `sample_rows`'s documented key scheme: sample i of a request with seed s draws its
  t-th token with `mx.random.key((s + i) * 1_000_003 + t)`, as the Gumbel-max trick
  argmax(logprobs / T + gumbel(key)) (what `mx.random.categorical` computes); the oracle also
  checks that its two best perturbed scores are more than 1e-3 apart;
- for copy-on-write, a hypothesis state machine that simulates the physical memory of the
  blocks: it applies the (src, dst) copies `append` returns, writes every token through
  `slot_mapping`, and reads every live sequence back through its block table.
Blocks are observed through the public API only (`num_used_blocks`, `ref_count`), never by id.
"""

from __future__ import annotations

import importlib
from collections import Counter

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tiny_llm_common.checkpoints import random_checkpoint
from tiny_llm_common.grading import solution_name
from tiny_llm_common.models.mlx_lm_oracle import build_mlx_lm_model, greedy_tokens
from tiny_llm_common.models.mlx_lm_oracle import seeded_samples as oracle_samples

sol_model = importlib.import_module(f"{solution_name()}.model")
engine_mod = importlib.import_module(f"{solution_name()}.engine")
seq_mod = importlib.import_module(f"{solution_name()}.sequence")
bm = importlib.import_module(f"{solution_name()}.block_manager")
LLMEngine, SamplingParams, BlockManager = (
    engine_mod.LLMEngine,
    seq_mod.SamplingParams,
    bm.BlockManager,
)

CHECKPOINTS = {"llama": ("llama", 4), "qwen2": ("qwen2", 5)}
BS = 4
PROMPT = [3, 141, 59, 26, 5, 200, 17, 8, 99]  # 9 tokens: the third block is partly filled


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def checkpoint(request):
    family, seed = CHECKPOINTS[request.param]
    args, weights = random_checkpoint(family, seed=seed)
    return args, sol_model.Model(args, weights), build_mlx_lm_model(args, weights)


@pytest.fixture(scope="module")
def llama():
    args, weights = random_checkpoint("llama", seed=4)
    return args, sol_model.Model(args, weights), build_mlx_lm_model(args, weights)


def ref_counts(cache):
    """How many blocks have each reference count (0 left out): id-free sharing."""
    return Counter(c for b in range(cache.num_blocks) if (c := cache.manager.ref_count(b)))


def assert_pool_empty(engine):
    cache = engine.cache
    assert not engine.has_unfinished()
    assert cache.num_used_blocks == 0 and cache.num_free_blocks == cache.num_blocks
    assert not ref_counts(cache), "reference counts left after every request finished"


# -- Samples equal the oracle's draws --------------------------------------------------------------
def test_n_seeded_samples_equal_the_oracle_draws(checkpoint):
    """n=4 samples of one prompt next to a greedy request: each sample draws exactly what the
    key scheme gives on mlx-lm's logits for that sample alone."""
    args, model, oracle = checkpoint
    params = SamplingParams(max_tokens=12, temperature=0.8, n=4, seed=7)
    expected = oracle_samples(oracle, PROMPT, params)
    assert len({tuple(s) for s in expected}) == 4, "the samples should differ"
    other = [250, 1, 2, 3, 4, 5]
    engine = LLMEngine(model, None, num_blocks=64, block_size=BS)
    sampled, greedy = engine.generate([PROMPT, other], [params, SamplingParams(max_tokens=8)])
    assert [o.index for o in sampled.outputs] == [0, 1, 2, 3], "outputs in sample order"
    for i, out in enumerate(sampled.outputs):
        assert out.tokens == expected[i], f"sample {i}: {out.tokens} != oracle {expected[i]}"
        assert out.finish_reason == "length"
    assert greedy.outputs[0].tokens == greedy_tokens(oracle, other, 8)
    assert engine.stats.generated_tokens == 4 * 12 + 8
    assert_pool_empty(engine)


def test_n_samples_equal_separate_requests_with_seeds_s_plus_i(llama):
    """Forked samples are indistinguishable from n independent requests with seeds s, s+1, ...
    (same tokens), but they share the prompt's blocks, and the saving is reported."""
    args, model, _ = llama
    prompts = [PROMPT, [9, 8, 7, 6, 5, 4, 3, 2], [100, 101]]
    forked = LLMEngine(model, None, num_blocks=64, block_size=BS)
    outs = forked.generate(prompts, SamplingParams(max_tokens=10, temperature=1.0, n=3, seed=11))
    separate = LLMEngine(model, None, num_blocks=64, block_size=BS)
    singles = separate.generate(
        [p for p in prompts for _ in range(3)],
        [SamplingParams(max_tokens=10, temperature=1.0, seed=11 + i) for _ in prompts
         for i in range(3)],
    )  # fmt: skip
    for r, out in enumerate(outs):
        for i in range(3):
            assert out.outputs[i].tokens == singles[3 * r + i].outputs[0].tokens, (
                f"prompt {r}, sample {i}: a fork must sample as a request with seed 11 + {i}"
            )
    saved = forked.stats.sharing_saved_fraction()
    assert 0 < saved < 1, f"sharing_saved_fraction {saved}: forks must share the prompt's blocks"
    assert separate.stats.sharing_saved_fraction() == 0, "nothing is shared between requests"
    peak = max(s.used_blocks for s in forked.stats.steps)
    assert peak < max(s.used_blocks for s in separate.stats.steps)
    assert_pool_empty(forked)
    assert_pool_empty(separate)


@pytest.mark.parametrize("prompt_len", [9, 8])
def test_samples_share_the_prompt_blocks_until_they_write(llama, prompt_len):
    """After the first step the pool holds only the prompt's blocks, each held by all n
    samples. The next step writes one token per sample: a partly filled shared block is copied
    for all but one of them (copy-on-write), full blocks stay shared."""
    args, model, oracle = llama
    n, prompt = 4, PROMPT[:prompt_len]
    params = SamplingParams(max_tokens=6, temperature=0.7, n=n, seed=3)
    engine = LLMEngine(model, None, num_blocks=32, block_size=BS)
    engine.add_request(prompt, params)
    assert engine.step() == []
    n_blocks, full = -(-prompt_len // BS), prompt_len // BS
    assert engine.cache.num_used_blocks == n_blocks, "the samples must share the prompt's blocks"
    assert ref_counts(engine.cache) == {n: n_blocks}, "every prompt block is held by n samples"
    engine.step()
    assert engine.cache.num_used_blocks == full + n, "full blocks shared, one last block each"
    assert ref_counts(engine.cache) == {n: full, 1: n}
    (out,) = engine.run().values()
    expected = oracle_samples(oracle, prompt, params)
    assert [o.tokens for o in out.outputs] == expected
    assert_pool_empty(engine)


def test_samples_that_all_finish_at_the_fork(llama):
    """max_tokens=1: every sample finishes in the step that forks it; one output, n samples."""
    args, model, oracle = llama
    params = SamplingParams(max_tokens=1, temperature=0.9, n=5, seed=21)
    engine = LLMEngine(model, None, num_blocks=16, block_size=BS)
    (out,) = engine.generate([PROMPT], params)
    assert [o.tokens for o in out.outputs] == oracle_samples(oracle, PROMPT, params)
    assert len(engine.stats.steps) == 1
    assert_pool_empty(engine)


def test_greedy_samples_are_rejected():
    with pytest.raises(ValueError):
        SamplingParams(n=2, temperature=0.0)
    with pytest.raises(ValueError):
        SamplingParams(n=0, temperature=1.0)


# -- Copy-on-write, property test ------------------------------------------------------------------
PICK = st.integers(0, 1000)


class CopyOnWriteMachine(RuleBasedStateMachine):
    """Random allocate / append / fork / free on a BlockManager, over a simulated memory of
    token slots. Every token written is new, so any write into a block another sequence
    also holds shows up when that sequence is read back."""

    @initialize(num_blocks=st.integers(2, 24), block_size=st.integers(1, 5))
    def make_pool(self, num_blocks, block_size):
        self.mgr = BlockManager(num_blocks, block_size)
        self.memory: dict[int, int] = {}  # physical slot -> token
        self.seqs: dict[int, list[int]] = {}  # live sequence -> the tokens it must read back
        self.next_seq = self.next_token = 0

    def new_tokens(self, n):
        self.next_token += n
        return list(range(self.next_token - n, self.next_token))

    def pick(self, pick):
        return list(self.seqs)[pick % len(self.seqs)]

    def write(self, seq, start, tokens):
        bs = self.mgr.block_size
        for slot, token in zip(
            self.mgr.slot_mapping(seq, range(start, start + len(tokens))), tokens, strict=True
        ):
            holders = self.mgr.ref_count(slot // bs)
            assert holders == 1, f"a token written in place into a block {holders} hold"
            self.memory[slot] = token
        self.seqs[seq] = self.seqs.get(seq, [])[:start] + tokens

    @rule(size=st.integers(0, 12))
    def allocate(self, size):
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        if self.mgr.can_allocate(size):
            self.mgr.allocate(seq, size)
            self.write(seq, 0, self.new_tokens(size))

    @precondition(lambda self: self.seqs)
    @rule(pick=PICK, size=st.integers(1, 6))
    def append(self, pick, size):
        seq, bs = self.pick(pick), self.mgr.block_size
        if not self.mgr.can_append(seq, size):
            return
        start = self.mgr.seq_len(seq)
        for src, dst in self.mgr.append(seq, size):
            assert self.mgr.ref_count(dst) == 1 and self.mgr.ref_count(src) >= 1
            for off in range(bs):  # what the cache does in every layer: copy the whole block
                if src * bs + off in self.memory:
                    self.memory[dst * bs + off] = self.memory[src * bs + off]
        self.write(seq, start, self.new_tokens(size))

    @precondition(lambda self: self.seqs)
    @rule(pick=PICK)
    def fork(self, pick):
        parent, child = self.pick(pick), self.next_seq
        self.next_seq += 1
        used = self.mgr.num_used_blocks
        self.mgr.fork(parent, child)
        assert self.mgr.num_used_blocks == used, "fork must not take blocks"
        self.seqs[child] = list(self.seqs[parent])

    @precondition(lambda self: self.seqs)
    @rule(pick=PICK)
    def free(self, pick):
        seq = self.pick(pick)
        self.mgr.free(seq)
        del self.seqs[seq]

    @invariant()
    def every_sequence_reads_back_its_tokens(self):
        if not hasattr(self, "mgr"):
            return
        mgr, holders = self.mgr, Counter()
        for seq, tokens in self.seqs.items():
            assert mgr.seq_len(seq) == len(tokens)
            slots = mgr.slot_mapping(seq, range(len(tokens)))
            got = [self.memory.get(s) for s in slots]
            assert got == tokens, f"sequence {seq} reads {got}, wrote {tokens}"
            holders.update(mgr.block_table(seq))
        for b in range(mgr.num_blocks):
            assert mgr.ref_count(b) == holders[b], f"block {b}: ref_count vs {holders[b]} tables"
        assert mgr.num_free_blocks + len(holders) == mgr.num_blocks, "a block was lost"

    def teardown(self):
        if hasattr(self, "mgr"):
            for seq in list(self.seqs):
                self.mgr.free(seq)
            assert self.mgr.num_free_blocks == self.mgr.num_blocks


def test_copy_on_write_never_writes_a_shared_block():
    run_state_machine_as_test(
        CopyOnWriteMachine,
        settings=settings(
            max_examples=120,
            stateful_step_count=60,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.generate, Phase.shrink],
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
