"""A fast float32 matmul for MLX on a Linux CPU, from the OpenBLAS that NumPy already ships.

The `mlx[cpu]` wheel links the reference netlib BLAS: its float32 matmul runs at about 2 GFLOP/s
(`python -m tiny_llm_common.fastblas` prints both speeds),
so batching many sequences (the whole point of a serving engine) barely pays on a Linux CPU.
NumPy's wheel bundles OpenBLAS, but with renamed, 64-bit-integer symbols
(`scipy_cblas_sgemm64_`). A ten-line shim defining `cblas_sgemm` on top of it, preloaded with
LD_PRELOAD, makes every MLX float32 matmul of the process use OpenBLAS. Nothing changes on
macOS (MLX uses Accelerate and Metal there) or when the shim cannot be built.

    from tiny_llm_common.fastblas import reexec_with_fast_blas
    reexec_with_fast_blas(["-m", "tiny_llm_common.serve_demo", *sys.argv[1:]])  # first thing
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

_ACTIVE = "TINY_LLM_FAST_BLAS"  # set in the re-executed process: "1" active, "0" unavailable
_SHIM = r"""
#include <stdint.h>
typedef int64_t i64;
void scipy_cblas_sgemm64_(int, int, int, i64, i64, i64, float, const float*, i64, const float*,
                          i64, float, float*, i64);
void scipy_cblas_dgemm64_(int, int, int, i64, i64, i64, double, const double*, i64,
                          const double*, i64, double, double*, i64);
void cblas_sgemm(int o, int ta, int tb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc) {
  scipy_cblas_sgemm64_(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void cblas_dgemm(int o, int ta, int tb, int m, int n, int k, double alpha, const double* a,
                 int lda, const double* b, int ldb, double beta, double* c, int ldc) {
  scipy_cblas_dgemm64_(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
"""


def _numpy_openblas() -> Path | None:
    import numpy

    libs = Path(numpy.__file__).resolve().parent.parent / "numpy.libs"
    found = sorted(libs.glob("libscipy_openblas64_*.so"))
    return found[0] if found else None


def shim_path(verbose: bool = False) -> Path | None:
    """The shim library, built on first use into ~/.cache/tiny-llm-paged; None if impossible."""
    if not sys.platform.startswith("linux"):
        return None
    openblas, cc = _numpy_openblas(), shutil.which("cc") or shutil.which("gcc")
    if openblas is None or cc is None:
        return None
    tag = hashlib.sha256((_SHIM + str(openblas)).encode()).hexdigest()[:12]
    out = Path.home() / ".cache" / "tiny-llm-paged" / "fastblas" / f"libtinyblas-{tag}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        src = out.with_suffix(".c")
        src.write_text(_SHIM)
        cmd = [cc, "-O2", "-shared", "-fPIC", str(src), "-o", str(out), str(openblas)]
        cmd.append(f"-Wl,-rpath,{openblas.parent}")
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            if verbose:
                print(f"fast BLAS shim did not build:\n{result.stderr}", file=sys.stderr)
            return None
    return out


def active() -> bool:
    """Whether this process runs with the shim preloaded."""
    return os.environ.get(_ACTIVE) == "1"


def reexec_with_fast_blas(python_args: list[str], verbose: bool = True) -> None:
    """Restart this process as `python *python_args` with the shim preloaded (once: the
    restarted process sees the marker and returns at once). Returns without restarting when
    the shim is unavailable or `TINY_LLM_FAST_BLAS=0` is set."""
    if os.environ.get(_ACTIVE) is not None:
        return
    shim = shim_path(verbose)
    if shim is None:
        if verbose and sys.platform.startswith("linux"):
            print("note: no fast BLAS shim (needs cc and NumPy's OpenBLAS); MLX matmuls stay slow")
        return
    env = dict(os.environ, **{_ACTIVE: "1"})
    # One BLAS thread: MLX already keeps a core busy, and OpenBLAS's spinning worker threads
    # slow small matmuls down badly when the cores are shared with other work.
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env["LD_PRELOAD"] = ":".join(filter(None, [str(shim), os.environ.get("LD_PRELOAD")]))
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *python_args], env)


def _matmul_gflops(m: int, k: int, n: int, reps: int = 20) -> float:
    import time

    import mlx.core as mx

    a, b = mx.random.normal((m, k)), mx.random.normal((n, k))
    mx.eval(a, b, a @ b.T)
    start = time.perf_counter()
    for _ in range(reps):
        mx.eval(a @ b.T)
    return 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9


def main() -> None:
    """`python -m tiny_llm_common.fastblas`: MLX float32 matmul speed without and with the shim."""
    shapes = {"1024 x 1024 x 1024": (1024, 1024, 1024), "SmolLM2 MLP, 32 tokens": (32, 576, 1536)}
    if os.environ.get(_ACTIVE) is None:  # first the bundled BLAS, in a child without the shim
        env = dict(os.environ, **{_ACTIVE: "0"})
        subprocess.run([sys.executable, "-m", "tiny_llm_common.fastblas"], env=env, check=True)
        reexec_with_fast_blas(["-m", "tiny_llm_common.fastblas"])
        return  # no shim here: the child's line is all there is
    label = "NumPy's OpenBLAS (shim)" if active() else "MLX's bundled BLAS"
    figures = ", ".join(f"{name}: {_matmul_gflops(*s):.1f} GFLOP/s" for name, s in shapes.items())
    print(f"{label}: {figures}", flush=True)


if __name__ == "__main__":
    main()
