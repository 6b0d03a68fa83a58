"""Week 2 Day 4: the course's own MLX primitives, from the C++/Metal extension.

Your kernels live in `src/extensions/src/` (C++ for the CPU, Metal for the GPU; the tasks are in
the Week 2 Day 4 chapter) and are built into the `tiny_llm_ext` package by `pdm run build-ext`.
This wrapper is given. Importing this module does not need the extension; calling a kernel does.
"""

import importlib
from types import ModuleType

import mlx.core as mx

#: The package the built extension is imported from.
EXTENSION = "tiny_llm_ext"


def extension() -> ModuleType:
    """The built extension module (ImportError naming the build command if it is missing)."""
    return importlib.import_module(EXTENSION)


def swiglu(
    gate: mx.array, up: mx.array, *, stream: mx.Stream | mx.Device | None = None
) -> mx.array:
    """silu(gate) * up as one fused primitive; gate and up broadcast and share a float dtype."""
    return extension().swiglu(gate, up, stream=stream)
