"""Week 3 Day 6: prefix caching (src/tiny_llm/prefix_cache.py).

Oracles:
- a hypothesis state machine that simulates the physical memory of the blocks (it writes every
  token through `slot_mapping`, applies the copy-on-write pairs, and reads sequences back
  through their block tables) and remembers every full-block prefix any sequence ever stored:
  a hit must hold exactly its prefix's tokens, may only be a prefix that was stored, and, in a
  pool too large to ever evict, must be the longest such prefix (capped to leave one token);
- mlx-lm decoding each request alone, for the engine with prefix caching on.
Blocks are observed through the public API only, never by id.
"""

from __future__ import annotations

import importlib
from collections import Counter

import numpy as np
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
from tiny_llm_common.models.mlx_lm_oracle import build_mlx_lm_model
from tiny_llm_common.models.mlx_lm_oracle import greedy_tokens as solo

sol_model = importlib.import_module(f"{solution_name()}.model")
engine_mod = importlib.import_module(f"{solution_name()}.engine")
seq_mod = importlib.import_module(f"{solution_name()}.sequence")
pc = importlib.import_module(f"{solution_name()}.prefix_cache")
LLMEngine, SamplingParams = engine_mod.LLMEngine, seq_mod.SamplingParams
PrefixCachingBlockManager = pc.PrefixCachingBlockManager

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


def store(mgr, seq, tokens, n_cached):
    """What the engine does after a hit: append and compute the rest, then name full blocks."""
    mgr.append(seq, len(tokens) - n_cached)
    mgr.commit(seq, tokens)


def hit(mgr, tokens, seq="probe"):
    """How many tokens of `tokens` the cache holds (the probe is given back at once)."""
    n = mgr.allocate_cached(seq, tokens)
    mgr.free(seq)
    return n


def assert_pool_empty(engine):
    cache = engine.cache
    assert not engine.has_unfinished()
    assert cache.num_used_blocks == 0 and cache.num_free_blocks == cache.num_blocks
    held = [b for b in range(cache.num_blocks) if cache.manager.ref_count(b)]
    assert not held, f"blocks {held} still have a reference count"


# -- Hits --------------------------------------------------------------------------------------
def test_a_hit_is_the_longest_full_block_prefix_leaving_one_token():
    mgr = PrefixCachingBlockManager(num_blocks=16, block_size=4)
    stored = list(range(1, 15))  # 14 tokens: 3 full blocks (12 tokens) get names
    mgr.allocate_cached("a", stored)
    store(mgr, "a", stored, 0)
    assert hit(mgr, stored[:12] + [99]) == 12, "3 full blocks match"
    assert hit(mgr, stored[:12]) == 8, "a hit leaves at least one token to compute"
    assert hit(mgr, stored[:13]) == 12
    assert hit(mgr, stored[:10] + [99, 98, 97]) == 8, "the third block differs"
    assert hit(mgr, stored[:4]) == 0 and hit(mgr, stored[:5]) == 4
    assert hit(mgr, [99] + stored[1:]) == 0, "the first block differs: no later block counts"
    assert hit(mgr, stored[4:12] + [7]) == 0, "a block matches only after the same prefix"
    # The hit's blocks are shared: holding them takes no block.
    used = mgr.num_used_blocks
    assert mgr.allocate_cached("b", stored[:12] + [5]) == 12
    assert mgr.num_used_blocks == used and mgr.seq_len("b") == 12
    assert mgr.block_table("b") == mgr.block_table("a")[:3]
    assert [mgr.ref_count(x) for x in mgr.block_table("b")] == [2, 2, 2]
    mgr.free("a")
    mgr.free("b")
    assert mgr.num_free_blocks == 16 and hit(mgr, stored) == 12, "freed blocks stay cached"


