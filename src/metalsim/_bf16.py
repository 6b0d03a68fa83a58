"""bfloat16 as NumPy has no such dtype: values travel as np.uint16 bit patterns."""

from __future__ import annotations

import numpy as np


def f32_to_bf16(x) -> np.ndarray:
    """float32 values -> bfloat16 bit patterns (np.uint16), rounding to nearest, ties to even.

    NaN stays a (quiet) NaN; values beyond the bfloat16 range round to infinity.
    """
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    out = np.where(nan, (u >> 16) | 0x40, rounded)
    return out.astype(np.uint16)


def bf16_to_f32(u) -> np.ndarray:
    """bfloat16 bit patterns (np.uint16) -> float32 values (exact)."""
    a = np.ascontiguousarray(u)
    if a.dtype != np.uint16:
        raise TypeError(f"bf16_to_f32 expects np.uint16 bit patterns, got {a.dtype}")
    return (a.astype(np.uint32) << 16).view(np.float32)
