"""Week 3 Day 1: the block manager (src/tiny_llm/block_manager.py).

Everything goes through the public API. No test depends on which free block is handed out
first: tables are checked for their length, distinct in-range ids and sharing, never for exact
ids. The property test at the end runs more than 10,000 random operations (a hypothesis state
machine; the test counts them) and checks every invariant after each one against a model that
knows only each sequence's length and which sequences were forked from which.
"""

import importlib
import math

import mlx.core as mx
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

from tiny_llm_common.grading import solution_name

bm = importlib.import_module(f"{solution_name()}.block_manager")
BlockManager, OutOfBlocksError = bm.BlockManager, bm.OutOfBlocksError


def check_table(mgr, seq_id, n_tokens):
    """The table of a sequence of n_tokens tokens: ceil(n / block_size) distinct in-range ids."""
    table = mgr.block_table(seq_id)
    assert mgr.seq_len(seq_id) == n_tokens
    assert len(table) == math.ceil(n_tokens / mgr.block_size), f"{n_tokens} tokens: table {table}"
    assert len(set(table)) == len(table), f"a block appears twice in {table}"
    assert all(isinstance(b, int) and 0 <= b < mgr.num_blocks for b in table), table
    return table


def snapshot(mgr, seq_ids, extra_ids=()):
    """Everything the public API shows, to compare before and after a failed call."""
    return (
        mgr.num_free_blocks,
        mgr.num_used_blocks,
        {s: (mgr.seq_len(s), mgr.block_table(s)) for s in seq_ids},
        [mgr.ref_count(b) for b in range(mgr.num_blocks)],
        mgr.usage(),
        [s in mgr for s in extra_ids],
    )


# -- allocate, free, append --------------------------------------------------------------------
@pytest.mark.parametrize("n_tokens", [0, 1, 15, 16, 17, 33, 64])
def test_allocate_takes_ceil_n_over_block_size_blocks(n_tokens):
    mgr = BlockManager(num_blocks=8, block_size=16)
    returned = mgr.allocate("a", n_tokens)
    table = check_table(mgr, "a", n_tokens)
    assert returned == table
    assert mgr.num_used_blocks == len(table) and mgr.num_free_blocks == 8 - len(table)
    assert all(mgr.ref_count(b) == 1 for b in table)
    assert "a" in mgr and "b" not in mgr


def test_sequences_get_disjoint_blocks():
    mgr = BlockManager(num_blocks=10, block_size=4)
    for i, n in enumerate([5, 1, 9, 12]):
        mgr.allocate(i, n)
    tables = [check_table(mgr, i, n) for i, n in enumerate([5, 1, 9, 12])]
    ids = [b for t in tables for b in t]
    assert len(ids) == len(set(ids)) == 2 + 1 + 3 + 3 == mgr.num_used_blocks
    assert mgr.num_free_blocks == 1


def test_free_returns_blocks_at_once_and_they_are_reused():
    mgr = BlockManager(num_blocks=6, block_size=4)
    mgr.allocate("a", 8)
    mgr.allocate("b", 9)
    mgr.allocate("c", 1)
    assert mgr.num_free_blocks == 0 and not mgr.can_allocate(1)
    freed = set(mgr.block_table("b"))
    mgr.free("b")
    assert "b" not in mgr
    assert mgr.num_free_blocks == 3 and all(mgr.ref_count(b) == 0 for b in freed)
    assert mgr.can_allocate(12) and not mgr.can_allocate(13)
    assert set(mgr.allocate("d", 12)) == freed  # the only free blocks are the ones just freed
    mgr.free("a")
    mgr.free("c")
    mgr.free("d")
    assert mgr.num_free_blocks == 6 and mgr.num_used_blocks == 0
    assert sorted(mgr.allocate("all", 24)) == list(range(6))  # every block came back


def test_decode_appends_grow_the_table_one_block_at_a_time():
    mgr = BlockManager(num_blocks=4, block_size=16)
    mgr.allocate("s", 15)
    before = mgr.block_table("s")
    for n in range(16, 50):
        assert mgr.can_append("s")
        assert mgr.append("s") == []  # nothing is shared: no copy-on-write
        table = check_table(mgr, "s", n)
        assert table[: len(before)] == before, "append moved a block that already held tokens"
        before = table
    assert mgr.num_used_blocks == 4 and mgr.usage().stored_tokens == 49


