"""Week 2 Day 5: decode attention over a contiguous KV cache, in MLX ops, C++ and Metal.

Oracle: float64 NumPy softmax(scale * q . k) @ v over the first lengths[b] keys of each sequence,
query head h reading KV head h // (H_q / H_kv), on the values actually fed in (a sequence of
length 0 gets zeros). Tolerances: grading.TOL for the dtype, absolute and relative.

- task 1 (decode_attention_mlx): MLX ops against the oracle;
- task 2 (DecodeAttention::eval_cpu): through `decode_attention` on the CPU stream, with lazy
  inputs (not evaluated first), lengths that are multiples of nothing (1, 31, 33, 300, ~2000),
  GQA ratios 1, 3, 4, head dims 64 and 128, float32/float16/bfloat16, cache views (slices,
  transposes, reversed), under mx.compile, and lengths outside [0, S] raising from mx.eval;
- task 3 (the kernel in decode_attention.metal): dispatched directly through the Metal-on-CPU
  harness (metalsim) with the buffer layout decode_attention_params.h documents;
- task 4 (encode_decode_attention): the extension records the commands its eval_gpu would
  encode (`_plan_decode_attention`) and `metal_dispatch.run_plan` runs them on the .metal file;
  planted bugs in a copy of the reference kernel (no rescaling in the online softmax, ...) make
  this check fail. On a Mac the real GPU path is checked as well.
Bad shapes and dtypes raise ValueError/TypeError when the op is built, before any memory is read.
"""

import importlib
import shutil
import struct

import mlx.core as mx
import numpy as np
import pytest

from tiny_llm_common.grading import TOL, assert_allclose, solution, to_numpy
from tiny_llm_common.metal_dispatch import buffer_of, run_plan, storage_dtype, values_of

sol = solution()
da = importlib.import_module(f"{sol.__name__}.decode_attention")
kernels = importlib.import_module(f"{sol.__name__}.kernels")
LEARNER = sol.__name__ == "tiny_llm"

DTYPES = ["float32", "float16", "bfloat16"]
SIMDGROUPS = 8  # decode_attention_params.h: threads per threadgroup = 32 * SIMDGROUPS
MAX_HEADS = 8  # query heads one threadgroup serves


def ext():
    """The compiled module of the extension (the package's `_ext`)."""
    return kernels.extension()._ext


def metal_source():
    return kernels.extension().SOURCE_DIR / "src" / "decode_attention.metal"


def rand(rng, shape, dtype: str) -> mx.array:
    return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(getattr(mx, dtype))


def lazy(x: mx.array) -> mx.array:
    """A new, not yet computed array in [-2, 2] (the oracle reads its values after evaluation)."""
    return mx.sin(x) * 2


def inputs(rng, B, H_q, H_kv, S, D, dtype, lazy_inputs=True):
    q, k, v = (rand(rng, shape, dtype) for shape in ((B, H_q, D), (B, H_kv, S, D), (B, H_kv, S, D)))
    return (lazy(q), lazy(k), lazy(v)) if lazy_inputs else (q, k, v)


