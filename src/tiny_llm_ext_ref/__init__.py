"""The reference MLX C++/Metal extension (built from src/extensions_ref/ by `pdm run build-ext-ref`).

`swiglu(gate, up, *, stream=None)` is the Week 2 Day 4 primitive; `_plan_swiglu(gate, up)` returns
the Metal commands its eval_gpu encodes, for `tiny_llm_common.metal_dispatch.run_plan`.
"""

from pathlib import Path

import mlx.core  # noqa: F401  (loads libmlx before the extension needs it)

#: The C++/Metal sources this package is built from (the .metal files live in src/).
SOURCE_DIR = Path(__file__).resolve().parents[1] / "extensions_ref"

try:
    from ._ext import _plan_swiglu, _swiglu_synchronous, swiglu
except ImportError as e:  # not built yet, or built for another Python/MLX
    raise ImportError(f"tiny_llm_ext_ref is not built ({e}): run `pdm run build-ext-ref`") from e

__all__ = ["SOURCE_DIR", "_plan_swiglu", "_swiglu_synchronous", "swiglu"]