def test_append_many_tokens_at_once_and_from_empty():
    mgr = BlockManager(num_blocks=10, block_size=8)
    mgr.allocate("s", 0)
    assert mgr.block_table("s") == [] and mgr.num_used_blocks == 0
    assert mgr.append("s", 0) == [] and mgr.block_table("s") == []
    mgr.append("s", 5)
    check_table(mgr, "s", 5)
    mgr.append("s", 30)
    check_table(mgr, "s", 35)
    mgr.append("s", 5)
    check_table(mgr, "s", 40)
    assert mgr.num_used_blocks == 5


def test_out_of_blocks_is_a_runtime_error_and_leaves_the_manager_unchanged():
    assert issubclass(OutOfBlocksError, RuntimeError)
    mgr = BlockManager(num_blocks=5, block_size=4)
    mgr.allocate("a", 7)  # 2 blocks
    mgr.allocate("b", 8)  # 2 blocks, full
    before = snapshot(mgr, ["a", "b"], ["c"])
    assert mgr.can_allocate(4) and not mgr.can_allocate(5)
    with pytest.raises(OutOfBlocksError):
        mgr.allocate("c", 5)
    assert snapshot(mgr, ["a", "b"], ["c"]) == before
    assert mgr.can_append("a", 5) and not mgr.can_append("a", 6)  # 7 + 5 = 12 fits 3 blocks
    with pytest.raises(OutOfBlocksError):
        mgr.append("a", 6)
    with pytest.raises(OutOfBlocksError):
        mgr.append("b", 5)
    assert snapshot(mgr, ["a", "b"], ["c"]) == before
    mgr.append("b", 4)  # what was refused a moment ago still fits exactly
    check_table(mgr, "b", 12)
    assert mgr.num_free_blocks == 0 and mgr.can_append("b", 0) and not mgr.can_append("b")


# -- fork and copy-on-write --------------------------------------------------------------------
def test_fork_shares_every_block_and_free_decrements():
    mgr = BlockManager(num_blocks=6, block_size=4)
    mgr.allocate("p", 10)  # 3 blocks
    mgr.fork("p", "c")
    assert mgr.block_table("c") == mgr.block_table("p") and mgr.seq_len("c") == 10
    assert mgr.num_used_blocks == 3, "fork must not take new blocks"
    assert all(mgr.ref_count(b) == 2 for b in mgr.block_table("p"))
    mgr.fork("c", "g")
    assert all(mgr.ref_count(b) == 3 for b in mgr.block_table("p"))
    shared = mgr.block_table("p")
    mgr.free("p")
    assert mgr.num_used_blocks == 3 and all(mgr.ref_count(b) == 2 for b in shared)
    mgr.free("g")
    assert mgr.num_used_blocks == 3 and mgr.block_table("c") == shared
    mgr.free("c")
    assert mgr.num_free_blocks == 6 and all(mgr.ref_count(b) == 0 for b in shared)


def test_append_into_a_shared_partial_block_copies_it_first():
    mgr = BlockManager(num_blocks=6, block_size=4)
    mgr.allocate("p", 6)  # a full block and a half-full one
    mgr.fork("p", "c")
    full, partial = mgr.block_table("p")
    copies = mgr.append("c")
    new_full, new_last = check_table(mgr, "c", 7)
    assert new_full == full, "the full block stays shared"
    assert new_last not in (full, partial), "the child must not write into the parent's block"
    assert copies == [(partial, new_last)]
    assert mgr.block_table("p") == [full, partial] and mgr.seq_len("p") == 6
    assert [mgr.ref_count(b) for b in (full, partial, new_last)] == [2, 1, 1]
    assert mgr.append("p") == [], "the parent is now the only holder: no copy"
    assert mgr.block_table("p") == [full, partial]


def test_append_after_a_full_shared_block_needs_no_copy():
    mgr = BlockManager(num_blocks=4, block_size=4)
    mgr.allocate("p", 8)
    mgr.fork("p", "c")
    assert mgr.append("c", 3) == []
    table = check_table(mgr, "c", 11)
    assert table[:2] == mgr.block_table("p") and mgr.ref_count(table[2]) == 1
    assert mgr.num_used_blocks == 3


def test_copy_on_write_is_counted_by_can_append_and_is_atomic():
    mgr = BlockManager(num_blocks=3, block_size=4)
    mgr.allocate("p", 6)  # 2 blocks, 1 free
    mgr.fork("p", "c")
    assert mgr.can_append("c", 2), "one copy of the shared last block"
    assert not mgr.can_append("c", 3), "a copy and a new block: 2 > 1 free"
    before = snapshot(mgr, ["p", "c"])
    with pytest.raises(OutOfBlocksError):
        mgr.append("c", 3)
    assert snapshot(mgr, ["p", "c"]) == before
    assert len(mgr.append("c", 2)) == 1
    check_table(mgr, "c", 8)


