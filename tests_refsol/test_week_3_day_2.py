"""Week 3 Day 2: attention through block tables (src/tiny_llm/paged_attention.py).

Oracles are float64 NumPy: each sequence's keys and values are read block by block through its
table, in a plain Python loop, and attended with an explicit softmax. The random cases use
shuffled, non-contiguous block ids, two sequences that share their first blocks (a common
prefix), -1 padding, stale finite data in every slot no sequence owns, and lazy (not yet
evaluated) MLX inputs. Contexts cover 1, block_size - 1, block_size, block_size + 1 and ~2000.

Tasks 1-3 (pure MLX): gather_kv_batch / gather_kv, paged_attention_mlx, reshape_and_cache_mlx.
The kernel tasks' tests come at the end of the file and reuse `make_case` and the oracles.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest

from tiny_llm_common.grading import TOL, assert_allclose, solution_name

pa = importlib.import_module(f"{solution_name()}.paged_attention")

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
LONG = 1999  # the long context: 125 blocks of 16 (the last one not full)


def rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """x as `dtype` would store it, back in float64: the oracle sees the inputs MLX sees."""
    return np.array(mx.array(x.astype(np.float32)).astype(DTYPES[dtype]).astype(mx.float32)).astype(
        np.float64
    )


@dataclass
class PagedCase:
    """One random paged-attention problem; NumPy float64 values exactly representable in
    `dtype`. `mx_args()` gives the MLX arguments of paged_attention(...) as lazy arrays."""

    query: np.ndarray  # [B, H_q, D]
    key_cache: np.ndarray  # [num_blocks, block_size, H_kv, D]
    value_cache: np.ndarray
    block_tables: np.ndarray  # [B, max_blocks] int32, -1 padded
    context_lens: np.ndarray  # [B] int32
    scale: float
    dtype: str

    @property
    def block_size(self) -> int:
        return self.key_cache.shape[1]

    def mx_args(self):
        dt = DTYPES[self.dtype]

        def lazy(x, dtype):  # an op, not a materialised array: the callee must not assume eval
            return mx.array(x).astype(dtype)

        return (
            lazy(self.query.astype(np.float32), dt),
            lazy(self.key_cache.astype(np.float32), dt),
            lazy(self.value_cache.astype(np.float32), dt),
            lazy(self.block_tables, mx.int32),
            lazy(self.context_lens, mx.int32),
            self.scale,
        )


def make_case(
    seed: int,
    contexts: list[int],
    *,
    h_q: int = 8,
    h_kv: int = 2,
    d: int = 64,
    block_size: int = 16,
    dtype: str = "float32",
    shared_blocks: int = 1,
    spare_blocks: int = 3,
) -> PagedCase:
    """Sequences of `contexts` tokens in a shuffled pool. Sequence 1 shares sequence 0's first
    `shared_blocks` full blocks (when both are long enough); `spare_blocks` blocks belong to no
    one; every table has at least one -1 at its end."""
    rng = np.random.default_rng(seed)
    need = [-(-n // block_size) for n in contexts]
    shared = 0
    if len(contexts) > 1:
        shared = min(shared_blocks, contexts[0] // block_size, contexts[1] // block_size)
    num_blocks = sum(need) - shared + spare_blocks
    ids = iter(rng.permutation(num_blocks).tolist())
    tables = []
    for b, n in enumerate(need):
        row = tables[0][:shared] if b == 1 else []
        row = row + [next(ids) for _ in range(n - len(row))]
        tables.append(row)
    width = max(need) + 1
    block_tables = np.array([t + [-1] * (width - len(t)) for t in tables], dtype=np.int32)
    shape = (num_blocks, block_size, h_kv, d)
    # Slots no sequence owns hold stale but finite data, as a freed block does.
    return PagedCase(
        query=rounded(rng.standard_normal((len(contexts), h_q, d)), dtype),
        key_cache=rounded(rng.standard_normal(shape), dtype),
        value_cache=rounded(rng.standard_normal(shape), dtype),
        block_tables=block_tables,
        context_lens=np.array(contexts, dtype=np.int32),
        scale=d**-0.5,
        dtype=dtype,
    )


def oracle_gather(case: PagedCase, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequence b's keys and values [H_kv, context, D], token by token through its table."""
    n, bs = int(case.context_lens[b]), case.block_size
    rows = [(case.block_tables[b, t // bs], t % bs) for t in range(n)]
    k = np.stack([case.key_cache[blk, off] for blk, off in rows], axis=1)
    v = np.stack([case.value_cache[blk, off] for blk, off in rows], axis=1)
    return k, v


def oracle_attention(case: PagedCase) -> np.ndarray:
    """[B, H_q, D] float64: each query head over its KV head's keys (h // (H_q / H_kv))."""
    batch, h_q, _ = case.query.shape
    group = h_q // case.key_cache.shape[2]
    out = np.zeros_like(case.query)
    for b in range(batch):
        k, v = oracle_gather(case, b)
        for h in range(h_q):
            s = k[h // group] @ case.query[b, h] * case.scale
            p = np.exp(s - s.max())
            out[b, h] = (p / p.sum()) @ v[h // group]
    return out


def oracle_write(key, value, key_cache, value_cache, slots):
    """New caches with token t written at flat slot slots[t]; negative slots skipped."""
    kc, vc = key_cache.copy(), value_cache.copy()
    n, bs = kc.shape[:2]
    fk, fv = kc.reshape(n * bs, *kc.shape[2:]), vc.reshape(n * bs, *vc.shape[2:])
    for t, s in enumerate(slots):
        if 0 <= s < n * bs:
            fk[s], fv[s] = key[t], value[t]
    return kc, vc


SMALL = [1, 15, 16, 17]  # 1, block_size - 1, block_size, block_size + 1
SIZES = [SMALL, [LONG, 33, 1, 16]]


# --- Task 1: gather ---------------------------------------------------------------------------
@pytest.mark.parametrize("contexts", SIZES, ids=["small", "long"])
def test_gather_kv_reads_blocks_in_table_order(contexts):
    case = make_case(1, contexts, dtype="float16")
    _, kc, vc, tables, _, _ = case.mx_args()
    for b, n in enumerate(contexts):
        k, v = pa.gather_kv(kc, vc, tables[b], n)
        ek, ev = oracle_gather(case, b)
        assert_allclose(k, ek, atol=0, what=f"gather_kv keys, sequence {b} ({n} tokens)")
        assert_allclose(v, ev, atol=0, what=f"gather_kv values, sequence {b} ({n} tokens)")


def test_gather_kv_batch_is_every_row_padded():
    case = make_case(2, SMALL, h_q=4, h_kv=4, d=64)
    _, kc, vc, tables, _, _ = case.mx_args()
    k, v = pa.gather_kv_batch(kc, vc, tables)
    width = case.block_tables.shape[1] * case.block_size
    assert k.shape == v.shape == (len(SMALL), 4, width, 64), f"gather_kv_batch shape {k.shape}"
    for b, n in enumerate(SMALL):
        ek, ev = oracle_gather(case, b)
        assert_allclose(k[b, :, :n], ek, atol=0, what=f"gathered keys of row {b}")
        assert_allclose(v[b, :, :n], ev, atol=0, what=f"gathered values of row {b}")


def test_gather_kv_length_zero_and_host_row():
    case = make_case(3, [20])
    _, kc, vc, _, _, _ = case.mx_args()
    k, _ = pa.gather_kv(kc, vc, case.block_tables[0].tolist(), 0)
    assert k.shape == (2, 0, 64)
    k, _ = pa.gather_kv(kc, vc, case.block_tables[0].tolist(), 20)  # a Python list works too
    assert_allclose(k, oracle_gather(case, 0)[0], atol=0, what="gather_kv from a list")


# --- Task 2: paged attention ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("contexts", SIZES, ids=["small", "long"])
def test_paged_attention_mlx_matches_numpy(contexts, d, dtype):
    case = make_case(10 + d, contexts, d=d, dtype=dtype)
    out = pa.paged_attention_mlx(*case.mx_args())
    assert out.dtype == DTYPES[dtype], f"output is {out.dtype}, the inputs {dtype}"
    tol = TOL[dtype]
    assert_allclose(
        out, oracle_attention(case), atol=tol, rtol=tol, what=f"paged attention {dtype}"
    )


@pytest.mark.parametrize("h_q,h_kv", [(4, 4), (6, 1), (8, 2)], ids=["MHA", "MQA", "GQA"])
def test_paged_attention_mlx_head_groups(h_q, h_kv):
    case = make_case(4, [40, 17, 3], h_q=h_q, h_kv=h_kv, block_size=8)
    assert_allclose(
        pa.paged_attention_mlx(*case.mx_args()), oracle_attention(case), atol=TOL["float32"]
    )


def test_shared_blocks_and_stale_slots_do_not_leak():
    """Two sequences read the same prefix blocks; what lies past a context, in -1 padding's
    stand-in block or in unowned blocks changes nothing."""
    case = make_case(5, [40, 35, 2], block_size=16, shared_blocks=2)
    t = case.block_tables
    assert (t[0, :2] == t[1, :2]).all() and t[0, 2] != t[1, 2], "the case should share 2 blocks"
    expected = oracle_attention(case)
    assert_allclose(pa.paged_attention_mlx(*case.mx_args()), expected, atol=TOL["float32"])
    owned = np.zeros(case.key_cache.shape[:2], dtype=bool)  # slots that hold a live token
    for b, n in enumerate(case.context_lens):
        for pos in range(n):
            owned[t[b, pos // 16], pos % 16] = True
    rng = np.random.default_rng(0)
    for cache in (case.key_cache, case.value_cache):
        cache[~owned] = np.round(rng.standard_normal(cache[~owned].shape) * 20)
    assert_allclose(pa.paged_attention_mlx(*case.mx_args()), expected, atol=TOL["float32"])


def test_paged_attention_mlx_takes_host_tables():
    case = make_case(6, SMALL)
    q, kc, vc, _, _, scale = case.mx_args()
    out = pa.paged_attention_mlx(
        q, kc, vc, case.block_tables.tolist(), case.context_lens.tolist(), scale
    )
    assert_allclose(out, oracle_attention(case), atol=TOL["float32"], what="list tables")


def test_unchecked_arrays_stay_inside_the_pool():
    """mx.array tables are not read on the host: an empty context gives zeros, a bad id is
    clipped into the pool (a wrong answer, never a read outside it), other rows are exact."""
    case = make_case(7, [5, 9])
    q, kc, vc, tables, _, scale = case.mx_args()
    out = pa.paged_attention_mlx(q, kc, vc, tables, mx.array([0, 9], dtype=mx.int32), scale)
    assert_allclose(out[0], np.zeros_like(case.query[0]), atol=0, what="empty context")
    assert_allclose(out[1], oracle_attention(case)[1], atol=TOL["float32"], what="other row")
    bad = mx.array([[10**6, -1], [-(10**6), -1]], dtype=mx.int32)
    out = pa.paged_attention_mlx(q, kc, vc, bad, mx.array([5, 9], dtype=mx.int32), scale)
    assert np.isfinite(np.array(out)).all(), "bad ids must not read outside the pool"


# --- Task 3: reshape_and_cache ----------------------------------------------------------------
def write_case(seed, dtype, n_tokens=12, skips=3):
    rng = np.random.default_rng(seed)
    nb, bs, h, d = 6, 4, 2, 64
    key = rounded(rng.standard_normal((n_tokens, h, d)), dtype)
    value = rounded(rng.standard_normal((n_tokens, h, d)), dtype)
    kc = rounded(rng.standard_normal((nb, bs, h, d)), dtype)
    vc = rounded(rng.standard_normal((nb, bs, h, d)), dtype)
    slots = rng.permutation(nb * bs)[:n_tokens].astype(np.int32)
    slots[rng.permutation(n_tokens)[:skips]] = -1  # padding tokens
    return key, value, kc, vc, slots


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("host_slots", [False, True], ids=["mx-slots", "list-slots"])
def test_reshape_and_cache_mlx_writes_each_token_to_its_slot(dtype, host_slots):
    key, value, kc, vc, slots = write_case(20, dtype)
    dt = DTYPES[dtype]
    args = [mx.array(a.astype(np.float32)).astype(dt) for a in (key, value, kc, vc)]
    mapping = slots.tolist() if host_slots else mx.array(slots) * 1
    new_k, new_v = pa.reshape_and_cache_mlx(*args, mapping)
    ek, ev = oracle_write(key, value, kc, vc, slots)
    assert new_k.dtype == dt and new_k.shape == kc.shape
    assert_allclose(new_k, ek, atol=0, what="key cache after the write")
    assert_allclose(new_v, ev, atol=0, what="value cache after the write")


@pytest.mark.parametrize("slots", [[-1, -1, -1], [-1, 7, -1, 30], [-1, 0, 5], [10**6, 3, -5]])
def test_reshape_and_cache_mlx_skips_slots_outside_the_pool(slots):
    """Unchecked mx.array slots: negative or past the pool means skip, never a wrapped write."""
    key, value, kc, vc, _ = write_case(21, "float32", n_tokens=len(slots), skips=0)
    args = [mx.array(a.astype(np.float32)) for a in (key, value, kc, vc)]
    new_k, new_v = pa.reshape_and_cache_mlx(*args, mx.array(slots, dtype=mx.int32))
    ek, ev = oracle_write(key, value, kc, vc, slots)
    assert_allclose(new_k, ek, atol=0, what=f"key cache after writing to {slots}")
    assert_allclose(new_v, ev, atol=0, what=f"value cache after writing to {slots}")


def test_write_then_attend_round_trip():
    """Store a 37-token sequence with slot_mapping from its table, then attend over it."""
    rng = np.random.default_rng(22)
    n, bs, h_kv, d = 37, 8, 2, 64
    table = rng.permutation(9)[:5].tolist()  # 5 blocks of a 9-block pool
    slots = [table[t // bs] * bs + t % bs for t in range(n)]
    key = rng.standard_normal((n, h_kv, d)).astype(np.float32)
    value = rng.standard_normal((n, h_kv, d)).astype(np.float32)
    kc = vc = mx.zeros((9, bs, h_kv, d))
    kc, vc = pa.reshape_and_cache_mlx(mx.array(key), mx.array(value), kc, vc, slots)
    query = rng.standard_normal((1, 4, d)).astype(np.float32)
    out = pa.paged_attention_mlx(mx.array(query), kc, vc, [table], [n], d**-0.5)
    s = np.einsum("hgd,thd->hgt", query[0].reshape(h_kv, 2, d), key) * d**-0.5
    p = np.exp(s - s.max(-1, keepdims=True))
    expected = np.einsum("hgt,thd->hgd", p / p.sum(-1, keepdims=True), value).reshape(1, 4, d)
    assert_allclose(out, expected, atol=TOL["float32"], what="attention over written tokens")


# --- Bad input: a clear exception before any work ---------------------------------------------
def _attention_args():
    q, kc, vc, tables, lens, scale = make_case(30, [5, 20], block_size=8).mx_args()
    return dict(
        query=q, key_cache=kc, value_cache=vc, block_tables=tables, context_lens=lens, scale=scale
    )


BAD_ATTENTION = {
    "query 4-D": (ValueError, dict(query=mx.zeros((2, 8, 1, 64)))),
    "query dtype": (TypeError, dict(query=mx.zeros((2, 8, 64), dtype=mx.float16))),
    "heads not a multiple": (ValueError, dict(query=mx.zeros((2, 7, 64)))),
    "head dim": (ValueError, dict(query=mx.zeros((2, 8, 32)))),
    "batch": (ValueError, dict(query=mx.zeros((3, 8, 64)))),
    "int cache": (TypeError, dict(key_cache=mx.zeros((5, 8, 2, 64), dtype=mx.int32))),
    "caches differ": (ValueError, dict(value_cache=mx.zeros((6, 8, 2, 64)))),
    "cache 3-D": (ValueError, dict(key_cache=mx.zeros((5, 8, 128)))),
    "float tables": (TypeError, dict(block_tables=mx.zeros((2, 4)))),
    "int64 lens": (TypeError, dict(context_lens=mx.array([5, 20], dtype=mx.int64))),
    "tables 1-D": (ValueError, dict(block_tables=mx.array([0, 1], dtype=mx.int32))),
    "host id past pool": (ValueError, dict(block_tables=[[0, -1, -1], [1, 2, 99]])),
    "host -1 in use": (ValueError, dict(block_tables=[[0, -1, -1], [1, -1, 3]])),
    "host repeated id": (ValueError, dict(block_tables=[[0, -1, -1], [1, 1, 3]])),
    "host context 0": (ValueError, dict(context_lens=[0, 20])),
    "host context past table": (ValueError, dict(context_lens=[5, 25])),
    "float list": (TypeError, dict(context_lens=[5.0, 20.0])),
}


@pytest.mark.parametrize("what", list(BAD_ATTENTION))
def test_paged_attention_mlx_rejects_bad_input(what):
    error, change = BAD_ATTENTION[what]
    args = _attention_args()
    if "host" in what and "block_tables" not in change:
        args["block_tables"] = [[0, -1, -1], [1, 2, 3]]
    with pytest.raises(error):
        pa.paged_attention_mlx(**{**args, **change})


def test_gather_kv_rejects_bad_input():
    kc = vc = mx.zeros((4, 8, 2, 16))
    row = mx.array([2, 0, -1], dtype=mx.int32)
    for length, error in ((25, ValueError), (-1, ValueError), (3.0, TypeError), (True, TypeError)):
        with pytest.raises(error):
            pa.gather_kv(kc, vc, row, length)
    with pytest.raises(ValueError):
        pa.gather_kv(kc, vc, [2, 4, -1], 10)  # a host row naming block 4 of a 4-block pool
    with pytest.raises(ValueError):
        pa.gather_kv(kc, vc, row[None], 3)  # [1, max_blocks] is not one row


def test_reshape_and_cache_mlx_rejects_bad_input():
    kc = vc = mx.zeros((4, 8, 2, 16))
    x = mx.zeros((3, 2, 16))
    call = pa.reshape_and_cache_mlx
    with pytest.raises(ValueError):
        call(x, x, kc, vc, [0, 1, 32])  # slot 32 of a 32-slot pool
    with pytest.raises(ValueError):
        call(x, x, kc, vc, [5, -1, 5])  # two tokens into one slot
    with pytest.raises(ValueError):
        call(x, x, kc, vc, [0, 1])  # 3 tokens, 2 slots
    with pytest.raises(ValueError):
        call(mx.zeros((3, 4, 8)), x, kc, vc, [0, 1, 2])  # heads and head dim of another cache
    with pytest.raises(TypeError):
        call(x.astype(mx.float16), x, kc, vc, [0, 1, 2])
    with pytest.raises(TypeError):
        call(x, x, kc, vc, mx.array([0, 1, 2], dtype=mx.uint32))


# --- Kernel tasks ------------------------------------------------------------------------------
# The tests of the extension's `paged_attention` / `reshape_and_cache` go below: build cases with
# `make_case(...)` (kernel head dims 64 / 128), feed `case.mx_args()` (lazy inputs) and compare
# with `oracle_attention(case)` / `oracle_write(...)` under TOL[case.dtype].


# Task 4 (src/extensions/src/paged_attention_cpu.cpp, attend_item): the CPU kernel, through
# `paged_attention(...)` with lazy inputs -- the tables too (`* 1`), so the kernel's own checks
# run in its queued task. Task 5 (paged_attention.metal): the Metal kernel, through the commands
# the extension's eval_gpu would encode (`_plan_paged_attention`), replayed on the .metal source
# by the Metal-on-CPU harness (metalsim). Task 6 (reshape_and_cache_cpu and the
# reshape_and_cache kernel): both paths likewise. On a Mac the real GPU runs as well.

LEARNER = solution_name() == "tiny_llm"
kernels = importlib.import_module(f"{solution_name()}.kernels")
KERNEL_DIMS = [64, 128]


def ext():
    return kernels.extension()._ext


def metal_source():
    return kernels.extension().SOURCE_DIR / "src" / "paged_attention.metal"


def lazy_args(case: PagedCase):
    """case.mx_args() with block_tables and context_lens made lazy as well."""
    q, kc, vc, tables, lens, scale = case.mx_args()
    return q, kc, vc, tables * 1, lens * 1, scale


def check_attention(out, case: PagedCase, what: str):
    # mx.eval first: an exception inside the kernel's task (a stub's "implement ..." included)
    # reaches Python only from mx.eval of this very array, not from np.array(out).
    mx.eval(out)
    assert out.dtype == DTYPES[case.dtype], f"{what}: output is {out.dtype}, inputs {case.dtype}"
    tol = TOL[case.dtype]
    assert_allclose(out, oracle_attention(case), atol=tol, rtol=tol, what=what)


# --- Task 4: the CPU kernel -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("d", KERNEL_DIMS)
@pytest.mark.parametrize("contexts", SIZES, ids=["small", "long"])
def test_kernel_cpu_matches_numpy(contexts, d, dtype):
    case = make_case(40 + d, contexts, d=d, dtype=dtype, shared_blocks=2)
    out = pa.paged_attention(*lazy_args(case), stream=mx.cpu)
    check_attention(out, case, f"CPU paged_attention {dtype}, D={d}, contexts {contexts}")


@pytest.mark.parametrize(
    "h_q,h_kv", [(4, 4), (6, 1), (8, 2), (20, 2)], ids=["MHA", "MQA", "GQA", "GQA-10"]
)
@pytest.mark.parametrize("block_size", [1, 8, 24, 64])
def test_kernel_cpu_heads_and_block_sizes(h_q, h_kv, block_size):
    contexts = [1, block_size - 1 or 2, block_size, block_size + 1, 3 * block_size + 5]
    case = make_case(41, contexts, h_q=h_q, h_kv=h_kv, block_size=block_size, dtype="float16")
    out = pa.paged_attention(*lazy_args(case), stream=mx.cpu)
    check_attention(out, case, f"CPU paged_attention H_q={h_q} H_kv={h_kv} block {block_size}")


def test_kernel_cpu_long_contexts():
    """Several thousand tokens: more than one partition per sequence on the CPU."""
    case = make_case(42, [5003, 4096, 257], h_q=4, h_kv=1, d=128, dtype="bfloat16")
    out = pa.paged_attention(*lazy_args(case), stream=mx.cpu)
    check_attention(out, case, "CPU paged_attention over 5003 / 4096 / 257 tokens")


def test_kernel_cpu_ignores_stale_slots_and_shares_blocks():
    case = make_case(43, [40, 35, 2], shared_blocks=2)
    expected = oracle_attention(case)
    owned = np.zeros(case.key_cache.shape[:2], dtype=bool)
    for b, n in enumerate(case.context_lens):
        for pos in range(n):
            owned[case.block_tables[b, pos // 16], pos % 16] = True
    rng = np.random.default_rng(1)
    for cache in (case.key_cache, case.value_cache):
        cache[~owned] = np.round(rng.standard_normal(cache[~owned].shape) * 20)
    out = pa.paged_attention(*lazy_args(case), stream=mx.cpu)
    mx.eval(out)
    assert_allclose(out, expected, atol=TOL["float32"], what="CPU kernel with stale slots")


def test_kernel_cpu_host_tables_and_compile():
    case = make_case(44, SMALL)
    q, kc, vc, _, _, scale = case.mx_args()
    tables, lens = case.block_tables.tolist(), case.context_lens.tolist()
    out = pa.paged_attention(q, kc, vc, tables, lens, scale, stream=mx.cpu)
    check_attention(out, case, "CPU paged_attention from Python lists")
    step = mx.compile(lambda q, kc, vc, t, n: pa.paged_attention(q, kc, vc, t, n, scale))
    t, n = mx.array(case.block_tables), mx.array(case.context_lens)
    check_attention(step(q, kc, vc, t, n), case, "compiled paged_attention")


def test_kernel_other_head_dims_use_the_mlx_version():
    case = make_case(45, SMALL, d=16)
    check_attention(pa.paged_attention(*lazy_args(case)), case, "paged_attention, D=16")


# --- Bad input: checked before the pool is read -----------------------------------------------
BAD_KERNEL = {
    **{k: v for k, v in BAD_ATTENTION.items() if k != "head dim"},
    "id past pool": (ValueError, dict(block_tables=mx.array([[0, -1, -1], [1, 2, 99]]))),
    "-1 in use": (ValueError, dict(block_tables=mx.array([[0, -1, -1], [1, -1, 3]]))),
    "context 0": (ValueError, dict(context_lens=mx.array([0, 20]))),
    "negative context": (ValueError, dict(context_lens=mx.array([-3, 20]))),
    "context past table": (ValueError, dict(context_lens=mx.array([5, 25]))),
}


@pytest.mark.parametrize("what", list(BAD_KERNEL))
def test_kernel_rejects_bad_input_before_running(what):
    """Wrong dtypes, ranks and head counts, and -- for tables that are host data or already
    computed -- bad block ids and lengths: a clear exception when the call is made."""
    error, change = BAD_KERNEL[what]
    args = _attention_args()
    args["block_tables"] = mx.array([[0, -1, -1], [1, 2, 3]])  # computed: checked at once
    args["context_lens"] = mx.array([5, 20])
    if "host" in what and "block_tables" not in change:
        args["block_tables"] = [[0, -1, -1], [1, 2, 3]]
    with pytest.raises(error):
        pa.paged_attention(**{**args, **change}, stream=mx.cpu)


def test_kernel_op_rejects_head_dims_it_has_no_kernel_for():
    kc = mx.zeros((4, 8, 2, 96))
    tables, lens = mx.array([[0, 1]]), mx.array([9])
    with pytest.raises(ValueError, match="head dim 96"):
        ext().paged_attention(mx.zeros((1, 4, 96)), kc, kc, tables, lens, 1.0)


@pytest.mark.parametrize(
    "tables,lens",
    [([[0, 9], [1, -1]], [10, 3]), ([[0, -1], [1, 2]], [9, 3]), ([[0, 1], [2, 3]], [0, 3])],
    ids=["id past pool", "-1 in use", "context 0"],
)
def test_kernel_cpu_checks_lazy_tables_in_its_task(tables, lens):
    """Tables still being computed cannot be checked when the node is built: the CPU task
    checks them before it reads any block and the error comes out of mx.eval."""
    kc = vc = mx.zeros((4, 8, 2, 64))
    q = mx.zeros((2, 4, 64))
    t = mx.array(tables, dtype=mx.int32) * 1
    n = mx.array(lens, dtype=mx.int32) * 1
    out = pa.paged_attention(q, kc, vc, t, n, 0.125, stream=mx.cpu)
    with pytest.raises(RuntimeError, match="paged_attention: (block_tables|context_lens)"):
        mx.eval(out)
    # MLX may report a task's error to a later evaluation, or not at all when the output is
    # read another way: whatever reads it must then see NaN, not what the memory held.
    out = pa.paged_attention(q, kc, vc, t * 1, n * 1, 0.125, stream=mx.cpu)
    assert_error_or(lambda: np.isnan(np.array(out + 1)).all(), "output after a failed check")
    ok = pa.paged_attention(q, kc, vc, mx.array([[0, 1], [2, 3]]) * 1, mx.array([9, 3]) * 1, 1.0)
    mx.eval(ok)  # the stream still works after the error


def assert_error_or(check, what: str):
    """`check()` is true, or evaluating it raises the kernel's RuntimeError."""
    try:
        ok = check()
    except RuntimeError:
        return
    assert ok, f"{what}: wrong (expected NaN / the old values, or the kernel's error)"


# --- Task 5: the Metal kernel, through the recorded dispatch ----------------------------------
def _metalsim():
    return pytest.importorskip("metalsim", reason="the Metal-on-CPU harness is missing")


def run_metal_attention(case: PagedCase, metal=None, args=None):
    """The commands eval_gpu would encode, replayed on the .metal file by metalsim."""
    from tiny_llm_common.metal_dispatch import run_plan, values_of

    _metalsim()
    plan = ext()._plan_paged_attention(*(args or lazy_args(case)))
    assert plan, "_plan_paged_attention recorded no dispatch"
    shape = case.query.shape
    (out,) = run_plan(metal or metal_source(), plan, None, [(shape, case.dtype)])
    return values_of(out, case.dtype)


def require_written(got, what: str):
    if np.isnan(got).all():
        raise AssertionError(
            f"{what}: every output is still NaN (unwritten)"
            + (
                ": Week 3 Day 2, task 5: implement paged_attention in "
                "src/extensions/src/paged_attention.metal"
                if LEARNER
                else ""
            )
        )


def check_metal(got, case: PagedCase, what: str):
    require_written(got, what)
    tol = TOL[case.dtype]
    assert_allclose(got, oracle_attention(case), atol=tol, rtol=tol, what=what)


@pytest.mark.metal
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("d", KERNEL_DIMS)
def test_kernel_metal_through_harness(d, dtype):
    case = make_case(50 + d, [*SMALL, 70], d=d, dtype=dtype, shared_blocks=2)
    check_metal(run_metal_attention(case), case, f"Metal paged_attention {dtype}, D={d}")


@pytest.mark.metal
@pytest.mark.parametrize("h_q,h_kv", [(6, 1), (4, 4), (20, 2)], ids=["MQA", "MHA", "GQA-10"])
@pytest.mark.parametrize("block_size", [8, 32])
def test_kernel_metal_heads_and_block_sizes(h_q, h_kv, block_size):
    contexts = [1, block_size - 1, block_size + 1, 2 * block_size + 3]
    case = make_case(51, contexts, h_q=h_q, h_kv=h_kv, block_size=block_size)
    check_metal(run_metal_attention(case), case, f"Metal H_q={h_q} H_kv={h_kv} block {block_size}")


@pytest.mark.metal
def test_kernel_metal_bad_values_give_nan_not_a_stray_read():
    """On the GPU nothing can raise: a sequence whose table names a block outside the pool
    (or whose length is impossible) gets NaN, without a read outside the pool (the harness
    turns one into an error); the other sequences are exact."""
    case = make_case(52, [20, 9, 5])
    q, kc, vc, _, _, scale = case.mx_args()
    tables = case.block_tables.copy()
    tables[0, 1] = 10**6
    lens = case.context_lens.copy()
    lens[2] = 10**4
    got = run_metal_attention(
        case, args=(q, kc, vc, mx.array(tables) * 1, mx.array(lens) * 1, scale)
    )
    require_written(got, "Metal paged_attention with bad tables")
    assert np.isnan(got[0]).all() and np.isnan(got[2]).all(), "bad sequences must be NaN"
    assert_allclose(got[1], oracle_attention(case)[1], atol=TOL["float32"], what="good row")


@pytest.mark.metal
def test_a_wrong_block_index_fails_the_metal_check(tmp_path):
    """The harness check can fail: a copy of the reference kernel that reads logical block j
    where the table says physical block table[j] is caught by the comparison above."""
    if LEARNER:
        pytest.skip("checks the grader against the reference kernel")
    source = metal_source().read_text()
    line = "const int block = table[j]; // logical block j -> physical block"
    assert line in source, "the reference kernel changed: update this test's mutation"
    broken = tmp_path / "paged_attention.metal"
    broken.write_text(source.replace(line, "const int block = j; // planted bug"))
    (tmp_path / "paged_attention_params.h").write_text(
        (metal_source().parent / "paged_attention_params.h").read_text()
    )
    case = make_case(53, [20, 40])
    with pytest.raises(AssertionError, match="Metal paged_attention"):
        check_metal(run_metal_attention(case, metal=broken), case, "Metal paged_attention")


# --- Task 6: reshape_and_cache, CPU and Metal -------------------------------------------------
def write_args(key, value, kc, vc, slots, dtype):
    dt = DTYPES[dtype]
    lazy = [mx.array(a.astype(np.float32)).astype(dt) for a in (key, value, kc, vc)]
    return (*lazy, mx.array(slots) * 1)


def _unwritten_hint(got, old) -> str:
    if LEARNER and np.array_equal(np.asarray(got, np.float64), old):
        return ": Week 3 Day 2, task 6: implement reshape_and_cache (CPU and Metal) in src/extensions/src/"
    return ""


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_reshape_and_cache_kernel_cpu(dtype):
    key, value, kc, vc, slots = write_case(60, dtype)
    new_k, new_v = pa.reshape_and_cache(
        *write_args(key, value, kc, vc, slots, dtype), stream=mx.cpu
    )
    mx.eval(new_k, new_v)  # a task's exception reaches Python only from mx.eval
    ek, ev = oracle_write(key, value, kc, vc, slots)
    assert new_k.dtype == DTYPES[dtype] and new_k.shape == kc.shape
    assert_allclose(new_k, ek, atol=0, what="key cache after the CPU write")
    assert_allclose(new_v, ev, atol=0, what="value cache after the CPU write")


def _address(x: mx.array) -> int:
    return np.asarray(x).__array_interface__["data"][0]


def test_reshape_and_cache_kernel_writes_in_place_only_when_it_may():
    """Rebinding the caches lets the write reuse their memory (T rows written, no copy of the
    pool); a cache still referenced elsewhere is left as it was (MLX arrays are values)."""
    rng = np.random.default_rng(61)
    kc, vc = (
        mx.array(rng.standard_normal((64, 16, 2, 64)).astype(np.float32)),
        mx.zeros((64, 16, 2, 64)),
    )
    mx.eval(kc, vc)
    before, start = np.array(kc), _address(kc)
    key = mx.array(rng.standard_normal((3, 2, 64)).astype(np.float32))
    kc, vc = pa.reshape_and_cache(key, key, kc, vc, [5, 700, 1023], stream=mx.cpu)
    mx.eval(kc, vc)
    assert _address(kc) == start, "the rebound cache was copied instead of written in place"
    held = kc
    new_k, _ = pa.reshape_and_cache(key * 2, key, kc, vc, [6, 7, 8], stream=mx.cpu)
    mx.eval(new_k)
    expected = before.reshape(1024, 2, 64)
    expected[[5, 700, 1023]] = np.array(key)
    assert_allclose(held.reshape(1024, 2, 64), expected, atol=0, what="the cache still held")
    expected[[6, 7, 8]] = np.array(key) * 2
    assert_allclose(new_k.reshape(1024, 2, 64), expected, atol=0, what="the new cache")


def test_reshape_and_cache_kernel_broadcast_cache():
    """A cache that is a broadcast view (mx.zeros is one) is copied to real memory first."""
    key = mx.ones((2, 2, 64))
    kc, vc = pa.reshape_and_cache(
        key, key, mx.zeros((4, 8, 2, 64)), mx.zeros((4, 8, 2, 64)), [3, 31]
    )
    mx.eval(kc)
    expected = np.zeros((32, 2, 64))
    expected[[3, 31]] = 1
    assert_allclose(kc.reshape(32, 2, 64), expected, atol=0, what="write into mx.zeros")


def test_reshape_and_cache_kernel_bad_input():
    kc = vc = mx.zeros((4, 8, 2, 64))
    x = mx.zeros((3, 2, 64))
    call = pa.reshape_and_cache
    for slots in ([0, 1, 32], [5, -1, 5], mx.array([0, 40, 1]), [0, 1]):
        with pytest.raises(ValueError):
            call(x, x, kc, vc, slots, stream=mx.cpu)
    with pytest.raises(ValueError):
        call(mx.zeros((3, 4, 8)), x, kc, vc, [0, 1, 2])
    with pytest.raises(TypeError):
        call(x.astype(mx.float16), x, kc, vc, [0, 1, 2])
    with pytest.raises(TypeError):
        call(x, x, kc, vc, mx.array([0, 1, 2], dtype=mx.uint32))
    new_k, _ = call(x, x, kc, vc, mx.array([0, 40, 1]) * 1, stream=mx.cpu)  # checked in the task
    with pytest.raises(RuntimeError, match="reshape_and_cache: slot_mapping"):
        mx.eval(new_k)
    old = mx.ones((4, 8, 2, 64)) * 3
    mx.eval(old)
    new_k, _ = call(x, x, old, old, mx.array([0, 40, 1]) * 1, stream=mx.cpu)
    assert_error_or(lambda: (np.array(new_k + 0) == 3).all(), "cache after a failed write")


@pytest.mark.metal
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("view", ["contiguous", "transposed"])
def test_reshape_and_cache_kernel_metal_through_harness(dtype, view):
    from tiny_llm_common.metal_dispatch import run_plan, values_of

    _metalsim()
    key, value, kc, vc, slots = write_case(62, dtype)
    args = list(write_args(key, value, kc, vc, slots, dtype))
    if view == "transposed":  # a cache that is a strided view: the copy must follow strides
        args[2] = mx.array(kc.transpose(1, 0, 2, 3).astype(np.float32)).astype(DTYPES[dtype])
        args[2] = args[2].transpose(1, 0, 2, 3)
    plan = ext()._plan_reshape_and_cache(*args)
    outs = run_plan(metal_source(), plan, None, [(kc.shape, dtype), (vc.shape, dtype)])
    ek, ev = oracle_write(key, value, kc, vc, slots)
    for got, expected, old, name in ((outs[0], ek, kc, "key"), (outs[1], ev, vc, "value")):
        got = values_of(got, dtype)
        assert_allclose(
            got,
            expected,
            atol=0,
            what=f"Metal {name} cache after the write" + _unwritten_hint(got, old),
        )


# --- Both kernels together --------------------------------------------------------------------
def test_kernels_decode_loop():
    """Write a 37-token prompt, then decode 20 tokens one at a time, rebinding the caches each
    step as the paged cache does; attention after every step matches the oracle."""
    rng = np.random.default_rng(63)
    bs, h_kv, d, n_blocks = 8, 2, 64, 16
    table = rng.permutation(n_blocks)[:8].tolist()
    slot = lambda t: table[t // bs] * bs + t % bs  # noqa: E731
    keys = rng.standard_normal((57, h_kv, d)).astype(np.float32)
    values = rng.standard_normal((57, h_kv, d)).astype(np.float32)
    kc = vc = mx.zeros((n_blocks, bs, h_kv, d))
    kc, vc = pa.reshape_and_cache(
        mx.array(keys[:37]), mx.array(values[:37]), kc, vc, [slot(t) for t in range(37)]
    )
    for n in range(38, 58):
        k, v = mx.array(keys[n - 1 : n]), mx.array(values[n - 1 : n])
        kc, vc = pa.reshape_and_cache(k, v, kc, vc, mx.array([slot(n - 1)], dtype=mx.int32))
        q = rng.standard_normal((1, 4, d)).astype(np.float32)
        out = pa.paged_attention(
            mx.array(q), kc, vc, mx.array([table], dtype=mx.int32), mx.array([n]), d**-0.5
        )
        mx.eval(out)
        s = np.einsum("hgd,thd->hgt", q[0].reshape(h_kv, 2, d), keys[:n]) * d**-0.5
        p = np.exp(s - s.max(-1, keepdims=True))
        expected = np.einsum("hgt,thd->hgd", p / p.sum(-1, keepdims=True), values[:n])
        assert_allclose(out, expected.reshape(1, 4, d), atol=TOL["float32"], what=f"step {n}")


# --- On a Mac: the real GPU -------------------------------------------------------------------
needs_metal = pytest.mark.skipif(
    not mx.metal.is_available(), reason="no Metal GPU here (the harness tests cover Metal)"
)


@needs_metal
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("d", KERNEL_DIMS)
def test_gpu_paged_attention(d, dtype):
    case = make_case(70 + d, [*SMALL, LONG], d=d, dtype=dtype)
    check_attention(pa.paged_attention(*lazy_args(case), stream=mx.gpu), case, "GPU kernel")


@needs_metal
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_gpu_reshape_and_cache(dtype):
    key, value, kc, vc, slots = write_case(71, dtype)
    new_k, new_v = pa.reshape_and_cache(
        *write_args(key, value, kc, vc, slots, dtype), stream=mx.gpu
    )
    ek, ev = oracle_write(key, value, kc, vc, slots)
    assert_allclose(new_k, ek, atol=0, what="GPU key cache")
    assert_allclose(new_v, ev, atol=0, what="GPU value cache")