def test_a_partly_filled_block_is_never_a_hit():
    mgr = PrefixCachingBlockManager(num_blocks=8, block_size=4)
    mgr.allocate_cached("a", [1, 2, 3, 4, 5, 6])
    store(mgr, "a", [1, 2, 3, 4, 5, 6], 0)
    assert hit(mgr, [1, 2, 3, 4, 5, 6, 7, 8, 9]) == 4
    mgr.append("a", 2)  # a's second block fills up: named on commit
    mgr.commit("a", [1, 2, 3, 4, 5, 6, 7, 8])
    assert hit(mgr, [1, 2, 3, 4, 5, 6, 7, 8, 9]) == 8


# -- LRU eviction ----------------------------------------------------------------------------------
A, B, C = (
    [1, 2, 3, 4, 5, 6, 7, 8],
    [11, 12, 13, 14, 15, 16, 17, 18],
    [21, 22, 23, 24, 25, 26, 27, 28],
)


def cached_pool(order):
    """A 4-block pool holding A's and B's 2 full blocks each, all free, freed in `order`."""
    mgr = PrefixCachingBlockManager(num_blocks=4, block_size=4)
    for name, tokens in (("A", A), ("B", B)):
        mgr.allocate_cached(name, tokens)
        store(mgr, name, tokens, 0)
    for name in order:
        mgr.free(name)
    assert mgr.num_free_blocks == 4
    return mgr


@pytest.mark.parametrize("order", [("A", "B"), ("B", "A")])
def test_the_least_recently_freed_blocks_are_evicted_first(order):
    first, last = order
    mgr = cached_pool(order)
    tokens = {"A": A, "B": B}
    mgr.allocate_cached("C", C)  # a miss that needs 2 blocks of the 4 free (cached) ones
    mgr.append("C", 8)
    assert hit(mgr, tokens[first] + [0]) == 0, f"{first} was freed first: it must be evicted"
    assert hit(mgr, tokens[last] + [0]) == 8, f"{last} was freed last: it must still hit"


def test_a_hit_makes_blocks_recently_used():
    """A freed before B, but A hit (and given back) since: B is now the least recently used."""
    mgr = cached_pool(("A", "B"))
    assert hit(mgr, A + [0]) == 8
    mgr.allocate_cached("C", C)
    mgr.append("C", 8)
    assert hit(mgr, A + [0]) == 8, "A was used last: it must survive"
    assert hit(mgr, B + [0]) == 0, "B was least recently used: it must be evicted"


def test_an_evicted_block_is_rewritten_and_never_a_false_hit():
    """A 2-block pool: B's blocks can only be A's, evicted; A must then miss, B hit."""
    mgr = PrefixCachingBlockManager(num_blocks=2, block_size=4)
    for name, tokens in (("a", A), ("b", B)):
        assert mgr.allocate_cached(name, tokens) == 0
        store(mgr, name, tokens, 0)
        mgr.free(name)
    assert hit(mgr, A + [0]) == 0 and hit(mgr, B + [0]) == 8


# -- Property test ---------------------------------------------------------------------------------
TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=12)  # 3 ids: prefixes repeat
PICK = st.integers(0, 1000)
BIG = 100_000  # never short: nothing is ever evicted


