"""Week 3 Day 2 (NVIDIA): the paged attention kernel in CUDA (src/tiny_llm/paged_attention_cuda.py).

Runs only where MLX is a CUDA build that sees an NVIDIA GPU (`pdm install -G cuda`); everywhere
else the whole module is skipped, with the reason. The oracle is float64 NumPy: each sequence's
keys and values are read token by token through its table and attended with an explicit
softmax. Cases use shuffled block ids, a prefix shared by two sequences, -1 padding, stale finite
data in the slots no sequence owns, ragged contexts (1, block_size - 1, block_size,
block_size + 1, thousands) and lazy (not yet evaluated) inputs.

Task 1 (attention_source) and task 2 (paged_attention_cuda) are graded with partitions=1 (the
one-pass kernel); task 3 (reduce_source) by everything that splits the context.
Run: TINY_LLM_SOLUTION=tiny_llm python -m pytest tests_refsol/test_week_3_cuda.py
"""

from __future__ import annotations

import importlib

import mlx.core as mx
import numpy as np
import pytest

from tiny_llm_common.grading import TOL, assert_allclose, solution_name


def _why_no_cuda() -> str | None:
    cuda = getattr(mx, "cuda", None)
    if cuda is None:
        return f"MLX {mx.__version__} has no CUDA backend (install with `pdm install -G cuda --lockfile pdm.cuda.lock`)"
    if not cuda.is_available():
        return (
            f"MLX {mx.__version__} sees no CUDA GPU: this build is mlx[cpu] or Metal, or the "
            "machine has no NVIDIA GPU (book/src/week3-cuda.md: `pdm install -G cuda --lockfile pdm.cuda.lock`)"
        )
    return None


if (_reason := _why_no_cuda()) is not None:
    pytest.skip(f"CUDA graders: {_reason}", allow_module_level=True)

pa = importlib.import_module(f"{solution_name()}.paged_attention")
pc = importlib.import_module(f"{solution_name()}.paged_attention_cuda")

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """x as `dtype` stores it, back in float64."""
    a = mx.array(x.astype(np.float32)).astype(DTYPES[dtype]).astype(mx.float32)
    return np.array(a).astype(np.float64)


