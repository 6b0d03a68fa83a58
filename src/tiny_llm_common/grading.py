"""Shared helpers for the graders in tests_refsol/.

The one switch: `TINY_LLM_SOLUTION` names the package the graders import, `tiny_llm` (the
learner's, what `pdm run test` sets) or `tiny_llm_ref` (the reference, `pdm run test-refsol` and the
default when pytest is run by hand).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import numpy as np

SOLUTION_ENV = "TINY_LLM_SOLUTION"
_CHOICES = ("tiny_llm", "tiny_llm_ref")


def solution_name() -> str:
    name = os.environ.get(SOLUTION_ENV, "tiny_llm_ref")
    if name not in _CHOICES:
        raise ValueError(f"{SOLUTION_ENV}={name!r}: expected one of {', '.join(_CHOICES)}")
    return name


def solution() -> ModuleType:
    """The package under test: `tiny_llm` or `tiny_llm_ref`."""
    return importlib.import_module(solution_name())


def to_numpy(x) -> np.ndarray:
    """An mx.array (any dtype, bfloat16 included) or array-like as a float64/int NumPy array."""
    import mlx.core as mx

    if isinstance(x, mx.array):
        if x.dtype in (mx.float16, mx.bfloat16):
            x = x.astype(mx.float32)
        return np.array(x)
    return np.asarray(x)


def assert_allclose(actual, expected, *, atol: float, rtol: float = 0.0, what: str = "output"):
    """np.testing.assert_allclose with a shape check and a message that states the tolerance."""
    a = to_numpy(actual)
    e = to_numpy(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape}, expected {e.shape}"
    err = float(np.max(np.abs(a.astype(np.float64) - e.astype(np.float64)))) if a.size else 0.0
    np.testing.assert_allclose(
        a,
        e,
        atol=atol,
        rtol=rtol,
        err_msg=f"{what}: max abs error {err:.3g} (atol={atol}, rtol={rtol})",
    )


# Tolerances per dtype for results compared with a float64 NumPy oracle.
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}
