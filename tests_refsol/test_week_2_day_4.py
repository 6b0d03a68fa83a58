"""Week 2 Day 4: your first MLX primitive, a fused SwiGLU gate silu(gate) * up in C++ and Metal.

Oracle: float64 NumPy silu(gate) * up on the values actually fed in. Tolerances: grading.TOL for
the dtype, absolute and relative, stated in every failure message.

- task 1 (Swiglu::eval_cpu): through `kernels.swiglu` on the CPU, with lazy inputs (not
  evaluated first, so a kernel that computes inside eval_cpu instead of queueing its work fails),
  strided and broadcast inputs, and under mx.compile;
- task 2 (the kernels in swiglu.metal): dispatched directly by this file through the Metal-on-CPU
  harness (metalsim), with the buffer layout the skeleton documents;
- task 3 (encode_swiglu): the extension records the commands its eval_gpu would encode
  (`_plan_swiglu`), and `metal_dispatch.run_plan` runs them on swiglu.metal — the same dispatch
  code a Mac runs. On a Mac the real GPU path is checked as well.
"""

import importlib
import struct

import mlx.core as mx
import numpy as np
import pytest

from tiny_llm_common.grading import TOL, assert_allclose, solution, to_numpy
from tiny_llm_common.metal_dispatch import (
    buffer_of,
    harness_binds_offsets,
    run_plan,
    storage_dtype,
    values_of,
)

sol = solution()
kernels = importlib.import_module(f"{sol.__name__}.kernels")
LEARNER = sol.__name__ == "tiny_llm"
SRC = "src/extensions/src" if LEARNER else "src/extensions_ref/src"

DTYPES = ["float32", "float16", "bfloat16"]


def ext():
    return kernels.extension()


def metal_source():
    return ext().SOURCE_DIR / "src" / "swiglu.metal"


def rand(rng, shape, dtype: str, scale: float = 2.0) -> mx.array:
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    return mx.array(x).astype(getattr(mx, dtype))


def lazy(x: mx.array) -> mx.array:
    """A new, not yet computed array in [-3, 3] (the oracle reads its values after evaluation)."""
    return mx.sin(x) * 3


def np_swiglu(gate, up) -> np.ndarray:
    g, u = to_numpy(gate).astype(np.float64), to_numpy(up).astype(np.float64)
    return g / (1.0 + np.exp(-g)) * u


def slow_inputs(a: mx.array, b: mx.array) -> tuple[mx.array, mx.array]:
    """Lazy inputs on the CPU stream that take a while to compute: sin(a) * 2 + 1, cos(b) * 3."""
    with mx.stream(mx.cpu):
        return mx.sin(a) * 2 + 1, mx.cos(b) * 3


def check(out, gate, up, dtype: str, what: str):
    assert out.dtype == getattr(mx, dtype), f"{what}: returned {out.dtype} for {dtype} inputs"
    tol = TOL[dtype]
    assert_allclose(out, np_swiglu(gate, up), atol=tol, rtol=tol, what=what)


