"""Week 3 Day 9 (optional): a quantized paged KV cache (src/tiny_llm/quantized_kv_cache.py).

Oracles:
- quantize / dequantize: float64 NumPy and the error bound that follows from the format: with
  the bias rounded down and the scale rounded up (float16), every element is within half a step,
  |x - dequantize(quantize(x))| <= scale / 2 (plus float32 rounding of (x - bias) / scale, under
  1e-4 of a step), and the stored scale and bias are within float16 rounding of the ideal
  (hi - lo) / levels and lo.
- attention over a quantized pool (pure MLX, the CPU kernel, the Metal kernel through the
  Metal-on-CPU harness): float64 NumPy attention over the pool as NumPy dequantizes it, under
  grading.TOL of the query's dtype. Pools are random codes, scales and biases (not the
  solution's quantize), in shuffled blocks shared between sequences, with -1 padding.
- the cache in a model: mlx-lm's own model with a KVCache that stores dequantize(quantize(k))
  -- the solution's quantize (graded above) and NumPy's dequantize -- so the paged plumbing is
  checked tightly; and mlx-lm's plain float model, which 8-bit keys and values must stay close to.
"""

from __future__ import annotations

import importlib

import mlx.core as mx
import numpy as np
import pytest

from tiny_llm_common.checkpoints import random_checkpoint
from tiny_llm_common.grading import TOL, assert_allclose, solution_name
from tiny_llm_common.models.mlx_lm_oracle import build_mlx_lm_model

qk = importlib.import_module(f"{solution_name()}.quantized_kv_cache")
sol_model = importlib.import_module(f"{solution_name()}.model")
kernels = importlib.import_module(f"{solution_name()}.kernels")
LEARNER = solution_name() == "tiny_llm"

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
FORMATS = [(8, 32), (4, 32), (8, 64), (4, 64)]
FORMAT_IDS = [f"{b}bit-g{g}" for b, g in FORMATS]


# --- NumPy oracles ----------------------------------------------------------------------------
def f64(x) -> np.ndarray:
    if isinstance(x, mx.array):
        x = np.array(x.astype(mx.float32) if x.dtype in (mx.float16, mx.bfloat16) else x)
    return np.asarray(x).astype(np.float64)


def np_unpack(codes, bits: int) -> np.ndarray:
    """uint8 codes [..., D * bits / 8] -> integer codes [..., D]; 4-bit: low nibble first."""
    c = np.array(codes).astype(np.int64)
    if bits == 8:
        return c
    return np.stack([c & 0xF, c >> 4], axis=-1).reshape(*c.shape[:-1], -1)


def np_dequantize(codes, scales, biases, bits: int, group_size: int) -> np.ndarray:
    q = np_unpack(codes, bits).astype(np.float64)
    s, b = f64(scales), f64(biases)
    g = q.reshape(*s.shape, group_size)
    return (g * s[..., None] + b[..., None]).reshape(q.shape)


def np_pool(blocks) -> np.ndarray:
    """A QuantizedBlocks as NumPy dequantizes it: [num_blocks, block_size, H_kv, D] float64."""
    return np_dequantize(*blocks.arrays(), blocks.bits, blocks.group_size)