# -- what the kernels take ---------------------------------------------------------------------
def test_slot_mapping_follows_the_block_table():
    mgr = BlockManager(num_blocks=8, block_size=4)
    mgr.allocate("a", 10)
    mgr.allocate("b", 3)
    mgr.append("b", 6)
    slots = {}
    for s, n in (("a", 10), ("b", 9)):
        table = mgr.block_table(s)
        slots[s] = mgr.slot_mapping(s, range(n))
        assert slots[s] == [table[p // 4] * 4 + p % 4 for p in range(n)]
        assert mgr.slot_mapping(s, [n - 1, 0]) == [slots[s][n - 1], slots[s][0]]
    assert not set(slots["a"]) & set(slots["b"]), "two sequences write to the same slot"
    assert mgr.slot_mapping("a", []) == []
    with pytest.raises(ValueError):
        mgr.slot_mapping("a", [10])  # not appended yet
    with pytest.raises(ValueError):
        mgr.slot_mapping("a", [-1])


def test_block_table_array_is_int32_padded_with_minus_one():
    mgr = BlockManager(num_blocks=10, block_size=4)
    mgr.allocate("a", 9)
    mgr.allocate("b", 1)
    mgr.allocate("e", 0)
    arr = mgr.block_table_array(["b", "a", "e"], max_blocks=5)
    assert isinstance(arr, mx.array) and arr.dtype == mx.int32 and arr.shape == (3, 5)
    expected = [mgr.block_table(s) for s in ("b", "a", "e")]
    expected = [t + [-1] * (5 - len(t)) for t in expected]
    np.testing.assert_array_equal(np.array(arr), np.array(expected, dtype=np.int32))
    assert mgr.block_table_array(["a", "b"]).shape == (2, 3), "default width: the longest table"
    assert mgr.block_table_array([], max_blocks=4).shape == (0, 4)
    with pytest.raises(ValueError):
        mgr.block_table_array(["a"], max_blocks=2)
    with pytest.raises(ValueError):
        mgr.block_table_array(["a", "nope"], max_blocks=4)


# -- reports -----------------------------------------------------------------------------------
def test_usage_reports_fragmentation_and_counts_shared_blocks_once():
    mgr = BlockManager(num_blocks=10, block_size=16)
    u = mgr.usage()
    assert (u.used_blocks, u.free_blocks, u.allocated_slots, u.stored_tokens) == (0, 10, 0, 0)
    assert u.internal_fragmentation == 0
    for s, n in (("a", 1), ("b", 16), ("c", 17)):
        mgr.allocate(s, n)
    u = mgr.usage()
    assert (u.used_blocks, u.free_blocks, u.allocated_slots, u.stored_tokens) == (4, 6, 64, 34)
    assert u.internal_fragmentation == 30
    assert u.utilization == pytest.approx(34 / 64)
    mgr.fork("c", "d")  # shares 17 tokens: nothing new is stored or allocated
    assert mgr.usage() == u
    mgr.append("d")  # copy of the half block: 16 slots more, holding 2 tokens
    u = mgr.usage()
    assert (u.used_blocks, u.allocated_slots, u.stored_tokens) == (5, 80, 36)


# -- bad input ---------------------------------------------------------------------------------
def test_bad_arguments_raise_clear_errors():
    for bad in (0, -3):
        with pytest.raises(ValueError, match="num_blocks"):
            BlockManager(bad, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)
    with pytest.raises(TypeError):
        BlockManager("4", 16)
    with pytest.raises(TypeError):
        BlockManager(4, 2.5)
    mgr = BlockManager(4, 4)
    with pytest.raises(ValueError):
        mgr.allocate("a", -1)
    with pytest.raises(TypeError):
        mgr.allocate("a", 2.0)
    assert "a" not in mgr
    mgr.allocate("a", 2)
    with pytest.raises(ValueError, match="already"):
        mgr.allocate("a", 1)
    with pytest.raises(ValueError):
        mgr.append("a", -1)
    with pytest.raises(ValueError):
        mgr.fork("a", "a")
    for call in (
        lambda: mgr.append("x"),
        lambda: mgr.can_append("x"),
        lambda: mgr.free("x"),
        lambda: mgr.fork("x", "y"),
        lambda: mgr.block_table("x"),
        lambda: mgr.seq_len("x"),
        lambda: mgr.slot_mapping("x", [0]),
    ):
        with pytest.raises(ValueError, match="unknown"):
            call()
    mgr.free("a")
    with pytest.raises(ValueError, match="unknown"):
        mgr.free("a")  # a double free is an error, not a second set of free blocks
    assert mgr.num_free_blocks == 4
    with pytest.raises(ValueError):
        mgr.ref_count(4)


# -- the seeded workload the benchmarks use (provided, in tiny_llm_common) --------------------
def test_workload_is_seeded_long_tailed_and_bounded():
    from tiny_llm_common.workload import make_workload

    reqs = make_workload(2000, seed=3, max_len=512, shared_prefix_len=20, arrival_rate=4.0)
    assert reqs == make_workload(2000, seed=3, max_len=512, shared_prefix_len=20, arrival_rate=4.0)
    assert reqs != make_workload(2000, seed=4, max_len=512, shared_prefix_len=20, arrival_rate=4.0)
    prompt = np.array([r.prompt_len for r in reqs])
    output = np.array([r.output_len for r in reqs])
    assert prompt.min() > 20 and output.min() >= 1 and (prompt + output).max() <= 512
    assert all(
        r.shared_prefix_len == 20 and r.total_len == r.prompt_len + r.output_len for r in reqs
    )
    assert np.mean(output) > np.median(output), "a long tail: the mean is above the median"
    arrivals = np.array([r.arrival for r in reqs])
    assert np.all(np.diff(arrivals) >= 0) and 400 < arrivals[-1] < 600  # ~2000 / 4.0 per second
    assert all(r.arrival == 0.0 for r in make_workload(5, seed=0))
    with pytest.raises(ValueError):
        make_workload(-1, seed=0)
    with pytest.raises(ValueError):
        make_workload(5, seed=0, max_len=100, shared_prefix_len=99)


# -- random operations against a model ---------------------------------------------------------
def check_invariants(mgr, lens, family):
    """lens: seq id -> tokens; family: seq id -> the sequence its fork chain started from."""
    bs, n_blocks = mgr.block_size, mgr.num_blocks
    tables = {s: check_table(mgr, s, n) for s, n in lens.items()}
    holders: dict[int, list[tuple[object, int]]] = {}
    for s, table in tables.items():
        for i, b in enumerate(table):
            holders.setdefault(b, []).append((s, i))
    for b in range(n_blocks):  # reference counts == holders, and no block is lost
        assert mgr.ref_count(b) == len(holders.get(b, [])), f"block {b}: holders {holders.get(b)}"
    assert mgr.num_used_blocks == len(holders)
    assert mgr.num_free_blocks == n_blocks - len(holders)
    filled = {}
    for b, hs in holders.items():
        s0, i0 = hs[0]
        filled[b] = min(bs, lens[s0] - i0 * bs)
        for s, i in hs[1:]:  # sharing only ever comes from fork: the same prefix, the same fill
            assert family[s] == family[s0], f"block {b} held by unrelated {s0!r} and {s!r}"
            assert i == i0 and tables[s][: i + 1] == tables[s0][: i + 1], (b, hs)
            assert min(bs, lens[s] - i * bs) == filled[b], f"block {b} filled differently {hs}"
    u = mgr.usage()
    stored = sum(filled.values())
    assert (u.used_blocks, u.free_blocks) == (len(holders), n_blocks - len(holders))
    assert (u.allocated_slots, u.stored_tokens) == (len(holders) * bs, stored)
    assert u.internal_fragmentation == len(holders) * bs - stored


SIZE = st.integers(0, 30)  # tenths of a block: 0 to 3 blocks' worth of tokens
PICK = st.integers(0, 1000)  # which live sequence (modulo how many there are)


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / decode / extend / fork / free on a small pool; a model that knows only
    each sequence's length and fork family checks the manager after every step."""

    steps = 0  # operations run, over all examples

    @initialize(num_blocks=st.integers(1, 48), block_size=st.integers(1, 8))
    def make_pool(self, num_blocks, block_size):
        self.mgr = BlockManager(num_blocks, block_size)
        self.lens, self.family, self.next_id = {}, {}, 0

    def tokens(self, tenths):
        return tenths * self.mgr.block_size // 10

    def pick(self, pick):
        return list(self.lens)[pick % len(self.lens)]

    @rule(size=SIZE)
    def allocate(self, size):
        mgr, n, seq = self.mgr, self.tokens(size), self.next_id
        self.next_id += 1
        BlockManagerMachine.steps += 1
        fits = mgr.blocks_needed(n) <= mgr.num_free_blocks
        assert mgr.can_allocate(n) == fits
        if fits:
            mgr.allocate(seq, n)
            self.lens[seq], self.family[seq] = n, seq
        else:
            before = snapshot(mgr, self.lens, [seq])
            with pytest.raises(OutOfBlocksError):
                mgr.allocate(seq, n)
            assert snapshot(mgr, self.lens, [seq]) == before, "a failed allocate changed state"

    def grow(self, seq, n):
        mgr, bs = self.mgr, self.mgr.block_size
        BlockManagerMachine.steps += 1
        length, table = self.lens[seq], mgr.block_table(seq)
        cow = n > 0 and length % bs != 0 and mgr.ref_count(table[-1]) > 1
        need = math.ceil((length + n) / bs) - len(table) + cow
        fits = need <= mgr.num_free_blocks
        assert mgr.can_append(seq, n) == fits, f"len {length} + {n}, copy {cow}, {need} blocks"
        if not fits:
            before = snapshot(mgr, self.lens)
            with pytest.raises(OutOfBlocksError):
                mgr.append(seq, n)
            assert snapshot(mgr, self.lens) == before, "a failed append changed state"
            return
        copies = mgr.append(seq, n)
        self.lens[seq] += n
        new, kept = mgr.block_table(seq), length // bs  # full blocks never move
        assert new[:kept] == table[:kept]
        if cow:
            assert new[kept] != table[kept] and copies == [(table[kept], new[kept])]
        else:
            assert copies == [] and new[: len(table)] == table

    @precondition(lambda self: self.lens)
    @rule(pick=PICK)
    def decode(self, pick):
        self.grow(self.pick(pick), 1)

    @precondition(lambda self: self.lens)
    @rule(pick=PICK, size=SIZE)
    def extend(self, pick, size):
        self.grow(self.pick(pick), self.tokens(size) // 2)

    @precondition(lambda self: self.lens)
    @rule(pick=PICK)
    def fork(self, pick):
        parent, child, used = self.pick(pick), self.next_id, self.mgr.num_used_blocks
        self.next_id += 1
        BlockManagerMachine.steps += 1
        self.mgr.fork(parent, child)
        assert self.mgr.block_table(child) == self.mgr.block_table(parent)
        assert self.mgr.num_used_blocks == used, "fork took new blocks"
        self.lens[child], self.family[child] = self.lens[parent], self.family[parent]

    def drop(self, seq):
        BlockManagerMachine.steps += 1
        self.mgr.free(seq)
        del self.lens[seq]
        assert seq not in self.mgr

    @precondition(lambda self: self.lens)
    @rule(pick=PICK)
    def free(self, pick):
        self.drop(self.pick(pick))

    @precondition(lambda self: self.lens)
    @rule()
    def preempt(self):  # what a scheduler does when the pool is full: drop the newest sequence
        self.drop(max(self.lens))

    @invariant()
    def consistent(self):
        check_invariants(self.mgr, self.lens, self.family)

    def teardown(self):
        if not hasattr(self, "mgr"):
            return
        for seq in list(self.lens):  # at the end every block comes back, once
            self.mgr.free(seq)
        n = self.mgr.num_blocks
        assert self.mgr.num_free_blocks == n
        assert sorted(self.mgr.allocate("all", n * self.mgr.block_size)) == list(range(n))


def test_random_operations_keep_every_invariant():
    # One pass through every method first, so that a method not written yet fails at once
    # instead of after hypothesis has spent a minute shrinking the failing example.
    mgr = BlockManager(4, 2)
    mgr.allocate(0, 3)
    mgr.fork(0, 1)
    mgr.append(1)
    mgr.free(0)
    mgr.usage()
    BlockManagerMachine.steps = 0
    run_state_machine_as_test(
        BlockManagerMachine,
        settings=settings(
            max_examples=150,  # about 13,000 operations in all (short runs shrink fast)
            stateful_step_count=100,
            deadline=None,
            derandomize=True,
            database=None,
            report_multiple_bugs=False,
            phases=[Phase.generate, Phase.shrink],  # no "explain": it reruns a failure at length
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
    assert BlockManagerMachine.steps >= 10_000, f"only {BlockManagerMachine.steps} operations ran"
