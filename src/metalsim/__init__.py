"""metalsim: run Metal (.metal) compute kernels on a CPU, for correctness.

The .metal file is compiled as C++20 by the system compiler against shim headers for
<metal_stdlib>; every threadgroup runs its threads concurrently (as fibers, or OS threads), so
barriers and SIMD-group functions (32 lanes) behave as on the GPU, and misuse (a divergent
barrier, an out-of-bounds read, a deadlock) becomes a MetalSimError naming the .metal line.

    import metalsim
    lib = metalsim.compile("kernels.metal")
    lib.dispatch_threads("add", threads=(n,), threads_per_threadgroup=(256,),
                         buffers={0: a, 1: b, 2: out})

See the book's appendix "Running Metal kernels on Linux".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from ._bf16 import bf16_to_f32, f32_to_bf16
from ._build import cache_dir
from ._errors import (
    MetalSimArgumentError,
    MetalSimCompileError,
    MetalSimError,
    MetalSimRuntimeError,
    MetalSimTypeError,
)
from ._library import Library

__all__ = [
    "compile",
    "Library",
    "MetalSimError",
    "MetalSimCompileError",
    "MetalSimArgumentError",
    "MetalSimTypeError",
    "MetalSimRuntimeError",
    "bf16_to_f32",
    "f32_to_bf16",
    "cache_dir",
]

_loaded: dict[Path, Library] = {}


def compile(  # noqa: A001 - the API is metalsim.compile
    path: str | Path,
    defines: Mapping[str, str] | None = None,
    include_dirs: Iterable[str | Path] = (),
) -> Library:
    """Compile a .metal file (or find it in the cache) and load its kernels.

    `defines` become -D flags (for what Metal would get from function constants or the host's
    preprocessor options), `include_dirs` -I flags. The cache key is a hash of the preprocessed
    source, the shim, the compiler and its flags; a compile prints
    "metalsim: compiling NAME (first time, ~Ns)" to stderr.
    """
    from ._build import build

    path = Path(path)
    if not path.is_file():
        raise MetalSimCompileError(f"metalsim: no such .metal file: {path}")
    defs: dict[str, str] = {}
    for k, v in (defines or {}).items():
        if not isinstance(k, str) or not k.isidentifier():
            raise MetalSimTypeError(f"define names must be identifiers, got {k!r}")
        if isinstance(v, bool):
            v = int(v)
        if not isinstance(v, str | int | float):
            raise MetalSimTypeError(f"define {k}: value must be a str or a number, got {v!r}")
        defs[k] = str(v)
    dirs = tuple(Path(d) for d in include_dirs)
    built = build(path, defs, dirs)
    lib = _loaded.get(built.so)
    if lib is None:
        lib = _loaded[built.so] = Library(built.so, path)
    return lib