def make_case(seed, contexts, *, h_q=8, h_kv=2, d=128, block_size=16, dtype="float16"):
    """(query, key_cache, value_cache, block_tables, context_lens, scale) as NumPy arrays."""
    rng = np.random.default_rng(seed)
    need = [-(-n // block_size) for n in contexts]
    shared = min(1, contexts[0] // block_size, contexts[1] // block_size) if len(need) > 1 else 0
    num_blocks = sum(need) - shared + 3  # 3 blocks nobody owns
    ids = iter(rng.permutation(num_blocks).tolist())
    rows = []
    for b, n in enumerate(need):
        row = rows[0][:shared] if b == 1 else []  # sequence 1 shares sequence 0's first block
        rows.append(row + [next(ids) for _ in range(n - len(row))])
    width = max(need) + 1
    tables = np.array([r + [-1] * (width - len(r)) for r in rows], dtype=np.int32)
    shape = (num_blocks, block_size, h_kv, d)
    return (
        rounded(rng.standard_normal((len(contexts), h_q, d)), dtype),
        rounded(rng.standard_normal(shape), dtype),
        rounded(rng.standard_normal(shape), dtype),
        tables,
        np.array(contexts, dtype=np.int32),
        d**-0.5,
    )


def oracle(q, kc, vc, tables, lens, scale) -> np.ndarray:
    batch, h_q, d = q.shape
    _, bs, h_kv, _ = kc.shape
    group = h_q // h_kv
    out = np.zeros((batch, h_q, d))
    for b in range(batch):
        t = np.arange(lens[b])
        blocks, rows = tables[b, t // bs], t % bs
        k, v = kc[blocks, rows], vc[blocks, rows]  # [n, H_kv, D]
        for h in range(h_q):
            s = k[:, h // group] @ q[b, h] * scale
            w = np.exp(s - s.max())
            out[b, h] = (w / w.sum()) @ v[:, h // group]
    return out


def lazy_args(case, dtype):
    """The MLX arguments as lazy arrays: the kernel must not assume they were evaluated."""
    q, kc, vc, tables, lens, scale = case
    dt = DTYPES[dtype]
    return (
        mx.array(q.astype(np.float32)).astype(dt),
        mx.array(kc.astype(np.float32)).astype(dt),
        mx.array(vc.astype(np.float32)).astype(dt),
        mx.array(tables) * 1,
        mx.array(lens) * 1,
        scale,
    )


def check(case, dtype, what, partitions=None):
    args = lazy_args(case, dtype)
    out = pc.paged_attention_cuda(*args, partitions=partitions)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype, what
    assert_allclose(out, oracle(*case), atol=TOL[dtype], what=what)


CONTEXTS = [1, 15, 16, 17, 300, 1999]


# --- tasks 1 and 2: the one-pass kernel ------------------------------------------------------
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("d", [64, 128])
def test_one_pass_matches_numpy(dtype, d):
    case = make_case(1, CONTEXTS, d=d, dtype=dtype)
    check(case, dtype, f"one pass, {dtype}, D={d}", partitions=1)


@pytest.mark.parametrize(
    ("h_q", "h_kv", "block_size", "d", "dtype"),
    [
        (4, 4, 16, 64, "float16"),
        (9, 3, 16, 64, "float16"),
        (32, 8, 8, 64, "float16"),
        (12, 1, 32, 64, "float16"),
        (16, 2, 1, 64, "float16"),
        (24, 6, 16, 64, "bfloat16"),
        (16, 8, 16, 128, "float32"),
    ],
)
def test_one_pass_head_groups_and_block_sizes(h_q, h_kv, block_size, d, dtype):
    """GQA groups of 1, 3, 4, 12 (two slices of 8 and 4 heads) and 8; blocks of 1 to 32; one
    block reading all KV heads of a row, or a part of them (float32, D = 128: 4 of 8)."""
    case = make_case(2, [5, 40, 129], h_q=h_q, h_kv=h_kv, d=d, block_size=block_size, dtype=dtype)
    check(case, dtype, f"H_q={h_q}, H_kv={h_kv}, block {block_size}, D={d}", partitions=1)


# --- task 3: split-K ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("d", [64, 128])
def test_split_matches_numpy(dtype, d):
    case = make_case(3, CONTEXTS, d=d, dtype=dtype)
    check(case, dtype, f"split-K (chosen partitions), {dtype}, D={d}")


@pytest.mark.parametrize("partitions", [2, 7, 64, 3000])
def test_split_long_contexts(partitions):
    """Few sequences, long contexts: ranges that end mid-block, partitions past a sequence's
    end, and ranges of 3 tokens (3000 asked for: fewer than some contexts' tokens)."""
    case = make_case(4, [8192, 333, 5000], h_q=32, h_kv=8, d=128, block_size=16)
    check(case, "float16", f"split-K into {partitions}", partitions=partitions)


def test_split_head_groups():
    case = make_case(5, [700, 64, 1], h_q=12, h_kv=1, d=64, block_size=32, dtype="bfloat16")
    check(case, "bfloat16", "split-K, 12 query heads on one KV head", partitions=5)


def test_chosen_partitions_split_few_sequences_only():
    assert pc.choose_partitions(8, 4096) > 1, "8 sequences (one block each) must split"
    assert pc.choose_partitions(4096, 4096) == 1, "many (sequence, head) pairs: one pass"
    assert pc.choose_partitions(1, 32) == 1, "a context this short is not worth splitting"


def test_kv_heads_per_block_divide_the_kv_heads():
    assert pc.kv_heads_per_block(8, 128, 2) == 8  # 8 workers of 16 lanes: a whole 2 KB row
    assert pc.kv_heads_per_block(8, 128, 4) == 4  # float32: 4 workers of 32 lanes
    assert pc.kv_heads_per_block(3, 64, 2) == 3  # SmolLM2
    assert pc.kv_heads_per_block(6, 128, 2) == 6
    assert pc.kv_heads_per_block(12, 128, 2) == 6


# --- through paged_attention(...), as the paged cache calls it -----------------------------
def test_paged_attention_dispatches_to_cuda():
    """pa.paged_attention on a CUDA GPU runs this kernel (the extension does not load here),
    with lazy mx.array tables and with host tables (checked value by value)."""
    case = make_case(6, [17, 250, 1000], h_q=9, h_kv=3, d=64)
    q, kc, vc, tables, lens, scale = lazy_args(case, "float16")
    expected = oracle(*case)
    assert_allclose(
        pa.paged_attention(q, kc, vc, tables, lens, scale), expected, atol=TOL["float16"]
    )
    out = pa.paged_attention(q, kc, vc, case[3].tolist(), case[4].tolist(), scale)
    assert_allclose(out, expected, atol=TOL["float16"], what="host tables")
    out = pa.paged_attention(q, kc, vc, tables, lens, scale, stream=mx.gpu)
    assert_allclose(out, expected, atol=TOL["float16"], what="stream=mx.gpu")


def test_views_and_unaligned_pools():
    """A transposed query (copied row-major first) and a pool that starts 2 bytes into its
    buffer, so that 16-byte loads would be misaligned."""
    case = make_case(7, [40, 3], d=64)
    q, kc, vc, tables, lens, scale = lazy_args(case, "float16")
    q_t = mx.contiguous(q.transpose(1, 0, 2)).transpose(1, 0, 2)
    pad = mx.zeros((1,), dtype=mx.float16)
    kc_off = mx.concatenate([pad, kc.reshape(-1)])[1:].reshape(kc.shape)
    vc_off = mx.concatenate([pad, vc.reshape(-1)])[1:].reshape(vc.shape)
    for parts in (1, 3):
        out = pc.paged_attention_cuda(q_t, kc_off, vc_off, tables, lens, scale, partitions=parts)
        assert_allclose(out, oracle(*case), atol=TOL["float16"], what=f"views, {parts} parts")


def test_other_head_dims_use_the_mlx_version():
    case = make_case(8, [20, 33], d=32)
    out = pa.paged_attention(*lazy_args(case, "float32"))
    assert_allclose(out, oracle(*case), atol=TOL["float32"], what="D=32 (paged_attention_mlx)")


def test_reshape_and_cache_on_cuda():
    """Rows land in their slots, negative slots are skipped, then attention reads them back."""
    rng = np.random.default_rng(9)
    kc = rng.standard_normal((6, 4, 2, 64)).astype(np.float32)
    vc = rng.standard_normal((6, 4, 2, 64)).astype(np.float32)
    key = rng.standard_normal((5, 2, 64)).astype(np.float32)
    value = rng.standard_normal((5, 2, 64)).astype(np.float32)
    slots = np.array([7, -1, 0, 23, 12], dtype=np.int32)
    new_k, new_v = pa.reshape_and_cache(
        mx.array(key), mx.array(value), mx.array(kc) * 1, mx.array(vc) * 1, mx.array(slots) * 1
    )
    want_k, want_v = kc.reshape(24, 2, 64).copy(), vc.reshape(24, 2, 64).copy()
    for t, s in enumerate(slots):
        if s >= 0:
            want_k[s], want_v[s] = key[t], value[t]
    assert_allclose(new_k, want_k.reshape(kc.shape), atol=0, what="key cache")
    assert_allclose(new_v, want_v.reshape(vc.shape), atol=0, what="value cache")


# --- bad input -----------------------------------------------------------------------------------
def _good():
    return lazy_args(make_case(10, [20, 40], d=64), "float32")


@pytest.mark.parametrize(
    ("what", "error"),
    [
        ("query dtype", TypeError),
        ("int cache", TypeError),
        ("float tables", TypeError),
        ("2-D query", ValueError),
        ("head dim 96", ValueError),
        ("heads do not divide", ValueError),
        ("batch mismatch", ValueError),
        ("zero partitions", ValueError),
    ],
)
def test_rejects_bad_input_before_running(what, error):
    q, kc, vc, tables, lens, scale = _good()
    kwargs = {}
    if what == "query dtype":
        q = q.astype(mx.float16)
    elif what == "int cache":
        kc, vc = kc.astype(mx.int32), vc.astype(mx.int32)
    elif what == "float tables":
        tables = tables.astype(mx.float32)
    elif what == "2-D query":
        q = q[0]
    elif what == "head dim 96":
        q, kc, vc = (mx.zeros((*x.shape[:-1], 96)) for x in (q, kc, vc))
    elif what == "heads do not divide":
        q = mx.zeros((2, 7, 64))
    elif what == "batch mismatch":
        lens = lens[:1]
    elif what == "zero partitions":
        kwargs["partitions"] = 0
    with pytest.raises(error):
        pc.paged_attention_cuda(q, kc, vc, tables, lens, scale, **kwargs)


@pytest.mark.parametrize(
    ("tables", "lens"),
    [
        ([[0, 1, -1], [2, 3, -1]], [20, 0]),  # empty context
        ([[0, 1, -1], [2, 3, -1]], [20, 49]),  # longer than the table
        ([[0, 1, -1], [2, 99, -1]], [20, 30]),  # a block id past the pool
        ([[0, 1, -1], [-1, 3, -1]], [20, 30]),  # padding where a block is needed
    ],
)
def test_host_tables_are_checked(tables, lens):
    q, kc, vc, _, _, scale = _good()
    with pytest.raises(ValueError):
        pa.paged_attention(q, kc, vc, tables, lens, scale)


@pytest.mark.parametrize("partitions", [1, 4])
@pytest.mark.parametrize(
    ("row", "length"), [([2, 3, -1], 0), ([2, 3, -1], 49), ([2, 99, -1], 30), ([-7, 3, -1], 30)]
)
def test_unchecked_bad_values_give_nan_not_a_stray_read(row, length, partitions):
    """Lazy tables are not read on the host: sequence 1's bad length or block id makes its
    output NaN, sequence 0 stays right, and nothing outside the pool is read."""
    case = make_case(11, [20, 30], d=64, dtype="float32")
    q, kc, vc, _, _, scale = lazy_args(case, "float32")
    num_blocks = case[1].shape[0]
    good_row = case[3][0].tolist()
    row = [min(x, num_blocks - 1) if x != 99 else num_blocks + 99 for x in row]
    tables = mx.array(np.array([good_row, row], dtype=np.int32)) * 1
    lens = mx.array(np.array([20, length], dtype=np.int32)) * 1
    out = np.array(pc.paged_attention_cuda(q, kc, vc, tables, lens, scale, partitions=partitions))
    assert np.isnan(out[1]).all(), "the bad sequence must come out NaN"
    assert_allclose(out[0], oracle(*case)[0], atol=TOL["float32"], what="the good sequence")