def random_blocks(rng, shape, bits: int, group_size: int):
    """Random codes over the whole range, float16 scales and biases: values of order 1."""
    n, bs, h, d = shape
    levels = 2**bits - 1
    codes = rng.integers(0, 256, (n, bs, h, d * bits // 8), dtype=np.uint8)
    groups = (n, bs, h, d // group_size)
    scales = (rng.uniform(0.5, 1.5, groups) * 3 / levels).astype(np.float16)
    biases = (rng.standard_normal(groups) - 1.5).astype(np.float16)
    return qk.QuantizedBlocks(mx.array(codes), mx.array(scales), mx.array(biases), bits, group_size)


def lazy(x: mx.array) -> mx.array:
    """The same values as an unevaluated node: the callee must not assume inputs are computed."""
    return x + mx.zeros_like(x) if mx.issubdtype(x.dtype, mx.floating) else x * 1


def lazy_blocks(blocks):
    return qk.QuantizedBlocks(*(lazy(a) for a in blocks.arrays()), blocks.bits, blocks.group_size)


def make_case(seed, contexts, *, h_q=8, h_kv=2, d=64, block_size=16, bits=8, group_size=32):
    """Sequences of `contexts` tokens in a shuffled pool; sequence 1 shares sequence 0's first
    block (when both fill one); 3 blocks belong to no one; every table ends with -1."""
    rng = np.random.default_rng(seed)
    need = [-(-n // block_size) for n in contexts]
    shared = 1 if len(contexts) > 1 and min(contexts[:2]) >= block_size else 0
    num_blocks = sum(need) - shared + 3
    ids = iter(rng.permutation(num_blocks).tolist())
    tables = []
    for b, n in enumerate(need):
        row = tables[0][:shared] if b == 1 else []
        tables.append(row + [next(ids) for _ in range(n - len(row))])
    width = max(need) + 1
    table = np.array([t + [-1] * (width - len(t)) for t in tables], dtype=np.int32)
    shape = (num_blocks, block_size, h_kv, d)
    return dict(
        query=rng.standard_normal((len(contexts), h_q, d)),
        key_blocks=random_blocks(rng, shape, bits, group_size),
        value_blocks=random_blocks(rng, shape, bits, group_size),
        block_tables=table,
        context_lens=np.array(contexts, dtype=np.int32),
        scale=d**-0.5,
    )


def oracle_attention(case, query=None) -> np.ndarray:
    """[B, H_q, D] float64 over the NumPy-dequantized pool, token by token through the tables."""
    q = case["query"] if query is None else query
    k_pool, v_pool = np_pool(case["key_blocks"]), np_pool(case["value_blocks"])
    bs = k_pool.shape[1]
    group = q.shape[1] // k_pool.shape[2]
    out = np.zeros(q.shape)
    for b, n in enumerate(case["context_lens"]):
        rows = [(case["block_tables"][b, t // bs], t % bs) for t in range(n)]
        k = np.stack([k_pool[blk, r] for blk, r in rows], axis=1)  # [H_kv, n, D]
        v = np.stack([v_pool[blk, r] for blk, r in rows], axis=1)
        for h in range(q.shape[1]):
            s = k[h // group] @ q[b, h] * case["scale"]
            p = np.exp(s - s.max())
            out[b, h] = (p / p.sum()) @ v[h // group]
    return out


def rounded_query(case, dtype: str) -> np.ndarray:
    """The query as `dtype` stores it, back in float64: the oracle sees what the kernel sees."""
    return f64(mx.array(case["query"].astype(np.float32)).astype(DTYPES[dtype]))


def mx_args(case, dtype="float32", lazy_tables=True):
    q = lazy(mx.array(case["query"].astype(np.float32)).astype(DTYPES[dtype]))
    tables, lens = mx.array(case["block_tables"]), mx.array(case["context_lens"])
    if lazy_tables:
        tables, lens = tables * 1, lens * 1
    return (
        q,
        lazy_blocks(case["key_blocks"]),
        lazy_blocks(case["value_blocks"]),
        tables,
        lens,
        case["scale"],
    )


def check_attention(out, case, dtype: str, what: str):
    mx.eval(out)  # a kernel task's error (a stub's "implement ..." too) comes out of mx.eval
    assert out.dtype == DTYPES[dtype], f"{what}: output is {out.dtype}, the query {dtype}"
    tol = TOL[dtype]
    expected = oracle_attention(case, rounded_query(case, dtype))
    assert_allclose(out, expected, atol=tol, rtol=tol, what=what)


# --- Task 1: quantize -------------------------------------------------------------------------
def awkward_rows(rng, t=40, h=3, d=128) -> np.ndarray:
    """Rows whose groups have every kind of range: unit normal, far from zero with a tiny
    spread, all equal, all zero, tiny (float16 subnormal) values, large values."""
    x = rng.standard_normal((t, h, d))
    x *= rng.uniform(0.01, 30, (t, h, 1))
    x += rng.uniform(-500, 500, (t, h, 1))
    x[0] = 100 + rng.uniform(0, 0.01, (h, d))  # far from zero, spread 0.01
    x[1] = 7.25  # one value
    x[2] = 0.0
    x[3] = rng.standard_normal((h, d)) * 1e-6  # below float16's normal range
    x[4] = -x[0]
    x[5] = rng.standard_normal((h, d)) * 3000
    return x.astype(np.float32)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bits,group_size", FORMATS, ids=FORMAT_IDS)
def test_quantize_is_within_half_a_step(bits, group_size, dtype):
    rng = np.random.default_rng(bits * 100 + group_size)
    x_mx = lazy(mx.array(awkward_rows(rng)).astype(DTYPES[dtype]))
    x = f64(x_mx)  # what the function is given, exactly
    codes, scales, biases = qk.quantize(x_mx, bits, group_size)
    t, h, d = x.shape
    groups = d // group_size
    assert codes.dtype == mx.uint8 and codes.shape == (t, h, d * bits // 8), (
        f"codes {codes.dtype} {codes.shape}: expected uint8 {(t, h, d * bits // 8)}"
    )
    for name, a in (("scales", scales), ("biases", biases)):
        assert a.dtype == mx.float16 and a.shape == (t, h, groups), (
            f"{name} {a.dtype} {a.shape}: expected float16 {(t, h, groups)}"
        )
    levels = 2**bits - 1
    g = x.reshape(t, h, groups, group_size)
    lo, hi = g.min(-1), g.max(-1)
    s, b = f64(scales), f64(biases)
    assert (s > 0).all(), "every scale must be positive (a constant group too)"
    assert (b <= lo).all(), "the bias must not lie above the group's minimum (round it down)"
    assert (b >= lo - np.abs(lo) * 2**-9 - 2**-23).all(), "the bias is far below the minimum"
    ideal = (hi - lo + np.abs(lo) * 2**-9 + 2**-23) / levels
    assert (s <= ideal * (1 + 2**-9) + 2**-23).all(), "scales are coarser than the range needs"
    q = np_unpack(codes, bits).reshape(g.shape)
    assert q.max() <= levels
    err = np.abs(q * s[..., None] + b[..., None] - g)
    worst = float((err / s[..., None]).max())
    assert (err <= s[..., None] * (0.5 + 1e-4)).all(), (
        f"{bits}-bit, groups of {group_size}: an element is {worst:.3f} steps from its value "
        "(at most 0.5: round to the nearest code, and the grid must cover [min, max])"
    )


def test_quantize_packs_low_nibble_first():
    """Codes 0..15 in order, then reversed: byte i is code 2i | code 2i+1 << 4."""
    ramp = np.concatenate([np.arange(16), np.arange(16)[::-1]]).astype(np.float32)
    codes, scales, biases = qk.quantize(mx.array(ramp[None]), 4, 32)
    q = np.round((ramp - f64(biases)[0, 0]) / f64(scales)[0, 0]).astype(np.int64)
    expected = q[0::2] | (q[1::2] << 4)
    assert np.array_equal(np.array(codes)[0], expected), (
        f"4-bit bytes {np.array(codes)[0].tolist()}, expected {expected.tolist()}"
    )


def test_quantize_rejects_bad_input():
    x = mx.zeros((2, 64))
    for bits in (3, 16, True):
        with pytest.raises(ValueError):
            qk.quantize(x, bits, 32)
    with pytest.raises(ValueError):
        qk.quantize(x, 8, 16)  # group size not offered
    with pytest.raises(ValueError):
        qk.quantize(mx.zeros((2, 48)), 8, 32)  # D not a multiple of the group
    with pytest.raises(TypeError):
        qk.quantize(mx.zeros((2, 64), dtype=mx.int32), 8, 32)
    with pytest.raises(TypeError):
        qk.quantize(np.zeros((2, 64), dtype=np.float32), 8, 32)


# --- Task 2: dequantize -----------------------------------------------------------------------
@pytest.mark.parametrize("bits,group_size", FORMATS, ids=FORMAT_IDS)
def test_dequantize_matches_numpy(bits, group_size):
    blocks = random_blocks(
        np.random.default_rng(bits + group_size), (3, 4, 2, 128), bits, group_size
    )
    args = [lazy(a) for a in blocks.arrays()]
    expected = np_pool(blocks)
    out = qk.dequantize(*args, bits, group_size)
    assert out.dtype == mx.float32 and out.shape == expected.shape
    assert_allclose(out, expected, atol=1e-6, rtol=1e-6, what=f"dequantize {bits}-bit")
    out16 = qk.dequantize(*args, bits, group_size, mx.float16)
    assert out16.dtype == mx.float16
    assert_allclose(out16, expected, atol=1e-3, rtol=2**-11, what="dequantize to float16")


@pytest.mark.parametrize("bits,group_size", FORMATS, ids=FORMAT_IDS)
def test_round_trip_error(bits, group_size):
    x = awkward_rows(np.random.default_rng(7), t=12, d=64)
    codes, scales, biases = qk.quantize(mx.array(x), bits, group_size)
    back = f64(qk.dequantize(codes, scales, biases, bits, group_size))
    step = np.repeat(f64(scales), group_size, axis=-1)
    assert (np.abs(back - x) <= step * (0.5 + 1e-4) + 1e-6 * np.abs(x)).all(), (
        f"dequantize(quantize(x)) is more than half a step from x ({bits}-bit)"
    )


def test_dequantize_rejects_bad_input():
    c = mx.zeros((2, 64), dtype=mx.uint8)
    s = mx.zeros((2, 2), dtype=mx.float16)
    with pytest.raises(TypeError):
        qk.dequantize(c.astype(mx.int32), s, s, 8, 32)
    with pytest.raises(ValueError):
        qk.dequantize(c, mx.zeros((2, 3), dtype=mx.float16), s, 8, 32)
    with pytest.raises(ValueError):
        qk.dequantize(c, s, s, 5, 32)


# --- Task 3: writing through the slot mapping -------------------------------------------------
def write_case(seed, bits, group_size, n_tokens=12, skips=3):
    rng = np.random.default_rng(seed)
    shape = (6, 4, 2, 64)
    kb, vb = (random_blocks(rng, shape, bits, group_size) for _ in range(2))
    key = (rng.standard_normal((n_tokens, 2, 64)) * 2).astype(np.float32)
    value = (rng.standard_normal((n_tokens, 2, 64)) + 3).astype(np.float32)
    slots = rng.permutation(24)[:n_tokens].astype(np.int32)
    slots[rng.permutation(n_tokens)[:skips]] = -1
    return key, value, kb, vb, slots


def check_written(new, old, rows, slots, what):
    """Slots written hold their row within half a step; every other slot is unchanged."""
    n, bs = old.shape[:2]
    flat_new = [np.array(a).reshape(n * bs, *a.shape[2:]) for a in new.arrays()]
    flat_old = [np.array(a).reshape(n * bs, *a.shape[2:]) for a in old.arrays()]
    written = {int(s): t for t, s in enumerate(slots) if 0 <= s < n * bs}
    untouched = [s for s in range(n * bs) if s not in written]
    for name, a, b in zip(("codes", "scales", "biases"), flat_new, flat_old, strict=True):
        assert np.array_equal(a[untouched], b[untouched]), f"{what}: {name} of unwritten slots"
    deq = np_dequantize(*flat_new, old.bits, old.group_size)
    for slot, t in written.items():
        step = np.repeat(f64(flat_new[1][slot]), old.group_size, axis=-1)
        err = np.abs(deq[slot] - rows[t])
        assert (err <= step * (0.5 + 1e-4)).all(), (
            f"{what}: slot {slot} does not hold token {t} (max error {err.max():.3g})"
        )


@pytest.mark.parametrize("bits,group_size", FORMATS[:2], ids=FORMAT_IDS[:2])
@pytest.mark.parametrize("host_slots", [False, True], ids=["mx-slots", "list-slots"])
def test_reshape_and_cache_quantized_writes_each_token_to_its_slot(bits, group_size, host_slots):
    key, value, kb, vb, slots = write_case(30, bits, group_size)
    mapping = slots.tolist() if host_slots else mx.array(slots) * 1
    new_k, new_v = qk.reshape_and_cache_quantized(
        lazy(mx.array(key)), lazy(mx.array(value)), lazy_blocks(kb), lazy_blocks(vb), mapping
    )
    assert isinstance(new_k, qk.QuantizedBlocks) and new_k.shape == kb.shape
    assert (new_k.bits, new_k.group_size) == (bits, group_size)
    check_written(new_k, kb, key, slots, "key pool")
    check_written(new_v, vb, value, slots, "value pool")


@pytest.mark.parametrize("slots", [[-1, -1, -1], [-1, 7, -1, 23], [10**6, 3, -5]])
def test_reshape_and_cache_quantized_skips_slots_outside_the_pool(slots):
    key, value, kb, vb, _ = write_case(31, 8, 32, n_tokens=len(slots), skips=0)
    new_k, new_v = qk.reshape_and_cache_quantized(
        mx.array(key), mx.array(value), kb, vb, mx.array(slots, dtype=mx.int32)
    )
    check_written(new_k, kb, key, slots, f"key pool after writing to {slots}")
    check_written(new_v, vb, value, slots, f"value pool after writing to {slots}")


def _address(x: mx.array) -> int:
    return np.asarray(x).__array_interface__["data"][0]


def test_reshape_and_cache_quantized_writes_in_place_when_rebound():
    """Storing 3 tokens must not copy a pool the caller no longer holds."""
    rng = np.random.default_rng(32)
    kb, vb = (random_blocks(rng, (64, 16, 2, 64), 8, 32) for _ in range(2))
    mx.eval(*kb.arrays(), *vb.arrays())
    before = [_address(a) for a in kb.arrays()]
    key = mx.array(rng.standard_normal((3, 2, 64)).astype(np.float32))
    kb, vb = qk.reshape_and_cache_quantized(key, key, kb, vb, [5, 700, 1023])
    mx.eval(*kb.arrays(), *vb.arrays())
    assert [_address(a) for a in kb.arrays()] == before, "the rebound pool was copied"


def test_reshape_and_cache_quantized_rejects_bad_input():
    kb = qk.QuantizedBlocks.zeros(4, 8, 2, 64, 8, 32)
    vb = qk.QuantizedBlocks.zeros(4, 8, 2, 64, 8, 32)
    x = mx.zeros((3, 2, 64))
    call = qk.reshape_and_cache_quantized
    for slots in ([0, 1, 32], [5, -1, 5], [0, 1]):
        with pytest.raises(ValueError):
            call(x, x, kb, vb, slots)
    with pytest.raises(ValueError):
        call(mx.zeros((3, 4, 64)), x, kb, vb, [0, 1, 2])
    with pytest.raises(TypeError):
        call(x.astype(mx.int32), x, kb, vb, [0, 1, 2])
    with pytest.raises(TypeError):
        call(x, x, mx.zeros((4, 8, 2, 64)), vb, [0, 1, 2])
    with pytest.raises(ValueError):
        call(x, x, kb, qk.QuantizedBlocks.zeros(4, 8, 2, 64, 4, 32), [0, 1, 2])
    with pytest.raises(TypeError):
        call(x, x, kb, vb, mx.array([0, 1, 2], dtype=mx.uint32))


# --- Tasks 4-5: gather and attend in pure MLX -------------------------------------------------
@pytest.mark.parametrize("bits,group_size", FORMATS[:2], ids=FORMAT_IDS[:2])
def test_gather_kv_quantized_reads_blocks_in_table_order(bits, group_size):
    case = make_case(40, [1, 15, 17, 40], bits=bits, group_size=group_size)
    _, kb, vb, tables, _, _ = mx_args(case)
    k, v = qk.gather_kv_quantized(kb, vb, tables)
    width = case["block_tables"].shape[1] * 16
    assert k.shape == v.shape == (4, 2, width, 64) and k.dtype == mx.float32
    k_pool, v_pool = np_pool(case["key_blocks"]), np_pool(case["value_blocks"])
    for b, n in enumerate(case["context_lens"]):
        rows = [(case["block_tables"][b, t // 16], t % 16) for t in range(n)]
        ek = np.stack([k_pool[blk, r] for blk, r in rows], axis=1)
        ev = np.stack([v_pool[blk, r] for blk, r in rows], axis=1)
        assert_allclose(k[b, :, :n], ek, atol=1e-5, rtol=1e-6, what=f"gathered keys, row {b}")
        assert_allclose(v[b, :, :n], ev, atol=1e-5, rtol=1e-6, what=f"gathered values, row {b}")
    k16, _ = qk.gather_kv_quantized(kb, vb, tables, mx.float16)
    assert k16.dtype == mx.float16


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bits,group_size", FORMATS, ids=FORMAT_IDS)
def test_paged_attention_quantized_mlx_matches_numpy(bits, group_size, dtype):
    case = make_case(41, [1, 16, 17, 70], d=64, bits=bits, group_size=group_size)
    out = qk.paged_attention_quantized_mlx(*mx_args(case, dtype))
    check_attention(out, case, dtype, f"paged_attention_quantized_mlx {bits}-bit {dtype}")


@pytest.mark.parametrize("h_q,h_kv", [(4, 4), (6, 1), (8, 2)], ids=["MHA", "MQA", "GQA"])
def test_paged_attention_quantized_mlx_head_groups_and_host_tables(h_q, h_kv):
    case = make_case(42, [40, 17, 3], h_q=h_q, h_kv=h_kv, d=32, block_size=8)
    q, kb, vb, _, _, scale = mx_args(case)
    tables, lens = case["block_tables"].tolist(), case["context_lens"].tolist()
    out = qk.paged_attention_quantized_mlx(q, kb, vb, tables, lens, scale)
    check_attention(out, case, "float32", f"paged_attention_quantized_mlx H_q={h_q} H_kv={h_kv}")


# --- Bad input for the attention functions ----------------------------------------------------
def _attention_args():
    case = make_case(50, [5, 20], block_size=8)
    q, kb, vb, _, _, scale = mx_args(case)
    return dict(
        query=q,
        key_blocks=kb,
        value_blocks=vb,
        block_tables=mx.array([[0, -1, -1], [1, 2, 3]]),
        context_lens=mx.array([5, 20]),
        scale=scale,
    )


BAD_ATTENTION = {
    "query 4-D": (ValueError, dict(query=mx.zeros((2, 8, 1, 64)))),
    "int query": (TypeError, dict(query=mx.zeros((2, 8, 64), dtype=mx.int32))),
    "heads not a multiple": (ValueError, dict(query=mx.zeros((2, 7, 64)))),
    "head dim": (ValueError, dict(query=mx.zeros((2, 8, 32)))),
    "batch": (ValueError, dict(query=mx.zeros((3, 8, 64)))),
    "float pool": (TypeError, dict(key_blocks=mx.zeros((7, 8, 2, 64)))),
    "pools differ": (ValueError, dict(value_blocks=qk.QuantizedBlocks.zeros(7, 8, 2, 64, 4, 32))),
    "float tables": (TypeError, dict(block_tables=mx.zeros((2, 3)))),
    "int64 lens": (TypeError, dict(context_lens=mx.array([5, 20], dtype=mx.int64))),
    "host id past pool": (ValueError, dict(block_tables=[[0, -1, -1], [1, 2, 99]])),
    "host -1 in use": (ValueError, dict(block_tables=[[0, -1, -1], [1, -1, 3]])),
    "host context 0": (ValueError, dict(context_lens=[0, 20])),
    "host context past table": (ValueError, dict(context_lens=[5, 25])),
}


@pytest.mark.parametrize("what", list(BAD_ATTENTION))
def test_paged_attention_quantized_mlx_rejects_bad_input(what):
    error, change = BAD_ATTENTION[what]
    with pytest.raises(error):
        qk.paged_attention_quantized_mlx(**{**_attention_args(), **change})


BAD_KERNEL = {
    **{k: v for k, v in BAD_ATTENTION.items() if k != "head dim"},
    "id past pool": (ValueError, dict(block_tables=mx.array([[0, -1, -1], [1, 2, 99]]))),
    "-1 in use": (ValueError, dict(block_tables=mx.array([[0, -1, -1], [1, -1, 3]]))),
    "context 0": (ValueError, dict(context_lens=mx.array([0, 20]))),
    "context past table": (ValueError, dict(context_lens=mx.array([5, 25]))),
}


@pytest.mark.parametrize("what", list(BAD_KERNEL))
def test_kernel_rejects_bad_input_before_running(what):
    """Wrong dtypes, ranks, head counts, and -- for tables that are host data or already
    computed -- bad block ids and lengths: a clear exception when the call is made."""
    error, change = BAD_KERNEL[what]
    args = _attention_args()
    mx.eval(args["block_tables"], args["context_lens"])
    with pytest.raises(error):
        qk.paged_attention_quantized(**{**args, **change}, stream=mx.cpu)


def ext():
    return kernels.extension()._ext


def test_kernel_op_checks_the_layout():
    """The C++ op itself: dtypes and shapes of the six pool arrays, bits, group size."""
    kb = qk.QuantizedBlocks.zeros(4, 8, 2, 64, 8, 32)
    c, s, b = kb.arrays()
    q, t, n = mx.zeros((1, 4, 64)), mx.array([[0, 1]]), mx.array([9])

    def call(codes=c, scales=s, bits=8, group=32, query=q):
        return ext().paged_attention_quantized(
            query, codes, scales, b, c, s, b, t, n, 0.125, bits, group
        )

    mx.eval(call())
    with pytest.raises(TypeError, match="key_codes"):
        call(codes=c.astype(mx.int8))
    with pytest.raises(TypeError, match="key_scales"):
        call(scales=s.astype(mx.float32))
    with pytest.raises(ValueError, match="key_codes"):
        call(codes=c[..., :32])
    with pytest.raises(ValueError, match="bits"):
        call(bits=6)
    with pytest.raises(ValueError, match="group_size"):
        call(group=16)
    with pytest.raises(ValueError, match="head dim 96"):
        kb96 = qk.QuantizedBlocks.zeros(4, 8, 2, 96, 8, 32)
        ext().paged_attention_quantized(
            mx.zeros((1, 4, 96)), *kb96.arrays(), *kb96.arrays(), t, n, 0.1, 8, 32
        )


# --- Task 7: the CPU kernel -------------------------------------------------------------------
KERNEL_DIMS = [64, 128]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("d", KERNEL_DIMS)
@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_cpu_matches_numpy(bits, d, dtype):
    case = make_case(60 + d + bits, [1, 15, 16, 17, 300], d=d, bits=bits)
    out = qk.paged_attention_quantized(*mx_args(case, dtype), stream=mx.cpu)
    check_attention(out, case, dtype, f"CPU kernel {bits}-bit, {dtype}, D={d}")


@pytest.mark.parametrize("h_q,h_kv", [(4, 4), (6, 1), (20, 2)], ids=["MHA", "MQA", "GQA-10"])
@pytest.mark.parametrize("block_size,group_size", [(1, 32), (8, 64), (32, 32)])
def test_kernel_cpu_heads_blocks_and_groups(h_q, h_kv, block_size, group_size):
    contexts = [1, block_size + 1, 3 * block_size + 5]
    case = make_case(
        61, contexts, h_q=h_q, h_kv=h_kv, block_size=block_size, bits=4, group_size=group_size
    )
    out = qk.paged_attention_quantized(*mx_args(case, "float16"), stream=mx.cpu)
    check_attention(out, case, "float16", f"CPU kernel H_q={h_q} H_kv={h_kv} bs={block_size}")


def test_kernel_cpu_long_contexts_and_host_tables():
    """Thousands of tokens: several partitions per sequence (and worker threads)."""
    case = make_case(62, [3001, 2048, 5], h_q=4, h_kv=1, d=128, bits=8)
    q, kb, vb, _, _, scale = mx_args(case, "bfloat16")
    tables, lens = case["block_tables"].tolist(), case["context_lens"].tolist()
    out = qk.paged_attention_quantized(q, kb, vb, tables, lens, scale, stream=mx.cpu)
    check_attention(out, case, "bfloat16", "CPU kernel over 3001 / 2048 / 5 tokens")


@pytest.mark.parametrize(
    "tables,lens",
    [([[0, 9], [1, -1]], [10, 3]), ([[0, -1], [1, 2]], [9, 3]), ([[0, 1], [2, 3]], [0, 3])],
    ids=["id past pool", "-1 in use", "context 0"],
)
def test_kernel_cpu_checks_lazy_tables_in_its_task(tables, lens):
    """Tables still being computed are checked by the CPU task before it reads a block: the
    error comes out of mx.eval, and the output reads as NaN, never as what memory held."""
    kb = qk.QuantizedBlocks.zeros(4, 8, 2, 64, 8, 32)
    q = mx.zeros((2, 4, 64))
    t = mx.array(tables, dtype=mx.int32) * 1
    n = mx.array(lens, dtype=mx.int32) * 1
    out = qk.paged_attention_quantized(q, kb, kb, t, n, 0.125, stream=mx.cpu)
    with pytest.raises(
        RuntimeError, match="paged_attention_quantized: (block_tables|context_lens)"
    ):
        mx.eval(out)
    out = qk.paged_attention_quantized(q, kb, kb, t * 1, n * 1, 0.125, stream=mx.cpu)
    try:
        ok = bool(np.isnan(np.array(out + 1)).all())
    except RuntimeError:
        ok = True
    assert ok, "output after a failed check: expected NaN or the kernel's error"
    good = qk.paged_attention_quantized(q, kb, kb, mx.array([[0, 1], [2, 3]]) * 1, n * 0 + 3, 1.0)
    mx.eval(good)  # the stream still works after the error


# --- Task 8: the Metal kernel, through the recorded dispatch ----------------------------------
def metal_source():
    return kernels.extension().SOURCE_DIR / "src" / "paged_attention_quantized.metal"


def run_metal(case, dtype, metal=None, args=None):
    pytest.importorskip("metalsim", reason="the Metal-on-CPU harness is missing")
    from tiny_llm_common.metal_dispatch import run_plan, values_of

    q, kb, vb, tables, lens, scale = args or mx_args(case, dtype)
    plan = ext()._plan_paged_attention_quantized(
        q, *kb.arrays(), *vb.arrays(), tables, lens, scale, kb.bits, kb.group_size
    )
    assert plan, "_plan_paged_attention_quantized recorded no dispatch"
    (out,) = run_plan(metal or metal_source(), plan, None, [(case["query"].shape, dtype)])
    got = values_of(out, dtype)
    if np.isnan(got).all():
        raise AssertionError(
            "Metal paged_attention_quantized: every output is still NaN (unwritten)"
            + (
                ": Week 3 Day 9, task 8: implement paged_attention_quantized in "
                "src/extensions/src/paged_attention_quantized.metal"
                if LEARNER
                else ""
            )
        )
    return got


@pytest.mark.metal
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("d", KERNEL_DIMS)
@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_metal_through_harness(bits, d, dtype):
    case = make_case(70 + d + bits, [1, 15, 16, 17, 70], d=d, bits=bits)
    tol = TOL[dtype]
    expected = oracle_attention(case, rounded_query(case, dtype))
    got = run_metal(case, dtype)
    assert_allclose(got, expected, atol=tol, rtol=tol, what=f"Metal {bits}-bit {dtype} D={d}")


@pytest.mark.metal
@pytest.mark.parametrize("h_q,h_kv", [(6, 1), (20, 2)], ids=["MQA", "GQA-10"])
def test_kernel_metal_heads_and_group_64(h_q, h_kv):
    case = make_case(71, [1, 9, 40], h_q=h_q, h_kv=h_kv, block_size=8, bits=4, group_size=64)
    expected = oracle_attention(case, rounded_query(case, "float32"))
    got = run_metal(case, "float32")
    assert_allclose(got, expected, atol=TOL["float32"], what=f"Metal H_q={h_q} H_kv={h_kv}")


@pytest.mark.metal
def test_kernel_metal_bad_values_give_nan_not_a_stray_read():
    case = make_case(72, [20, 9, 5])
    q, kb, vb, _, _, scale = mx_args(case)
    tables, lens = case["block_tables"].copy(), case["context_lens"].copy()
    tables[0, 1] = 10**6
    lens[2] = 10**4
    got = run_metal(
        case, "float32", args=(q, kb, vb, mx.array(tables) * 1, mx.array(lens) * 1, scale)
    )
    assert np.isnan(got[0]).all() and np.isnan(got[2]).all(), "bad sequences must be NaN"
    assert_allclose(got[1], oracle_attention(case)[1], atol=TOL["float32"], what="good row")


@pytest.mark.metal
def test_swapped_nibbles_fail_the_metal_check(tmp_path):
    """The harness check can fail: a copy of the reference kernel that reads a 4-bit byte's
    nibbles in the wrong order is caught by the comparison above."""
    if LEARNER:
        pytest.skip("checks the grader against the reference kernel")
    source = metal_source().read_text()
    line = "out[2 * e] = float(byte & 0xF) * scale + bias;"
    assert line in source, "the reference kernel changed: update this test's mutation"
    broken = tmp_path / "paged_attention_quantized.metal"
    broken.write_text(source.replace(line, "out[2 * e] = float(byte >> 4) * scale + bias;"))
    params = "paged_attention_quantized_params.h"
    (tmp_path / params).write_text((metal_source().parent / params).read_text())
    case = make_case(73, [20, 40], bits=4)
    got = run_metal(case, "float32", metal=broken)
    with pytest.raises(AssertionError, match="planted"):
        assert_allclose(got, oracle_attention(case), atol=TOL["float32"], what="planted bug")


# --- Task 6: the cache inside a model ---------------------------------------------------------
PROMPT = [3, 141, 59, 26, 5, 200, 17, 8, 99]
PROMPTS = [PROMPT, [7, 7, 1], [100, 2, 3, 4, 5, 6]]
# Logits of the tiny model through the quantized cache vs mlx-lm with a round-trip cache: equal
# to ~1e-5, except where a key sits on a rounding boundary and the two models' float32 keys
# (equal to ~1e-6) round to neighbouring codes -- one step in one element: seen up to 1.6e-3
# at 8 bits, 1.7e-2 at 4 bits. A wrong slot, block or scale costs at least what quantizing
# costs against the float model (0.04 at 8 bits, 0.7 at 4 bits here).
PLUMBING_ATOL = {8: 5e-3, 4: 5e-2}


def round_trip_cache_class():
    from mlx_lm.models.cache import KVCache

    class RoundTripKVCache(KVCache):
        """mlx-lm's KVCache storing dequantize(quantize(x)): the solution's quantize, NumPy's
        dequantize. (No attribute named `bits`: mlx-lm would take it for its own quantized
        cache.)"""

        def __init__(self, n_bits, group_size):
            super().__init__()
            self.format = (n_bits, group_size)

        def round_trip(self, x):
            n_bits, group = self.format
            codes, scales, biases = qk.quantize(x, n_bits, group)
            back = np_dequantize(codes, scales, biases, n_bits, group)
            return mx.array(back.astype(np.float32)).astype(x.dtype)

        def update_and_fetch(self, keys, values):
            return super().update_and_fetch(self.round_trip(keys), self.round_trip(values))

    return RoundTripKVCache


@pytest.fixture(scope="module")
def tiny():
    """A tiny Llama with head dim 64: decode steps run the kernel."""
    args, weights = random_checkpoint("llama", seed=18, head_dim=64)
    return args, sol_model.Model(args, weights), build_mlx_lm_model(args, weights)


def oracle_logits(oracle, chunks, bits=None, group_size=32):
    """mlx-lm's last-position logits after each chunk; bits=None: its plain float cache."""
    from mlx_lm.models.cache import KVCache

    layers = len(oracle.layers)
    cls = round_trip_cache_class()
    cache = [KVCache() if bits is None else cls(bits, group_size) for _ in range(layers)]
    return [oracle(mx.array([c], dtype=mx.int32), cache=cache)[0, -1] for c in chunks]


def run(model, cache, seq_ids, rows):
    cache.begin_step(seq_ids, [len(r) for r in rows])
    width = max(map(len, rows))
    tokens = mx.array([r + [0] * (width - len(r)) for r in rows], dtype=mx.int32)
    logits = model(tokens, cache.layers())
    return [logits[b, len(r) - 1] for b, r in enumerate(rows)]


CHUNKS = [PROMPT[:5], PROMPT[5:], [12], [250], [0], [77], [31], [200]]


@pytest.mark.parametrize("bits", [8, 4])
def test_cache_prefill_chunks_and_decode_match_the_round_trip_oracle(tiny, bits):
    args, model, oracle = tiny
    expected = oracle_logits(oracle, CHUNKS, bits)
    cache = qk.QuantizedPagedKVCache(model, 8, 4, bits=bits, dtype=mx.float32)
    for step, chunk in enumerate(CHUNKS):
        (logits,) = run(model, cache, ["s"], [chunk])
        assert_allclose(
            logits, expected[step], atol=PLUMBING_ATOL[bits], what=f"{bits}-bit logits, step {step}"
        )


def test_cache_batch_equals_each_alone(tiny):
    """Three prompts prefilled as one [3, 9] call, then decoded as a batch (a decode step of
    two sequences beside a third's prefill in between)."""
    args, model, oracle = tiny
    cache = qk.QuantizedPagedKVCache(model, 16, 4, bits=8, dtype=mx.float32)
    first = run(model, cache, ["a", "b"], PROMPTS[:2])
    second = run(model, cache, ["a", "b", "c"], [[12], [250], PROMPTS[2]])
    third = run(model, cache, ["c", "a", "b"], [[9], [0], [77]])
    exp = [
        oracle_logits(oracle, [PROMPTS[0], [12], [0]], 8),
        oracle_logits(oracle, [PROMPTS[1], [250], [77]], 8),
        oracle_logits(oracle, [PROMPTS[2], [9]], 8),
    ]
    got = [[first[0], second[0], third[1]], [first[1], second[1], third[2]], [second[2], third[0]]]
    for seq, (g, e) in enumerate(zip(got, exp, strict=True)):
        for step, (a, b) in enumerate(zip(g, e, strict=True)):
            assert_allclose(a, b, atol=PLUMBING_ATOL[8], what=f"sequence {'abc'[seq]}, step {step}")


def test_cache_forked_sequences_copy_their_shared_block(tiny):
    """Copy-on-write copies codes, scales and biases of the shared partial block."""
    args, model, oracle = tiny
    cache = qk.QuantizedPagedKVCache(model, 10, 4, bits=4, dtype=mx.float32)
    run(model, cache, ["p"], [PROMPT[:6]])
    cache.manager.fork("p", "q")
    lp, lq = run(model, cache, ["p", "q"], [[11], [22]])
    exp_p = oracle_logits(oracle, [PROMPT[:6], [11]], 4)[1]
    exp_q = oracle_logits(oracle, [PROMPT[:6], [22]], 4)[1]
    assert_allclose(lp, exp_p, atol=PLUMBING_ATOL[4], what="parent after the fork")
    assert_allclose(lq, exp_q, atol=PLUMBING_ATOL[4], what="child after the fork")


def test_8bit_cache_stays_close_to_the_float_model(tiny):
    """Against mlx-lm's plain float cache, over 40 steps: 8-bit keys and values move these
    logits by 0.039 at most (measured; 4-bit moves them by up to 0.72)."""
    args, model, oracle = tiny
    rng = np.random.default_rng(0)
    chunks = [PROMPT] + [[int(t)] for t in rng.integers(0, args.vocab_size, 40)]
    expected = oracle_logits(oracle, chunks)
    cache = qk.QuantizedPagedKVCache(model, 16, 4, bits=8)  # float16 attention, as by default
    worst = 0.0
    for step, chunk in enumerate(chunks):
        (logits,) = run(model, cache, ["s"], [chunk])
        worst = max(worst, float(mx.abs(logits - expected[step]).max()))
    assert worst < 0.1, f"8-bit cache: logits differ from the float model by {worst:.3g}"


def test_greedy_tokens_match_the_round_trip_oracle(tiny):
    args, model, oracle = tiny
    cache = qk.QuantizedPagedKVCache(model, 12, 4, bits=8, dtype=mx.float32)
    ours, chunk = [], PROMPT
    for _ in range(24):
        (logits,) = run(model, cache, ["s"], [chunk])
        ours.append(int(mx.argmax(logits).item()))
        chunk = [ours[-1]]
    cls = round_trip_cache_class()
    oracle_cache = [cls(8, 32) for _ in oracle.layers]
    theirs, chunk = [], PROMPT
    for _ in range(24):
        logits = oracle(mx.array([chunk]), cache=oracle_cache)[0, -1]
        top2 = np.sort(np.array(logits))[-2:]
        assert top2[1] - top2[0] > 2 * PLUMBING_ATOL[8], "the oracle nearly ties: pick another seed"
        theirs.append(int(mx.argmax(logits).item()))
        chunk = [theirs[-1]]
    assert ours == theirs, f"8-bit greedy tokens {ours} != the oracle's {theirs}"


@pytest.mark.parametrize("bits,group_size", FORMATS, ids=FORMAT_IDS)
def test_cache_memory_report(tiny, bits, group_size):
    args, model, _ = tiny
    cache = qk.QuantizedPagedKVCache(model, 10, 8, bits=bits, group_size=group_size)
    d, h_kv = args.head_dim, args.num_key_value_heads
    row = d * bits // 8 + 2 * 2 * (d // group_size)  # codes + float16 scale and bias per group
    per_block = 2 * args.num_hidden_layers * 8 * h_kv * row
    assert cache.bytes_per_block == per_block, "bytes_per_block counts codes, scales, biases"
    assert cache.nbytes == 10 * per_block
    run(model, cache, ["a"], [PROMPT])
    usage = cache.usage()
    assert (usage.used_blocks, usage.stored_tokens) == (2, 9)
    with pytest.raises(ValueError):
        qk.QuantizedPagedKVCache(model, 10, 8, bits=3)
    with pytest.raises(ValueError):
        qk.QuantizedPagedKVCache(args, 10, 8, group_size=48)


# --- SmolLM2 ----------------------------------------------------------------------------------
TEXT = (
    "The river rose slowly through the night. By morning the lower fields were under water, "
    "and the farmers who had planned to harvest that week stood on the embankment and watched "
    "the current carry away fence posts, bales of straw and, once, a small wooden boat."
)


@pytest.fixture(scope="module")
def smollm2():
    from tiny_llm_common.models import load_model

    loaded = load_model("smollm2", verbose=False)
    return loaded, sol_model.Model(loaded.args, loaded.weights)


@pytest.mark.slow
def test_smollm2_8bit_greedy_matches_mlx_lm(smollm2):
    from mlx_lm.generate import generate_step

    loaded, model = smollm2
    prompt = loaded.tokenizer.encode("The three primary colours are")
    oracle = build_mlx_lm_model(loaded.args, loaded.weights)
    expected = [int(t) for t, _ in generate_step(mx.array(prompt), oracle, max_tokens=16)]
    cache = qk.QuantizedPagedKVCache(model, 4, 16, bits=8)
    out, chunk = [], prompt
    for _ in range(16):
        (logits,) = run(model, cache, ["s"], [chunk])
        out.append(int(mx.argmax(logits).item()))
        chunk = [out[-1]]
    dec = loaded.tokenizer.decode
    assert out == expected, f"SmolLM2 8-bit: {dec(out)!r} != mlx-lm's {dec(expected)!r}"


@pytest.mark.slow
def test_smollm2_8bit_log_likelihood_within_a_hundredth_of_float16(smollm2):
    """Mean next-token NLL over a fixed text: 8-bit within 0.01 nats/token of a float16 cache."""
    pkv = importlib.import_module(f"{solution_name()}.paged_kv_cache")
    loaded, model = smollm2
    tokens = loaded.tokenizer.encode(TEXT)
    blocks = -(-len(tokens) // 16)
    base = qk.mean_nll(model, pkv.PagedKVCache(model, blocks, 16, dtype=mx.float16), tokens, 64)
    nll8 = qk.mean_nll(model, qk.QuantizedPagedKVCache(model, blocks, 16, bits=8), tokens, 64)
    assert abs(nll8 - base) <= 0.01, f"8-bit NLL {nll8:.4f} vs float16 {base:.4f}"