class PrefixCacheMachine(RuleBasedStateMachine):
    @initialize(big=st.booleans(), num_blocks=st.integers(3, 16), block_size=st.integers(1, 4))
    def make_pool(self, big, num_blocks, block_size):
        self.big = big
        self.mgr = PrefixCachingBlockManager(BIG if big else num_blocks, block_size)
        self.memory: dict[int, int] = {}  # physical slot -> token
        self.seqs: dict[int, list[int]] = {}  # live sequence -> its stored tokens
        self.history: list[list[int]] = [[0]]  # token lists seen, to build repeated prefixes
        self.stored: set[tuple[int, ...]] = set()  # every full-block prefix ever committed
        self.next_seq = 0

    def pick(self, pick):
        return list(self.seqs)[pick % len(self.seqs)]

    def write(self, seq, start, tokens):
        """The copies `append` asked for, then the new tokens, then commit."""
        bs = self.mgr.block_size
        for slot, token in zip(
            self.mgr.slot_mapping(seq, range(start, start + len(tokens))), tokens, strict=True
        ):
            assert self.mgr.ref_count(slot // bs) == 1, "a token written into a shared block"
            self.memory[slot] = token
        self.seqs[seq] = self.seqs[seq][:start] + tokens
        self.mgr.commit(seq, self.seqs[seq])
        full = self.seqs[seq]
        self.stored.update(tuple(full[: k * bs]) for k in range(1, len(full) // bs + 1))

    def grow(self, seq, tokens):
        """Append tokens to `seq` if they fit; False (nothing changed) otherwise."""
        bs = self.mgr.block_size
        if not self.mgr.can_append(seq, len(tokens)):
            return False
        start = self.mgr.seq_len(seq)
        for src, dst in self.mgr.append(seq, len(tokens)):
            for off in range(bs):
                if src * bs + off in self.memory:
                    self.memory[dst * bs + off] = self.memory[src * bs + off]
        self.write(seq, start, tokens)
        return True

    @rule(pick=PICK, cut=st.integers(0, 12), suffix=TOKENS)
    def allocate(self, pick, cut, suffix):
        mgr, bs = self.mgr, self.mgr.block_size
        tokens = self.history[pick % len(self.history)][:cut] + suffix
        self.history.append(tokens)
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        n = mgr.allocate_cached(seq, tokens)
        cap = (len(tokens) - 1) // bs
        assert n % bs == 0 and 0 <= n <= cap * bs, f"hit of {n} for {len(tokens)} tokens"
        assert mgr.seq_len(seq) == n and len(mgr.block_table(seq)) == n // bs
        got = [self.memory.get(s) for s in mgr.slot_mapping(seq, range(n))]
        assert got == tokens[:n], f"a hit of {n} tokens holds {got}, not {tokens[:n]}"
        assert n == 0 or tuple(tokens[:n]) in self.stored, "a hit on a prefix never stored"
        if self.big:  # nothing was evicted: the longest stored prefix must hit
            longest = max(
                k for k in range(cap + 1) if k == 0 or tuple(tokens[: k * bs]) in self.stored
            )
            assert n == longest * bs, f"hit {n} tokens, {longest * bs} are cached"
        self.seqs[seq] = tokens[:n]
        if not self.grow(seq, tokens[n:]):  # too few blocks: give the hit back
            mgr.free(seq)
            del self.seqs[seq]

    @precondition(lambda self: self.seqs)
    @rule(pick=PICK, tokens=st.lists(st.integers(0, 2), min_size=1, max_size=5))
    def append(self, pick, tokens):
        seq = self.pick(pick)
        if self.grow(seq, tokens):
            self.history.append(list(self.seqs[seq]))

    @precondition(lambda self: self.seqs)
    @rule(pick=PICK)
    def fork(self, pick):
        parent, child = self.pick(pick), self.next_seq
        self.next_seq += 1
        self.mgr.fork(parent, child)
        self.seqs[child] = list(self.seqs[parent])

    @precondition(lambda self: self.seqs)
    @rule(pick=PICK)
    def free(self, pick):
        seq = self.pick(pick)
        self.mgr.free(seq)
        del self.seqs[seq]

    @invariant()
    def consistent(self):
        if not hasattr(self, "mgr"):
            return
        mgr, holders = self.mgr, Counter()
        for seq, tokens in self.seqs.items():
            got = [self.memory.get(s) for s in mgr.slot_mapping(seq, range(len(tokens)))]
            assert got == tokens, f"sequence {seq} reads {got}, stored {tokens}"
            holders.update(mgr.block_table(seq))
        blocks = holders if self.big else range(mgr.num_blocks)
        for b in blocks:
            assert mgr.ref_count(b) == holders[b], f"block {b}: ref_count vs {holders[b]} tables"
        assert mgr.num_free_blocks + len(holders) == mgr.num_blocks, "a block was lost"

    def teardown(self):
        if hasattr(self, "mgr"):
            for seq in list(self.seqs):
                self.mgr.free(seq)
            assert self.mgr.num_free_blocks == self.mgr.num_blocks


def test_random_operations_hit_exactly_what_was_stored():
    # One pass through every method first: a missing one fails at once, not after shrinking.
    mgr = PrefixCachingBlockManager(4, 2)
    mgr.allocate_cached(0, [1, 2, 3])
    store(mgr, 0, [1, 2, 3], 0)
    mgr.fork(0, 1)
    mgr.free(0)
    mgr.free(1)
    run_state_machine_as_test(
        PrefixCacheMachine,
        settings=settings(
            max_examples=120,
            stateful_step_count=50,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.generate, Phase.shrink],
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# -- The engine with prefix caching ------------------------------------------------------------------
SYSTEM = [17, 3, 200, 41, 41, 9, 150, 8, 77, 5, 5, 120, 64, 33, 2, 90, 11, 180]  # 18 tokens


def test_engine_with_prefix_caching_equals_solo_decoding(checkpoint):
    """8 requests sharing a system prompt, 3 running at a time: later ones reuse the blocks the
    first ones computed, and every output still equals mlx-lm decoding it alone."""
    args, model, oracle = checkpoint
    rng = np.random.default_rng(8)
    prompts = [SYSTEM + [int(t) for t in rng.integers(0, 256, int(rng.integers(1, 12)))]
               for _ in range(8)]  # fmt: skip
    lens = [int(rng.integers(1, 16)) for _ in prompts]
    expected = [solo(oracle, p, n) for p, n in zip(prompts, lens, strict=True)]
    engine = LLMEngine(
        model, None, num_blocks=96, block_size=BS, max_num_seqs=3, enable_prefix_caching=True
    )
    outs = engine.generate(prompts, [SamplingParams(max_tokens=n) for n in lens])
    for i, (out, want) in enumerate(zip(outs, expected, strict=True)):
        assert out.outputs[0].tokens == want, f"request {i} with prefix caching"
    # The first 3 are admitted together, with nothing cached; each later one finds at least
    # the system prompt's 4 full blocks.
    assert engine.stats.cached_prompt_tokens >= 5 * 16
    assert engine.stats.computed_tokens < sum(map(len, prompts)) + sum(lens)
    assert_pool_empty(engine)


def test_a_later_request_reports_its_cached_prefix(llama):
    args, model, oracle = llama
    first = SYSTEM + [1, 2, 3]  # 21 tokens
    second = SYSTEM + [250, 251]  # shares 18 tokens with the first: 4 full blocks
    for caching in (True, False):
        engine = LLMEngine(model, None, num_blocks=64, block_size=BS,
                           enable_prefix_caching=caching)  # fmt: skip
        (out1,) = engine.generate([first], SamplingParams(max_tokens=6))
        (out2,) = engine.generate([second], SamplingParams(max_tokens=6))
        # A follow-up turn: the first conversation so far, and more. Its first 26 tokens
        # (first + 5 of its 6 outputs, the last one was never fed) are stored: 6 full blocks.
        third = first + out1.outputs[0].tokens + [7, 7]
        (out3,) = engine.generate([third], SamplingParams(max_tokens=6))
        for prompt, out in ((first, out1), (second, out2), (third, out3)):
            assert out.outputs[0].tokens == solo(oracle, prompt, 6)
        want = (16 + 24) if caching else 0
        assert engine.stats.cached_prompt_tokens == want, f"prefix caching {caching}"
        total = len(first) + len(second) + len(third)
        assert engine.stats.prompt_tokens == total
        assert engine.stats.prefix_cache_saved_fraction() == pytest.approx(want / total)
        assert_pool_empty(engine)
