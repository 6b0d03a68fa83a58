"""Self-tests of the Metal-on-CPU harness (src/metalsim): the kernels in
src/metalsim/tests_kernels/ and a few inline sources, checked against NumPy float64 oracles, and
every mistake the harness promises to report (divergent barrier, out-of-bounds read, missing
barrier, unsupported construct, bad dispatch arguments)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

import metalsim
from metalsim.tools import gen_swizzles

pytestmark = pytest.mark.metal

KERNELS = Path(metalsim.__file__).parent / "tests_kernels"
BASICS = KERNELS / "basics.metal"
ATTENTION = KERNELS / "paged_decode_attention.metal"
RNG = np.random.default_rng(20261123)


@pytest.fixture(scope="module")
def lib():
    return metalsim.compile(BASICS)


@pytest.fixture(scope="module")
def attention():
    return metalsim.compile(ATTENTION)


def source_dir() -> Path:
    """A stable place for inline test sources (a stable path keeps their cache entry stable)."""
    d = metalsim.cache_dir() / "selftest"
    d.mkdir(parents=True, exist_ok=True)
    return d


def inline(name: str, body: str) -> Path:
    path = source_dir() / f"{name}.metal"
    text = "#include <metal_stdlib>\nusing namespace metal;\n" + body
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def lines_of(path: Path, pattern: str, kernel: str) -> list[int]:
    """1-based lines matching `pattern` inside `kernel void <kernel>` (up to the next kernel)."""
    lines = path.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if f"kernel void {kernel}(" in ln)
    end = next((i for i in range(start + 1, len(lines)) if "kernel void" in lines[i]), len(lines))
    return [i + 1 for i in range(start, end) if re.search(pattern, lines[i])]


# -- dispatch and SIMD-group functions ------------------------------------------------------


def test_vector_add_with_partial_threadgroups(lib):
    n = 1000  # 4 threadgroups of 256, the last one partial
    a = RNG.standard_normal(n).astype(np.float32)
    b = RNG.standard_normal(n).astype(np.float32)
    out = np.full(n + 8, -7.0, np.float32)  # past n must stay untouched
    lib.dispatch_threads(
        "add_scaled",
        threads=(n,),
        threads_per_threadgroup=(256,),
        buffers={0: a, 1: b, 2: out, 3: np.uint32(n)},
    )
    expected = a.astype(np.float64) + 0.5 * b.astype(np.float64)
    np.testing.assert_allclose(out[:n], expected, rtol=0, atol=1e-6)
    assert (out[n:] == -7.0).all()


def simd_reference(x: np.ndarray, tpg: int) -> np.ndarray:
    """The 10 rows of `simd_ops` computed per SIMD-group with NumPy; lanes past the end of a
    partial threadgroup do not exist, so they take no part and reading them gives NaN."""
    n = len(x)
    ref = np.full((10, n), np.nan)
    for g0 in range(0, n, tpg):
        for s0 in range(g0, min(g0 + tpg, n), 32):
            v = x[s0 : min(s0 + 32, g0 + tpg, n)].astype(np.float64)
            k = len(v)

            def lane(src, v=v, k=k):
                return v[src] if src < k else np.nan

            for i in range(k):
                ref[0, s0 + i] = v.sum()
                ref[1, s0 + i] = v.max()
                ref[2, s0 + i] = v.min()
                ref[3, s0 + i] = v[:i].sum()
                ref[4, s0 + i] = lane(i ^ 5)
                ref[5, s0 + i] = lane(3)
                ref[6, s0 + i] = v[i] if i + 4 >= 32 else lane(i + 4)
                ref[7, s0 + i] = lane((i * 7) % 32)
                ref[8, s0 + i] = v[0]
                ref[9, s0 + i] = v[: i + 1].sum()
    return ref


@pytest.mark.parametrize("n,tpg", [(128, 64), (100, 64)])
def test_simd_functions_match_numpy(lib, n, tpg):
    x = RNG.standard_normal(n).astype(np.float32)
    out = np.zeros(10 * n, np.float32)
    lib.dispatch_threads("simd_ops", threads=n, threads_per_threadgroup=tpg, buffers={0: x, 1: out})
    np.testing.assert_allclose(out.reshape(10, n), simd_reference(x, tpg), rtol=0, atol=1e-5)


def test_threadgroup_reduction_across_8_simdgroups(lib):
    groups = 6
    x = RNG.standard_normal(groups * 256).astype(np.float32)
    expected = x.astype(np.float64).reshape(groups, 256).sum(1)
    out = np.zeros(groups, np.float32)
    lib.dispatch("tg_reduce", grid=groups, threads_per_threadgroup=256, buffers={0: x, 1: out})
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4)
    out[:] = 0
    lib.dispatch(
        "tg_reduce_dynamic",
        grid=groups,
        threads_per_threadgroup=256,
        buffers={0: x, 1: out},
        threadgroup_memory={0: 32 * 4},
    )
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4)


def test_missing_barrier_shows_as_nan(lib):
    """Threadgroup memory starts as 0xFF bytes: reading a slot no one has written yet is NaN."""
    x = RNG.standard_normal(2 * 256).astype(np.float32)
    out = np.zeros(2, np.float32)
    lib.dispatch(
        "tg_reduce_no_barrier", grid=2, threads_per_threadgroup=256, buffers={0: x, 1: out}
    )
    assert np.isnan(out).all(), f"expected NaN from the race, got {out}"


def test_thread_mode_runs_the_same_kernels(lib):
    x = RNG.standard_normal(2 * 256).astype(np.float32)
    out = np.zeros(2, np.float32)
    lib.dispatch(
        "tg_reduce", grid=2, threads_per_threadgroup=256, buffers={0: x, 1: out}, mode="thread"
    )
    np.testing.assert_allclose(out, x.astype(np.float64).reshape(2, 256).sum(1), atol=1e-4)
    with pytest.raises(metalsim.MetalSimError, match="divergent threadgroup_barrier"):
        lib.dispatch(
            "divergent_barrier",
            grid=1,
            threads_per_threadgroup=128,
            buffers={0: np.zeros(128, np.float32)},
            mode="thread",
        )


TSAN_SCRIPT = """
import metalsim, numpy as np
lib = metalsim.compile({path!r})
x, out = np.ones(256, np.float32), np.zeros(1, np.float32)
lib.dispatch('tg_reduce', grid=1, threads_per_threadgroup=64, buffers={{0: x, 1: out}})
lib.dispatch('tg_reduce_no_barrier', grid=1, threads_per_threadgroup=64, buffers={{0: x, 1: out}})
"""


@pytest.mark.slow
def test_thread_sanitizer_finds_the_missing_barrier_only():
    """Under TSan only the GPU's own ordering counts: the kernel without its barrier races at
    the line that writes the shared array, the correct one is clean."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None or sys.platform != "linux":
        pytest.skip("needs g++ on Linux")
    libtsan = subprocess.run([cxx, "-print-file-name=libtsan.so"], capture_output=True, text=True)
    if not Path(libtsan.stdout.strip()).is_file():
        pytest.skip("the compiler has no ThreadSanitizer runtime")
    env = {**os.environ, "METALSIM_SANITIZE": "thread", "LD_PRELOAD": libtsan.stdout.strip()}
    proc = subprocess.run(
        [sys.executable, "-c", TSAN_SCRIPT.format(path=str(BASICS))],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    reports = re.findall(r"SUMMARY: ThreadSanitizer: data race (\S+) in (\w+)", proc.stderr)
    (line,) = lines_of(BASICS, r"partial\[sg\] = v", "tg_reduce_no_barrier")
    assert reports == [(f"{BASICS}:{line}", "tg_reduce_no_barrier")], proc.stderr[-3000:]


# -- mistakes the harness reports -----------------------------------------------------------


def test_divergent_barrier_names_both_lines(lib):
    first, second = lines_of(BASICS, r"threadgroup_barrier", "divergent_barrier")
    with pytest.raises(metalsim.MetalSimError) as info:
        lib.dispatch(
            "divergent_barrier",
            grid=1,
            threads_per_threadgroup=128,
            buffers={0: np.zeros(128, np.float32)},
        )
    msg = str(info.value)
    assert "divergent threadgroup_barrier" in msg
    assert f"basics.metal:{first}" in msg and f"basics.metal:{second}" in msg
    assert "thread (64,0,0)" in msg and "threads 0-63" in msg


def test_divergent_simd_call_names_the_calls(lib):
    (line_sum,) = lines_of(BASICS, r"simd_sum", "divergent_simd")
    (line_max,) = lines_of(BASICS, r"simd_max", "divergent_simd")
    with pytest.raises(metalsim.MetalSimError) as info:
        lib.dispatch(
            "divergent_simd",
            grid=1,
            threads_per_threadgroup=32,
            buffers={0: np.zeros(32, np.float32)},
        )
    msg = str(info.value)
    assert f"simd_max at {BASICS}:{line_max}" in msg
    assert f"lanes 0-15 of simdgroup 0 wait in simd_sum at {BASICS}:{line_sum}" in msg


def test_out_of_bounds_read_names_thread_and_buffer(lib):
    x = np.zeros(100, np.float32)
    with pytest.raises(metalsim.MetalSimError) as info:
        lib.dispatch_threads(
            "shift_left",
            threads=100,
            threads_per_threadgroup=32,
            buffers={0: x, 1: np.zeros(100, np.float32)},
        )
    msg = str(info.value)
    assert "out-of-bounds read of [[buffer(0)]] 'x'" in msg
    assert "thread (99,0,0)" in msg and "400 bytes" in msg


def test_buffers_bound_at_an_offset(lib):
    x = np.arange(64, dtype=np.float32)
    out = np.zeros(64, np.float32)
    lib.dispatch("read_backwards", 1, 64, buffers={0: x, 1: out}, buffer_offsets={0: 63 * 4})
    np.testing.assert_array_equal(out, x[::-1])
    with pytest.raises(
        metalsim.MetalSimError, match=r"\[\[buffer\(0\)\]\] 'x' .*4 bytes before its start"
    ):
        lib.dispatch("read_backwards", 1, 64, buffers={0: x, 1: out}, buffer_offsets={0: 62 * 4})
    with pytest.raises(metalsim.MetalSimError, match="not a multiple of the 4-byte alignment"):
        lib.dispatch("read_backwards", 1, 1, buffers={0: x, 1: out}, buffer_offsets={0: 2})


def test_write_to_constant_buffer_is_an_error(lib):
    x = np.zeros(32, np.float32)
    with pytest.raises(metalsim.MetalSimError, match=r"write to read-only \[\[buffer\(0\)\]\] 'x'"):
        lib.dispatch("write_constant", grid=1, threads_per_threadgroup=32, buffers={0: x})


def test_endless_kernel_is_interrupted(lib, monkeypatch):
    monkeypatch.setenv("METALSIM_TIMEOUT_S", "1")
    with pytest.raises(metalsim.MetalSimError, match="did not finish within 1 s"):
        lib.dispatch(
            "spin",
            grid=1,
            threads_per_threadgroup=1,
            buffers={0: np.zeros(1, np.uint32), 1: np.zeros(1, np.uint32)},
        )


@pytest.mark.parametrize(
    "construct,body",
    [
        (
            "simdgroup_float8x8",
            "kernel void k(device float* x [[buffer(0)]]) {\n  simdgroup_float8x8 m;\n}\n",
        ),
        ("texture2d", "kernel void k(texture2d<float> t [[texture(0)]]) {\n}\n"),
        ("function_constant", "constant bool fc [[function_constant(0)]];\nkernel void k() {}\n"),
        (
            "quad_sum",
            "kernel void k(device float* x [[buffer(0)]]) {\n  x[0] = quad_sum(x[0]);\n}\n",
        ),
    ],
)
def test_unsupported_construct_is_named(construct, body):
    path = inline(f"unsupported_{construct}", body)
    line = 2 + next(i for i, ln in enumerate(body.splitlines(), 1) if construct in ln)
    with pytest.raises(metalsim.MetalSimCompileError) as info:
        metalsim.compile(path)
    msg = str(info.value)
    assert construct in msg and f"{path}:{line}" in msg and "not supported by metalsim" in msg


def test_compiler_errors_name_the_metal_line():
    path = inline(
        "syntax_error", "kernel void k(device float* x [[buffer(0)]]) {\n  x[0] = 1.0f +;\n}\n"
    )
    with pytest.raises(metalsim.MetalSimCompileError, match=r"syntax_error\.metal:4:\d+: error"):
        metalsim.compile(path)
    path = inline(
        "uses_double", "kernel void k(device float* x [[buffer(0)]]) {\n  double d = 1;\n}\n"
    )
    with pytest.raises(metalsim.MetalSimCompileError, match=r"uses_double\.metal:4.*poisoned"):
        metalsim.compile(path)


def test_threadgroup_memory_limit_is_32_kib(lib):
    body = (
        "kernel void big(device float* x [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {\n"
        "  threadgroup float scratch[9000];\n"
        "  scratch[tid] = 1.0f;\n"
        "  x[tid] = scratch[tid];\n"
        "}\n"
    )
    big = metalsim.compile(inline("threadgroup_too_big", body))
    with pytest.raises(
        metalsim.MetalSimError, match=r"'scratch' at .*threadgroup_too_big\.metal:4 needs 36000"
    ):
        big.dispatch(
            "big", grid=1, threads_per_threadgroup=32, buffers={0: np.zeros(32, np.float32)}
        )
    with pytest.raises(metalsim.MetalSimError, match="32 KiB"):
        lib.dispatch(
            "tg_reduce_dynamic",
            grid=1,
            threads_per_threadgroup=256,
            buffers={0: np.zeros(256, np.float32), 1: np.zeros(1, np.float32)},
            threadgroup_memory={0: 40960},
        )


def test_dispatch_arguments_are_validated(lib):
    a = np.zeros(64, np.float32)
    with pytest.raises(
        metalsim.MetalSimError, match=r"needs \[\[buffer\(3\)\]\] 'n', which is not bound"
    ):
        lib.dispatch_threads("add_scaled", 64, 64, buffers={0: a, 1: a.copy(), 2: a.copy()})
    with pytest.raises(metalsim.MetalSimError, match="at most 1024"):
        lib.dispatch("tg_reduce", grid=1, threads_per_threadgroup=(64, 32), buffers={0: a, 1: a})
    with pytest.raises(metalsim.MetalSimTypeError, match="NumPy array or bytes"):
        lib.dispatch("tg_reduce", grid=1, threads_per_threadgroup=64, buffers={0: [0.0] * 64, 1: a})
    with pytest.raises(metalsim.MetalSimTypeError, match="C-contiguous"):
        lib.dispatch("tg_reduce", grid=1, threads_per_threadgroup=32, buffers={0: a[::2], 1: a})
    with pytest.raises(metalsim.MetalSimArgumentError, match=r"no \[\[buffer\(5\)\]\]"):
        lib.dispatch("tg_reduce", grid=1, threads_per_threadgroup=64, buffers={0: a, 1: a, 5: a})
    with pytest.raises(metalsim.MetalSimArgumentError, match="reference to 4 bytes, but 2"):
        lib.dispatch_threads("add_scaled", 64, 64, buffers={0: a, 1: a, 2: a, 3: np.uint16(64)})
    with pytest.raises(metalsim.MetalSimArgumentError, match="no kernel named 'nope'"):
        lib.dispatch("nope", grid=1, threads_per_threadgroup=1)
    with pytest.raises(metalsim.MetalSimError, match=r"needs \[\[threadgroup\(0\)\]\] 'partial'"):
        lib.dispatch("tg_reduce_dynamic", grid=1, threads_per_threadgroup=32, buffers={0: a, 1: a})
    frozen = np.zeros(64, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(
        metalsim.MetalSimError, match=r"wrote to \[\[buffer\(2\)\]\] 'out'.*read-only"
    ):
        lib.dispatch_threads(
            "add_scaled", 64, 64, buffers={0: a + 1, 1: a, 2: frozen, 3: np.uint32(64)}
        )
    assert isinstance(metalsim.MetalSimArgumentError("x"), ValueError)


# -- types -----------------------------------------------------------------------------------


def test_msl_type_sizes(lib):
    sizes = np.zeros(8, np.uint32)
    lib.dispatch("type_sizes", grid=1, threads_per_threadgroup=1, buffers={0: sizes})
    # float3 16 (aligned 16), half3 8, packed_float3 12, float2 8, uchar3 4, bfloat4 8, int4 16
    assert sizes.tolist() == [16, 16, 8, 12, 8, 4, 8, 16]


def test_half_and_bfloat_arithmetic(lib):
    n = 256
    a = RNG.uniform(-2, 2, n).astype(np.float32)
    b = RNG.uniform(-2, 2, n).astype(np.float32)
    ah, bh = a.astype(np.float16), b.astype(np.float16)
    ab, bb = metalsim.f32_to_bf16(a), metalsim.f32_to_bf16(b)
    outh, outb, outf = np.zeros(n, np.float16), np.zeros(n, np.uint16), np.zeros(n, np.float32)
    lib.dispatch_threads(
        "half_bfloat", n, 64, buffers={0: ah, 1: bh, 2: outh, 3: ab, 4: bb, 5: outb, 6: outf}
    )
    xh, yh = ah.astype(np.float64), bh.astype(np.float64)
    xb, yb = (
        metalsim.bf16_to_f32(ab).astype(np.float64),
        metalsim.bf16_to_f32(bb).astype(np.float64),
    )
    # Each result is rounded to its type: half has an 11-bit significand, bfloat an 8-bit one.
    np.testing.assert_allclose(outh.astype(np.float64), xh * yh + xh, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(metalsim.bf16_to_f32(outb), xb * yb + xb, rtol=1.6e-2, atol=1.6e-2)
    np.testing.assert_allclose(outf, xb * yb + xh, rtol=1e-6, atol=1e-6)
    assert not np.array_equal(metalsim.bf16_to_f32(outb), outh.astype(np.float32))


def test_conversions_round_to_nearest_even(lib):
    ties = np.array(
        [0x3F808000, 0x3F818000, 0x3F80C000, 0x7F7FFFFF, 0x7FC00001, 0xFF800000], np.uint32
    )
    x = np.concatenate([ties.view(np.float32), RNG.standard_normal(58).astype(np.float32) * 1e3])
    h, b = np.zeros(64, np.float16), np.zeros(64, np.uint16)
    lib.dispatch_threads("convert", 64, 64, buffers={0: x, 1: h, 2: b})
    assert b[:3].tolist() == [0x3F80, 0x3F82, 0x3F81]  # ties to even, ties to even, above half
    assert b[3] == 0x7F80 and (b[4] & 0x7FC0) == 0x7FC0 and b[5] == 0xFF80  # inf, NaN, -inf
    np.testing.assert_array_equal(b, metalsim.f32_to_bf16(x))
    with np.errstate(over="ignore"):  # FLT_MAX overflows half to inf, as in the kernel
        np.testing.assert_array_equal(h, x.astype(np.float16))
    np.testing.assert_array_equal(
        metalsim.bf16_to_f32(b[:3]), np.float32([1.0, 1.015625, 1.0078125])
    )


def test_vector_types_and_math(lib):
    n = 64
    x = RNG.uniform(-1, 1, (n, 4)).astype(np.float32)
    out, dots = np.zeros((n, 4), np.float32), np.zeros(n, np.float32)
    lib.dispatch_threads("vectors", n, 32, buffers={0: x, 1: out, 2: dots})
    v = x.astype(np.float64)
    r = np.stack([v[:, 0], v[:, 1], v[:, 3], np.ones(n)], 1) * 2 + v[:, ::-1]
    r[:, [0, 2]] = r[:, [2, 0]]
    r[:, 1] += (v * v).sum(1)
    r[:, 3] = np.maximum(r[:, 3], 0.5) + np.clip(v[:, 0], 0, 1)
    np.testing.assert_allclose(out, r, rtol=0, atol=1e-5)
    d = np.linalg.norm(v[:, :3], axis=1) + np.exp(v[:, 0]) + (v[:, 1] > 0.5)
    np.testing.assert_allclose(dots, d, rtol=0, atol=1e-5)


def test_atomics_on_device_and_threadgroup_memory(lib):
    groups = 4
    x = RNG.uniform(0, 1, groups * 128).astype(np.float32)
    total, counts = np.zeros(1, np.float32), np.zeros(groups, np.uint32)
    lib.dispatch(
        "atomics", grid=groups, threads_per_threadgroup=128, buffers={0: total, 1: counts, 2: x}
    )
    np.testing.assert_allclose(total[0], x.astype(np.float64).sum(), rtol=1e-5)
    assert counts.tolist() == (x.reshape(groups, 128) > 0.5).sum(1).tolist()


def test_builtins_of_2d_dispatch_with_partial_groups(lib):
    w, h = 10, 7
    out = np.zeros((h, w, 4), np.uint32)
    lib.dispatch_threads(
        "positions", threads=(w, h), threads_per_threadgroup=(4, 4), buffers={0: out}
    )
    ys, xs = np.mgrid[0:h, 0:w]
    assert (out[..., 0] == xs % 4).all() and (out[..., 1] == ys % 4).all()
    # threads_per_threadgroup reports the actual (partial) size of edge threadgroups
    tx, ty = np.minimum(4, w - xs // 4 * 4), np.minimum(4, h - ys // 4 * 4)
    assert (out[..., 2] == tx * 100 + ty).all()
    assert (out[..., 3] == (xs // 4) * 100 + ys // 4).all()


def test_template_kernels_by_host_name(lib):
    assert {"scale_float", "scale_half"} <= set(lib.kernels)
    x = RNG.standard_normal(64).astype(np.float32)
    out = np.zeros(64, np.float32)
    lib.dispatch_threads("scale_float", 64, 32, buffers={0: x, 1: out, 2: np.float32(3.0)})
    np.testing.assert_allclose(out, 3.0 * x.astype(np.float64), rtol=1e-6)
    xh, outh = x.astype(np.float16), np.zeros(64, np.float16)
    lib.dispatch_threads("scale_half", 64, 32, buffers={0: xh, 1: outh, 2: np.float32(3.0)})
    np.testing.assert_allclose(outh.astype(np.float64), 3.0 * xh.astype(np.float64), rtol=1e-3)


def test_bf16_helpers_round_trip():
    x = RNG.standard_normal(1000).astype(np.float32)
    b = metalsim.f32_to_bf16(x)
    assert b.dtype == np.uint16
    back = metalsim.bf16_to_f32(b)
    assert np.all(np.abs(back - x) <= np.abs(x) * 2.0**-8)
    np.testing.assert_array_equal(metalsim.f32_to_bf16(back), b)


# -- the realistic kernel: paged decode attention --------------------------------------------

CONVERT = {
    "float32": (lambda a: a.astype(np.float32), lambda a: a.astype(np.float64)),
    "float16": (lambda a: a.astype(np.float16), lambda a: a.astype(np.float64)),
    "bfloat16": (metalsim.f32_to_bf16, lambda a: metalsim.bf16_to_f32(a).astype(np.float64)),
}
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}


def run_paged_decode(lib, dtype, d, lens, heads=8, kv_heads=2, block=16, mode=None):
    """Run the kernel on a random paged cache; return (output, float64 NumPy reference)."""
    rng = np.random.default_rng(d + len(lens))
    seqs = len(lens)
    max_blocks = max(-(-n // block) for n in lens)
    num_blocks = seqs * max_blocks + 3
    tables = (
        rng.permutation(num_blocks)[: seqs * max_blocks].reshape(seqs, max_blocks).astype(np.int32)
    )
    to, back = CONVERT[dtype]
    q = to(rng.standard_normal((seqs, heads, d)))
    k = to(rng.standard_normal((num_blocks, kv_heads, block, d)))
    v = to(rng.standard_normal((num_blocks, kv_heads, block, d)))
    out = to(np.zeros((seqs, heads, d)))
    scale = 1.0 / np.sqrt(d)
    params = (
        np.array([heads, kv_heads, max_blocks, block], np.uint32).tobytes()
        + np.float32(scale).tobytes()
    )
    lib.dispatch(
        f"paged_decode_{dtype}_d{d}",
        grid=(heads, seqs),
        threads_per_threadgroup=256,
        buffers={0: q, 1: k, 2: v, 3: tables, 4: np.array(lens, np.int32), 5: out, 6: params},
        mode=mode,
    )
    Q, K, V = back(q), back(k), back(v)
    ref = np.zeros((seqs, heads, d))
    for s, n in enumerate(lens):
        blocks = tables[s, : -(-n // block)]
        keys = K[blocks].transpose(1, 0, 2, 3).reshape(kv_heads, -1, d)[:, :n]
        vals = V[blocks].transpose(1, 0, 2, 3).reshape(kv_heads, -1, d)[:, :n]
        for h in range(heads):
            kv = h // (heads // kv_heads)
            scores = keys[kv] @ Q[s, h] * scale
            w = np.exp(scores - scores.max())
            ref[s, h] = (w / w.sum()) @ vals[kv]
    return back(out), ref


@pytest.mark.parametrize(
    "dtype,d",
    [("float32", 64), ("float32", 128), ("float16", 64), ("float16", 128), ("bfloat16", 64)],
)
def test_paged_decode_attention_matches_numpy(attention, dtype, d):
    out, ref = run_paged_decode(attention, dtype, d, lens=[300, 157, 5])
    err = np.abs(out - ref).max()
    assert err <= TOL[dtype], f"{dtype} d={d}: max abs error {err:.3g} > {TOL[dtype]}"


# -- the driver -----------------------------------------------------------------------------


def test_compile_caches_by_content(capsys):
    tag = uuid.uuid4().hex[:12]
    body = f"constant float tag = {int(tag, 16) % 100003};\nkernel void k_{tag}(device float* x [[buffer(0)]]) {{ x[0] = tag; }}\n"
    path = inline(f"cache_{tag}", body)
    lib1 = metalsim.compile(path)
    try:
        assert f"metalsim: compiling cache_{tag}.metal (first time" in capsys.readouterr().err
        lib2 = metalsim.compile(path)
        assert "compiling" not in capsys.readouterr().err
        assert lib1.kernels == lib2.kernels == [f"k_{tag}"]
        x = np.zeros(1, np.float32)
        lib2.dispatch(f"k_{tag}", grid=1, threads_per_threadgroup=1, buffers={0: x})
        assert x[0] == int(tag, 16) % 100003
    finally:
        path.unlink(missing_ok=True)
        shutil.rmtree(lib1.so_path.parent, ignore_errors=True)  # keep the cache from growing


def test_swizzle_header_is_generated():
    assert gen_swizzles.OUT.read_text() == gen_swizzles.render()
