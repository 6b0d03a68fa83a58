"""Checks of the course's C++/Metal extension machinery (reference extension, any OS).

- the graders can fail: a planted indexing bug in a copy of swiglu.metal is caught by the
  harness check, and a swiglu that computes inside eval_cpu is caught by lazy inputs;
- a failed build ends in one line that names the cause, with no traceback;
- the build installs the module (and on macOS the metallib) where the packages import it.
The learner's path (skeleton builds, then passes with the reference's kernels) is checked by
scripts/check_learner_path.py, which takes minutes.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from tiny_llm_common import build_ext
from tiny_llm_common.metal_dispatch import buffer_of, run_plan

ROOT = Path(__file__).resolve().parents[1]
METAL = ROOT / "src/extensions_ref/src/swiglu.metal"


def ext():
    import tiny_llm_ext_ref

    return tiny_llm_ext_ref


def np_swiglu(g, u):
    g, u = np.asarray(g, np.float64), np.asarray(u, np.float64)
    return g / (1 + np.exp(-g)) * u


def slow_inputs(a: mx.array, b: mx.array) -> tuple[mx.array, mx.array]:
    """Lazy inputs on the CPU stream that take a while to compute: sin(a) * 2 + 1, cos(b) * 3."""
    with mx.stream(mx.cpu):
        return mx.sin(a) * 2 + 1, mx.cos(b) * 3


def harness_error(metal_path: Path, gate: mx.array, up: mx.array, memory=None) -> float:
    """Max error of the recorded dispatch run on `metal_path` (as test_week_2_day_4 runs it)."""
    plan = ext()._plan_swiglu(gate, up)
    shape = np.broadcast_shapes(gate.shape, up.shape)
    inputs = None if memory is None else [buffer_of(m) for m in memory]
    (out,) = run_plan(metal_path, plan, inputs, [(shape, np.float32)])
    expected = np_swiglu(mx.broadcast_to(gate, shape), mx.broadcast_to(up, shape))
    return float(np.max(np.abs(out - expected))) if not np.isnan(out).any() else float("inf")


def _inputs(case: str):
    rng = np.random.default_rng(0)
    a, b = (mx.array(rng.standard_normal((9, 33)).astype(np.float32)) for _ in range(2))
    c = mx.array(rng.standard_normal((33, 9)).astype(np.float32))
    return {"contiguous": (a, b), "transposed": (a.T, b.T), "mixed": (a.T, c)}[case]


# (description, text in swiglu.metal, replacement, the inputs that exercise it)
PLANTED_BUGS = [
    (
        "contiguous: reads up one element late",
        "silu_times(gate[i], up[i])",
        "silu_times(gate[i], up[min(i + 1, n - 1)])",
        "contiguous",
    ),
    (
        "strided: axes walked first-to-last",
        "for (int axis = ndim - 1; axis >= 0; --axis)",
        "for (int axis = 0; axis < ndim; ++axis)",
        "transposed",
    ),
    (
        "strided: gate indexed with up's strides",
        "g += coord * gate_strides[axis];",
        "g += coord * up_strides[axis];",
        "mixed",
    ),
]


@pytest.mark.metal
@pytest.mark.parametrize(
    ("what", "old", "new", "case"), PLANTED_BUGS, ids=[b[0] for b in PLANTED_BUGS]
)
def test_planted_metal_bug_is_caught(tmp_path, what, old, new, case):
    pytest.importorskip("metalsim", reason="the Metal-on-CPU harness (src/metalsim) is missing")
    source = METAL.read_text()
    assert source.count(old) == 1, f"swiglu.metal changed: update the planted bug {what!r}"
    mutated = tmp_path / "swiglu.metal"
    mutated.write_text(source.replace(old, new))
    gate, up = _inputs(case)
    assert harness_error(METAL, gate, up) < 1e-5, "the unmodified kernel must pass"
    assert harness_error(mutated, gate, up) > 1e-2, f"planted bug not caught: {what}"


@pytest.mark.metal
def test_run_plan_with_explicit_memory():
    # The views a.T, b.T live in the memory of a and b: giving that memory explicitly must
    # match the memory the plan recorded.
    pytest.importorskip("metalsim", reason="the Metal-on-CPU harness (src/metalsim) is missing")
    rng = np.random.default_rng(2)
    a, b = (mx.array(rng.standard_normal((9, 33)).astype(np.float32)) for _ in range(2))
    assert harness_error(METAL, a.T, b.T, memory=[a, b]) < 1e-5
    assert harness_error(METAL, a[3:], b[3:], memory=[a, b]) < 1e-5  # bound at an offset


def test_computing_inside_eval_cpu_is_caught():
    # The trap graders guard against: the same loop, run inside eval_cpu instead of queued.
    rng = np.random.default_rng(1)
    wrong_lazy = wrong_evaluated = 0
    trials = 3
    for _ in range(trials):
        a = mx.array(rng.standard_normal((64, 1024)).astype(np.float32))
        b = mx.array(rng.standard_normal((64, 1024)).astype(np.float32))
        mx.eval(a, b)
        gate, up = slow_inputs(a, b)
        out = ext()._swiglu_synchronous(gate, up)  # gate, up not evaluated yet
        mx.eval(out)
        wrong_lazy += not np.allclose(np.array(out), np_swiglu(gate, up), atol=1e-4)
        gate, up = slow_inputs(a, b)
        mx.eval(gate, up)
        out = ext()._swiglu_synchronous(gate, up)
        wrong_evaluated += not np.allclose(np.array(out), np_swiglu(gate, up), atol=1e-4)
    assert wrong_evaluated == 0, "the synchronous loop itself is wrong"
    assert wrong_lazy > 0, (
        "lazy inputs no longer expose a synchronous eval_cpu: strengthen the grader"
    )


def _build_in_subprocess(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tiny_llm_common.build_ext",
            "ref",
            "--build-dir",
            str(tmp_path / "build"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=ROOT,
        timeout=120,
    )


def test_missing_compiler_fails_in_one_line(tmp_path):
    r = _build_in_subprocess(tmp_path, {"CXX": str(tmp_path / "no-such-c++")})
    assert r.returncode != 0
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: building tiny_llm_ext_ref failed: no C++ compiler"), r.stderr


def test_mlx_version_mismatch_is_named(monkeypatch, capsys):
    monkeypatch.setattr(mx, "__version__", "0.31.2")
    with pytest.raises(SystemExit) as e:
        build_ext.build("ref")
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MLX version mismatch" in err[0] and "0.31.2" in err[0], err


@pytest.mark.parametrize(
    ("output", "cause"),
    [
        (
            "src/extensions/src/swiglu.cpp:42:7: error: expected ';' before '}' token",
            "C++ compile error in src/extensions/src/swiglu.cpp line 42",
        ),
        (
            "/x/src/extensions/src/swiglu.metal:17:3: error: use of undeclared identifier 'g'",
            "Metal compile error",
        ),
        (
            'xcrun: error: unable to find utility "metal", not a developer tool or in PATH',
            "the Metal compiler is missing",
        ),
        ("undefined reference to `tiny_llm::encode_swiglu'", "link error"),
    ],
)
def test_build_failures_are_diagnosed(output, cause):
    assert cause in build_ext._cause(output, "build")


def test_built_module_sits_in_its_package():
    package = Path(ext().__file__).parent
    assert list(package.glob("_ext*.so")) or list(package.glob("_ext*.pyd")), "no _ext module"
    if mx.metal.is_available():
        assert (package / "tiny_llm_ext_ref.metallib").is_file(), (
            "the metallib must sit beside _ext"
        )


@pytest.mark.slow
def test_metal_host_code_typechecks_against_mlx_headers():
    # The _METAL_ code (MetalEncoder, eval_gpu) only compiles on macOS. Here it is type-checked
    # against MLX 0.32's real metal/device.h, with a stand-in for Apple's metal-cpp types.
    if mx.metal.is_available():
        pytest.skip("macOS: the real build compiles this code")
    cxx = (
        os.environ.get("CXX")
        or shutil.which("c++")
        or shutil.which("g++")
        or shutil.which("clang++")
    )
    if cxx is None:
        pytest.skip("no C++ compiler")
    ext_dir = ROOT / "src/extensions_ref"
    mlx_include = Path(mx.__file__).parent / "include"
    cmd = [
        cxx,
        "-std=c++20",
        "-fsyntax-only",
        "-D_METAL_",
        '-DTINY_LLM_EXT_NAME="tiny_llm_ext_ref"',
    ]
    cmd += ["-I", str(ext_dir / "typecheck"), "-I", str(mlx_include), "-I", str(ext_dir / "src")]
    cmd += [str(ext_dir / "src/metal_encoder.cpp"), str(ext_dir / "src/swiglu.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