# --- task 1: the CPU primitive --------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (3, 65), (2, 5, 576)])
def test_cpu_lazy_inputs(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    gate, up = lazy(rand(rng, shape, dtype)), lazy(rand(rng, shape, dtype))
    out = kernels.swiglu(gate, up, stream=mx.cpu)
    mx.eval(out)  # gate and up are computed in the same evaluation, after swiglu was scheduled
    check(out, gate, up, dtype, f"swiglu {dtype} {shape}")


def test_cpu_queues_its_work():
    # Inputs from a slow lazy graph: computing inside eval_cpu (instead of queueing the loop on
    # the CPU command encoder) reads them before they exist.
    rng = np.random.default_rng(3)
    for trial in range(2):
        a, b = rand(rng, (64, 1024), "float32"), rand(rng, (64, 1024), "float32")
        mx.eval(a, b)
        gate, up = slow_inputs(a, b)
        out = kernels.swiglu(gate, up, stream=mx.cpu)
        mx.eval(out)
        assert_allclose(
            out,
            np_swiglu(gate, up),
            atol=TOL["float32"],
            rtol=TOL["float32"],
            what=f"swiglu on lazy inputs (trial {trial}): queue the loop with encoder.dispatch",
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", ["transposed", "sliced", "reversed", "expanded"])
def test_cpu_strided_inputs(view, dtype):
    rng = np.random.default_rng(11)
    a, b = rand(rng, (12, 40), dtype), rand(rng, (12, 40), dtype)
    if view == "transposed":
        gate, up = a.T, b.T
    elif view == "sliced":
        gate, up = a[2:, 1::3], b[1:-1, ::3][:, :13]
    elif view == "reversed":
        gate, up = a[::-1], b[:, ::-1]
    else:
        gate, up = mx.broadcast_to(a[:1], (12, 40)), b
    out = kernels.swiglu(gate, up, stream=mx.cpu)
    check(out, gate, up, dtype, f"swiglu {dtype} on {view} inputs")


@pytest.mark.parametrize(
    ("g_shape", "u_shape"), [((3, 65), (65,)), ((4, 1), (4, 9)), ((2, 1, 8), (1, 3, 1)), ((), (5,))]
)
def test_cpu_broadcasting(g_shape, u_shape):
    rng = np.random.default_rng(5)
    gate, up = lazy(rand(rng, g_shape, "float32")), lazy(rand(rng, u_shape, "float32"))
    out = kernels.swiglu(gate, up, stream=mx.cpu)
    expected_shape = np.broadcast_shapes(g_shape, u_shape)
    assert out.shape == expected_shape, f"swiglu {g_shape} x {u_shape}: shape {out.shape}"
    check(out, gate, up, "float32", f"swiglu broadcasting {g_shape} x {u_shape}")


@pytest.mark.parametrize("shapeless", [False, True])
def test_cpu_under_compile(shapeless):
    f = mx.compile(
        lambda g, u: kernels.swiglu(g, u, stream=mx.cpu) * 2 + kernels.swiglu(g, u, stream=mx.cpu),
        shapeless=shapeless,
    )
    rng = np.random.default_rng(9)
    for shape in [(4, 32), (6, 32), (3, 8)]:
        gate, up = rand(rng, shape, "float32"), rand(rng, shape, "float32")
        out = f(gate, up)
        assert out.shape == shape, f"compiled swiglu: shape {out.shape}, expected {shape}"
        tol = TOL["float32"]
        assert_allclose(
            out, 3 * np_swiglu(gate, up), atol=tol, rtol=tol, what=f"compiled swiglu {shape}"
        )


def test_cpu_empty():
    out = kernels.swiglu(mx.zeros((0, 4)), mx.zeros((0, 4)), stream=mx.cpu)
    mx.eval(out)
    assert out.shape == (0, 4)


def test_bad_inputs_raise_clear_errors():
    f32 = mx.zeros((2, 3))
    with pytest.raises(TypeError, match="swiglu.*int32"):
        kernels.swiglu(f32.astype(mx.int32), f32)
    with pytest.raises(TypeError, match="swiglu: gate is float32 but up is float16"):
        kernels.swiglu(f32, f32.astype(mx.float16))
    with pytest.raises(ValueError, match=r"swiglu.*\(2, 3\).*\(4,\)"):
        kernels.swiglu(f32, mx.zeros((4,)))


# --- task 2: the Metal kernels, dispatched directly through the harness ---------------------


def _metalsim():
    return pytest.importorskip(
        "metalsim", reason="the Metal-on-CPU harness (src/metalsim) is missing"
    )


def _untouched_message(kernel: str) -> str:
    return f"{kernel} left outputs unwritten (still NaN)" + (
        ": Week 2 Day 4, task 2: implement `swiglu_contiguous` and `swiglu_strided` in src/extensions/src/swiglu.metal"
        if LEARNER
        else ""
    )


def _check_buffer(out_buf, gate, up, dtype, what):
    got = values_of(out_buf, dtype)
    assert not np.isnan(got).any(), _untouched_message(what)
    tol = TOL[dtype]
    assert_allclose(got, np_swiglu(gate, up), atol=tol, rtol=tol, what=what)


@pytest.mark.metal
@pytest.mark.parametrize("dtype", DTYPES)
def test_metal_kernel_contiguous(dtype):
    metalsim = _metalsim()
    rng = np.random.default_rng(21)
    n = 1000  # not a multiple of the threadgroup: the kernel must check i < n
    gate, up = rand(rng, (n,), dtype), rand(rng, (n,), dtype)
    out = np.empty(n, storage_dtype(dtype))
    out.view(np.uint8)[...] = 0xFF
    lib = metalsim.compile(str(metal_source()))
    lib.dispatch_threads(
        f"swiglu_contiguous_{dtype}",
        threads=(1024, 1, 1),
        threads_per_threadgroup=(256, 1, 1),
        buffers={0: buffer_of(gate), 1: buffer_of(up), 2: out, 3: struct.pack("<I", n)},
    )
    _check_buffer(out, gate, up, dtype, f"swiglu_contiguous_{dtype}")


@pytest.mark.metal
@pytest.mark.parametrize("dtype", DTYPES)
def test_metal_kernel_strided(dtype):
    metalsim = _metalsim()
    rng = np.random.default_rng(22)
    a, b = rand(rng, (6, 10), dtype), rand(rng, (10,), dtype)
    gate, up = a.T, mx.broadcast_to(b[:, None], (10, 6))  # strides (1, 10) and (1, 0)
    out = np.empty(60, storage_dtype(dtype))
    out.view(np.uint8)[...] = 0xFF
    lib = metalsim.compile(str(metal_source()))
    lib.dispatch_threads(
        f"swiglu_strided_{dtype}",
        threads=(64, 1, 1),
        threads_per_threadgroup=(32, 1, 1),
        buffers={
            0: buffer_of(a),
            1: buffer_of(b),
            2: out,
            3: struct.pack("<I", 60),
            4: struct.pack("<i", 2),
            5: struct.pack("<2i", 10, 6),
            6: struct.pack("<2q", 1, 10),
            7: struct.pack("<2q", 1, 0),
        },
    )
    _check_buffer(out.reshape(10, 6), gate, up, dtype, f"swiglu_strided_{dtype}")


# --- task 3: the dispatch (encode_swiglu), recorded and run through the harness -------------


VIEWS = ["contiguous", "transposed", "offset", "reversed", "broadcast"]


def _case(view: str, dtype: str, rng):
    """(gate, up) as swiglu gets them: contiguous arrays or views with strides and offsets."""
    a, b = rand(rng, (9, 33), dtype), rand(rng, (9, 33), dtype)
    if view == "contiguous":
        return a, b
    if view == "transposed":
        return a.T, b.T
    if view == "offset":  # row-contiguous views that start 2 rows into their buffers
        return a[2:], b[2:]
    if view == "reversed":  # negative strides
        return a[::-1], b[:, ::-1]
    if view == "broadcast":  # row 4 of b repeated down the rows (stride 0)
        return a, b[4:5]
    raise AssertionError(view)


@pytest.mark.metal
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", VIEWS)
def test_metal_dispatch_through_harness(view, dtype):
    _metalsim()
    if view == "reversed" and not harness_binds_offsets():
        pytest.skip("metalsim cannot bind a buffer at an offset, which negative strides need")
    rng = np.random.default_rng(31)
    gate, up = _case(view, dtype, rng)
    plan = ext()._plan_swiglu(gate, up)
    assert plan, "_plan_swiglu recorded no dispatch: encode_swiglu must dispatch a kernel"
    shape = np.broadcast_shapes(gate.shape, up.shape)
    # inputs=None: the memory eval_gpu would bind, as recorded in the plan
    (out,) = run_plan(metal_source(), plan, None, [(shape, dtype)])
    kernel = plan[-1]["kernel"]
    _check_buffer(
        out,
        mx.broadcast_to(gate, shape),
        mx.broadcast_to(up, shape),
        dtype,
        f"{kernel} ({view} inputs) as dispatched",
    )


def test_plan_for_an_empty_array_dispatches_nothing():
    assert ext()._plan_swiglu(mx.zeros((0, 8)), mx.zeros((0, 8))) == []


# --- on a Mac: the real GPU --------------------------------------------------------------------

needs_metal = pytest.mark.skipif(
    not mx.metal.is_available(),
    reason="no Metal GPU here (the harness tests above cover the Metal path)",
)


@needs_metal
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", VIEWS)
def test_gpu(view, dtype):
    rng = np.random.default_rng(41)
    gate, up = _case(view, dtype, rng)
    out = kernels.swiglu(gate, up, stream=mx.gpu)
    shape = out.shape
    check(
        out, mx.broadcast_to(gate, shape), mx.broadcast_to(up, shape), dtype, f"GPU swiglu, {view}"
    )
    g, u = lazy(gate), lazy(up)
    out = kernels.swiglu(g, u, stream=mx.gpu)
    check(
        out, mx.broadcast_to(g, shape), mx.broadcast_to(u, shape), dtype, f"GPU swiglu, lazy {view}"
    )


@needs_metal
def test_gpu_is_the_default_device():
    rng = np.random.default_rng(42)
    gate, up = rand(rng, (5, 7), "float16"), rand(rng, (5, 7), "float16")
    check(kernels.swiglu(gate, up), gate, up, "float16", "swiglu on the default device")