def oracle(query, key, value, lengths, scale) -> np.ndarray:
    q, k, v = (to_numpy(x).astype(np.float64) for x in (query, key, value))
    B, H_q, D = q.shape
    H_kv = k.shape[1]
    out = np.zeros((B, H_q, D))
    for b, n in enumerate(int(x) for x in to_numpy(lengths)):
        if n == 0:
            continue
        qb = q[b].reshape(H_kv, H_q // H_kv, D)
        s = np.einsum("hgd,htd->hgt", qb, k[b, :, :n]) * scale
        w = np.exp(s - s.max(axis=-1, keepdims=True))
        w /= w.sum(axis=-1, keepdims=True)
        out[b] = np.einsum("hgt,htd->hgd", w, v[b, :, :n]).reshape(H_q, D)
    return out


def check(out, q, k, v, lengths, scale, dtype: str, what: str):
    assert out.dtype == getattr(mx, dtype), f"{what}: returned {out.dtype} for {dtype} inputs"
    tol = TOL[dtype]
    assert_allclose(out, oracle(q, k, v, lengths, scale), atol=tol, rtol=tol, what=what)


def i32(values) -> mx.array:
    return mx.array(values, dtype=mx.int32)


# --- task 1: decode attention in MLX ops -------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 4])
def test_mlx_matches_numpy(group, dtype):
    rng = np.random.default_rng(group)
    q, k, v = inputs(rng, 4, 2 * group, 2, 40, 64, dtype)
    lengths = i32([1, 31, 33, 0])
    out = da.decode_attention_mlx(q, k, v, lengths, 0.125)
    check(out, q, k, v, lengths, 0.125, dtype, f"decode_attention_mlx {dtype}, group {group}")


def test_mlx_defaults_to_full_length_and_one_over_sqrt_d():
    rng = np.random.default_rng(5)
    q, k, v = inputs(rng, 2, 4, 2, 17, 32, "float32")
    out = da.decode_attention_mlx(q, k, v)
    check(out, q, k, v, [17, 17], 32**-0.5, "float32", "decode_attention_mlx(q, k, v)")


def test_mlx_bad_inputs_raise():
    q, k = mx.zeros((2, 4, 64)), mx.zeros((2, 3, 8, 64))
    with pytest.raises(ValueError, match="4 query heads are not a multiple of 3 KV heads"):
        da.decode_attention_mlx(q, k, k, [1, 1])
    with pytest.raises(ValueError, match=r"query must be \[B, H_q, D\]"):
        da.decode_attention_mlx(q[None], k, k, [1, 1])


# --- task 2: the CPU kernel --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_cpu_matches_numpy(group, D, dtype):
    rng = np.random.default_rng(100 * group + D)
    q, k, v = inputs(rng, 4, 2 * group, 2, 300, D, dtype)
    lengths = i32([1, 31, 33, 300])
    out = da.decode_attention(q, k, v, lengths, D**-0.5, stream=mx.cpu)
    mx.eval(out)  # q, k, v are computed in the same evaluation, after the kernel was scheduled
    check(
        out, q, k, v, lengths, D**-0.5, dtype, f"CPU decode_attention {dtype} D={D} group={group}"
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
def test_cpu_long_context(D, dtype):
    # Long enough to be split into several work units and run on several threads.
    rng = np.random.default_rng(D)
    q, k, v = inputs(rng, 3, 8, 2, 2050, D, dtype)
    lengths = i32([2047, 1999, 2050])
    out = da.decode_attention(q, k, v, lengths, 0.1, stream=mx.cpu)
    check(out, q, k, v, lengths, 0.1, dtype, f"CPU decode_attention, ~2000 keys, {dtype} D={D}")


def test_cpu_queues_its_work():
    # Inputs from a slow lazy graph: computing inside eval_cpu (instead of queueing the loop on
    # the CPU command encoder) reads them before they exist.
    rng = np.random.default_rng(3)
    for trial in range(2):
        q, k, v = inputs(rng, 4, 6, 2, 1024, 64, "float32", lazy_inputs=False)
        mx.eval(q, k, v)
        q, k, v = mx.cos(q) * 2, mx.sin(k) * 2 + 0.5, mx.cos(v) * 3
        out = da.decode_attention(q, k, v, i32([1024, 999, 5, 512]), 0.125, stream=mx.cpu)
        check(
            out,
            q,
            k,
            v,
            [1024, 999, 5, 512],
            0.125,
            "float32",
            f"decode_attention on lazy inputs (trial {trial}): queue the loop with encoder.dispatch",
        )


def cache_views(rng, dtype, view):
    """(q, k, v, lengths) with K/V as views of bigger or differently laid out buffers."""
    B, H_q, H_kv, S, D = 3, 6, 2, 300, 64
    if view == "slice of a bigger cache":  # the cache's buffer has room for 512 tokens
        k = rand(rng, (B, H_kv, 512, D), dtype)[:, :, :S]
        v = rand(rng, (B, H_kv, 512, D), dtype)[:, :, :S]
    elif view == "projection layout":  # [B, S, H_kv, D] transposed, not copied
        k = rand(rng, (B, S, H_kv, D), dtype).transpose(0, 2, 1, 3)
        v = rand(rng, (B, S, H_kv, D), dtype).transpose(0, 2, 1, 3)
    elif view == "reversed":  # negative strides along S
        k = rand(rng, (B, H_kv, S, D), dtype)[:, :, ::-1]
        v = rand(rng, (B, H_kv, S, D), dtype)[:, :, ::-1]
    else:  # "head dim strided": D is not the contiguous axis
        k = rand(rng, (B, H_kv, D, S), dtype).swapaxes(-1, -2)
        v = rand(rng, (B, H_kv, D, S), dtype).swapaxes(-1, -2)
    q = rand(rng, (B, 1, H_q, D), dtype).transpose(0, 2, 1, 3)[:, :, 0]  # from [B, H_q, 1, D]
    lengths = mx.broadcast_to(i32(257), (B,))  # stride 0
    return q, k, v, lengths


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "view", ["slice of a bigger cache", "projection layout", "reversed", "head dim strided"]
)
def test_cpu_cache_views(view, dtype):
    q, k, v, lengths = cache_views(np.random.default_rng(7), dtype, view)
    out = da.decode_attention(q, k, v, lengths, 0.125, stream=mx.cpu)
    check(out, q, k, v, lengths, 0.125, dtype, f"CPU decode_attention, {view}, {dtype}")


def test_cpu_under_compile():
    f = mx.compile(
        lambda q, k, v, n: (
            da.decode_attention(q, k, v, n, 0.125, stream=mx.cpu) * 2
            + da.decode_attention(q, k, v, n, 0.125, stream=mx.cpu)
        )
    )
    rng = np.random.default_rng(9)
    for S in (40, 70):
        q, k, v = inputs(rng, 2, 4, 2, S, 64, "float32", lazy_inputs=False)
        lengths = i32([S, S // 3])
        tol = TOL["float32"]
        expected = 3 * oracle(q, k, v, lengths, 0.125)
        assert_allclose(f(q, k, v, lengths), expected, atol=tol, rtol=tol, what=f"compiled, S={S}")


def test_cpu_zero_length_and_empty_batch():
    rng = np.random.default_rng(11)
    q, k, v = inputs(rng, 2, 4, 2, 20, 64, "float16")
    out = da.decode_attention(q, k, v, i32([0, 20]), 0.125, stream=mx.cpu)
    check(out, q, k, v, [0, 20], 0.125, "float16", "lengths [0, 20] (a sequence with no keys: 0)")
    empty = da.decode_attention(
        mx.zeros((0, 4, 64)), mx.zeros((0, 2, 8, 64)), mx.zeros((0, 2, 8, 64)), i32([]), 0.1
    )
    mx.eval(empty)
    assert empty.shape == (0, 4, 64)


def test_cpu_lengths_outside_the_cache_raise():
    rng = np.random.default_rng(13)
    q, k, v = inputs(rng, 2, 4, 2, 300, 64, "float32")
    for bad, pattern in (([3, 301], r"lengths\[1\] is 301, outside \[0, 300\]"), ([-1, 3], "-1")):
        with pytest.raises(RuntimeError, match=pattern):
            mx.eval(da.decode_attention(q, k, v, i32(bad), 0.1, stream=mx.cpu))
    # The stream keeps working after the error.
    out = da.decode_attention(q, k, v, i32([300, 2]), 0.1, stream=mx.cpu)
    check(out, q, k, v, [300, 2], 0.1, "float32", "a call after a failed one")


def test_bad_inputs_raise_clear_errors():
    q, k, n = mx.zeros((2, 4, 64)), mx.zeros((2, 2, 8, 64)), i32([8, 8])
    cases = [
        (TypeError, r"decode_attention.*int32", (q.astype(mx.int32), k, k, n)),
        (TypeError, "share a dtype", (q, k.astype(mx.float16), k.astype(mx.float16), n)),
        (TypeError, "lengths has dtype float32", (q, k, k, n.astype(mx.float32))),
        (ValueError, r"query must be \[B, H_q, D\]", (q[None], k, k, n)),
        (ValueError, r"key and value must both be \[B, H_kv, S, D\]", (q, k, k[:, :, :4], n)),
        (ValueError, "4 query heads are not a positive multiple of 3 KV heads", None),
        (ValueError, "head dim 96 is not supported", None),
        (ValueError, "batch sizes differ", (q, k, k, i32([8, 8, 8]))),
    ]
    k3 = mx.zeros((2, 3, 8, 64))
    d96 = (mx.zeros((2, 4, 96)), mx.zeros((2, 2, 8, 96)), mx.zeros((2, 2, 8, 96)), n)
    for error, pattern, args in cases:
        if args is None:
            args = (q, k3, k3, n) if "heads" in pattern else d96
        with pytest.raises(error, match=pattern):
            da.decode_attention(*args, 0.1, stream=mx.cpu)  # raised here, before any evaluation
    with pytest.raises(ValueError, match="scale must be finite"):
        da.decode_attention(q, k, k, n, float("nan"), stream=mx.cpu)


# --- task 3: the Metal kernel, dispatched directly through the harness --------------------------


def _metalsim():
    return pytest.importorskip(
        "metalsim", reason="the Metal-on-CPU harness (src/metalsim) is missing"
    )


def _untouched_message(what: str) -> str:
    return f"{what} left outputs unwritten (still NaN)" + (
        ": Week 2 Day 5, task 3: implement the kernel in src/extensions/src/decode_attention.metal"
        if LEARNER
        else ""
    )


def _check_buffer(out_buf, q, k, v, lengths, scale, dtype, what):
    got = values_of(out_buf, dtype)
    assert not np.isnan(got).any(), _untouched_message(what)
    tol = TOL[dtype]
    assert_allclose(got, oracle(q, k, v, lengths, scale), atol=tol, rtol=tol, what=what)


def _contiguous_strides(shape):
    return [int(np.prod(shape[i + 1 :])) for i in range(len(shape))]


def pack_params(q, k, scale) -> bytes:
    """DecodeAttentionParams (decode_attention_params.h) for contiguous q, k, v and lengths."""
    B, H_q, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    slices = -(-(H_q // H_kv) // MAX_HEADS)
    qs, ks = _contiguous_strides(q.shape), _contiguous_strides(k.shape)
    return struct.pack("<12q4ifi", *qs, *ks, *ks, 1, H_q, H_kv, S, slices, scale, 0)


@pytest.mark.metal
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
def test_metal_kernel(D, dtype):
    metalsim = _metalsim()
    rng = np.random.default_rng(21)
    B, H_q, H_kv, S = 2, 6, 2, 40
    q, k, v = inputs(rng, B, H_q, H_kv, S, D, dtype, lazy_inputs=False)
    lengths = i32([33, 1])
    out = np.empty((B, H_q, D), storage_dtype(dtype))
    out.view(np.uint8)[...] = 0xFF
    lib = metalsim.compile(str(metal_source()))
    kernel = f"decode_attention_{dtype}_d{D}"
    lib.dispatch(
        kernel,
        grid=(H_kv, B, 1),  # one threadgroup per (KV head, sequence): 3 query heads each
        threads_per_threadgroup=(32 * SIMDGROUPS, 1, 1),
        buffers={
            0: buffer_of(q),
            1: buffer_of(k),
            2: buffer_of(v),
            3: np.array(lengths),
            4: out,
            5: pack_params(q, k, 0.125),
        },
    )
    _check_buffer(out, q, k, v, lengths, 0.125, dtype, kernel)


# --- task 4: the dispatch (encode_decode_attention), recorded and run through the harness -------


def run_recorded(q, k, v, lengths, scale, metal=None):
    """What eval_gpu would run, on the harness: the output as float64 (NaN where unwritten)."""
    plan = ext()._plan_decode_attention(q, k, v, lengths, scale)
    assert plan, "_plan_decode_attention recorded no dispatch: encode it in encode_decode_attention"
    dtype = str(q.dtype).split(".")[-1]
    path = metal or metal_source()
    (out,) = run_plan(path, plan, None, [(q.shape, dtype)], include_dirs=[metal_source().parent])
    return values_of(out, dtype), plan[-1]["kernel"]


@pytest.mark.metal
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_metal_dispatch_through_harness(group, D, dtype):
    _metalsim()
    rng = np.random.default_rng(31 + group)
    q, k, v = inputs(rng, 3, 2 * group, 2, 40, D, dtype, lazy_inputs=False)
    lengths = i32([1, 31, 33])
    got, kernel = run_recorded(q, k, v, lengths, D**-0.5)
    _check_buffer_values(got, q, k, v, lengths, D**-0.5, dtype, f"{kernel} as dispatched")


def _check_buffer_values(got, q, k, v, lengths, scale, dtype, what):
    assert not np.isnan(got).any(), _untouched_message(what)
    tol = TOL[dtype]
    assert_allclose(got, oracle(q, k, v, lengths, scale), atol=tol, rtol=tol, what=what)


@pytest.mark.metal
@pytest.mark.parametrize("view", ["slice of a bigger cache", "projection layout"])
def test_metal_cache_views_through_harness(view):
    _metalsim()
    q, k, v, lengths = cache_views(np.random.default_rng(37), "float16", view)
    got, kernel = run_recorded(q, k, v, lengths, 0.125)
    _check_buffer_values(got, q, k, v, lengths, 0.125, "float16", f"{kernel}, {view}")


@pytest.mark.metal
def test_metal_large_group_is_split_over_threadgroups():
    # 10 query heads per KV head: more than one threadgroup serves (MAX_HEADS each).
    _metalsim()
    q, k, v = inputs(np.random.default_rng(41), 2, 20, 2, 24, 64, "float32", lazy_inputs=False)
    lengths = i32([24, 17])
    plan = ext()._plan_decode_attention(q, k, v, lengths, 0.125)
    assert plan[-1]["grid"][0] == 2 * 2, "expected H_kv * 2 threadgroups per sequence"
    got, kernel = run_recorded(q, k, v, lengths, 0.125)
    _check_buffer_values(got, q, k, v, lengths, 0.125, "float32", f"{kernel}, 10 heads per group")


@pytest.mark.metal
def test_metal_zero_and_out_of_range_lengths():
    # A GPU kernel cannot raise: a length outside [0, S] makes that sequence NaN (and reads no
    # key); length 0 gives zeros; the other sequences are unaffected.
    _metalsim()
    q, k, v = inputs(np.random.default_rng(43), 3, 4, 2, 40, 64, "float32", lazy_inputs=False)
    got, kernel = run_recorded(q, k, v, i32([0, 41, 7]), 0.125)
    assert np.isnan(got[1]).all(), f"{kernel}: length 41 > S = 40 must give NaN"
    expected = oracle(q, k, v, [0, 0, 7], 0.125)
    tol = TOL["float32"]
    assert_allclose(got[[0, 2]], expected[[0, 2]], atol=tol, rtol=tol, what=f"{kernel}, [0, _, 7]")


def test_plan_for_an_empty_batch_dispatches_nothing():
    empty = mx.zeros((0, 2, 8, 64))
    assert ext()._plan_decode_attention(mx.zeros((0, 4, 64)), empty, empty, i32([]), 0.1) == []


# Planted bugs: (what, text in decode_attention.metal, replacement). Each must make the harness
# check above fail, or that check could not catch the mistake.
PLANTED_BUGS = [
    (
        "online softmax without the rescale of the running sums",
        "acc[g][e] = acc[g][e] * correction + w * v[e];",
        "acc[g][e] = acc[g][e] + w * v[e];",
    ),
    (
        "SIMD-groups merged without rescaling to the common maximum",
        "const float f = exp(tg_m[i][g] - big_m);",
        "const float f = 1.0f;",
    ),
    (
        "every query head reads KV head 0",
        "const int kv_head = int(group.x) / p.slices;",
        "const int kv_head = 0;",
    ),
]


@pytest.mark.metal
@pytest.mark.parametrize(("what", "text", "bug"), PLANTED_BUGS, ids=[b[0] for b in PLANTED_BUGS])
def test_planted_bug_is_caught(what, text, bug, tmp_path):
    _metalsim()
    source = metal_source().read_text()
    if text not in source:
        pytest.skip("the planted bug targets the reference kernel's text")
    mutated = tmp_path / "decode_attention.metal"
    mutated.write_text(source.replace(text, bug))
    shutil.copy(metal_source().parent / "decode_attention_params.h", tmp_path)
    q, k, v = inputs(np.random.default_rng(47), 2, 6, 2, 40, 64, "float32", lazy_inputs=False)
    lengths = i32([40, 29])
    got, kernel = run_recorded(q, k, v, lengths, 0.5, metal=mutated)
    with pytest.raises(AssertionError):
        _check_buffer_values(got, q, k, v, lengths, 0.5, "float32", f"{kernel} with {what}")


# --- on a Mac: the real GPU ----------------------------------------------------------------------

needs_metal = pytest.mark.skipif(
    not mx.metal.is_available(),
    reason="no Metal GPU here (the harness tests above cover the Metal path)",
)


@needs_metal
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
def test_gpu(D, dtype):
    rng = np.random.default_rng(51)
    q, k, v = inputs(rng, 4, 6, 2, 300, D, dtype)
    lengths = i32([1, 31, 33, 300])
    out = da.decode_attention(q, k, v, lengths, D**-0.5, stream=mx.gpu)
    check(out, q, k, v, lengths, D**-0.5, dtype, f"GPU decode_attention {dtype} D={D}")
    q, k, v, lengths = cache_views(rng, dtype, "slice of a bigger cache")
    out = da.decode_attention(q, k, v, lengths, 0.125)  # the default device: the GPU
    check(out, q, k, v, lengths, 0.125, dtype, f"GPU decode_attention on a cache view, {dtype}")
