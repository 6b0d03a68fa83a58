"""What the benches print about the machine they ran on: the CPU and the BLAS MLX calls."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import mlx.core as mx


def describe_machine() -> str:
    """CPU model and core count (Linux), else what `platform` knows."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        name = next(
            ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if "model name" in ln
        )
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{os.cpu_count()}-core {name}, {platform.system()}"


def detect_blas() -> str:
    """Which BLAS library MLX's CPU matmuls call, from the libraries this process mapped."""
    mx.eval(mx.ones((8, 8)) @ mx.ones((8, 8)))  # make sure the BLAS is loaded
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    libs = {ln.split()[-1] for ln in maps.splitlines() if "blas" in ln.lower() and "/" in ln}
    # NumPy's own OpenBLAS (libscipy_openblas64_) has renamed symbols: MLX cannot call it.
    libs = sorted(lib for lib in libs if "scipy_openblas" not in lib)
    names = ", ".join(Path(lib).name for lib in libs)
    if any("openblas" in Path(lib).name.lower() for lib in libs):
        return f"OpenBLAS, preloaded ({names})"
    if any("mlx_cpu" in lib for lib in libs):
        return f"the reference BLAS bundled with mlx-cpu ({names})"
    return f"unknown ({names or 'no BLAS library mapped'})"
