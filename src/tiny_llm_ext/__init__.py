"""The learner's MLX C++/Metal extension (built from src/extensions/ by `pdm run build-ext`).

`swiglu(gate, up, *, stream=None)` is the Week 2 Day 4 primitive; `_plan_swiglu(gate, up)` returns
the Metal commands its eval_gpu encodes, for `tiny_llm_common.metal_dispatch.run_plan`.
"""

from pathlib import Path

import mlx.core  # noqa: F401  (loads libmlx before the extension needs it)

#: The C++/Metal sources this package is built from (the .metal files live in src/).
SOURCE_DIR = Path(__file__).resolve().parents[1] / "extensions"

try:
    from ._ext import _plan_swiglu, swiglu
except ImportError as e:  # not built yet, or built for another Python/MLX
    raise ImportError(f"tiny_llm_ext is not built ({e}): run `pdm run build-ext`") from e

__all__ = ["SOURCE_DIR", "_plan_swiglu", "swiglu"]
