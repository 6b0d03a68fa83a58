"""Week 1 Day 4: RMSNorm.

Chapter: book/src/week1-04-rmsnorm-mlp.md.
"""

import mlx.core as mx


class RMSNorm:
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 for stability."""

    def __init__(self, dim: int, weight: mx.array, eps: float = 1e-5):
        self.dim = dim
        self.weight = weight
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        """x: [..., dim] -> [..., dim], in x's dtype."""
        # TODO(Week 1 Day 4, task 1):
        # - cast x (and self.weight) to float32: in float16, x*x overflows once |x| > 255;
        # - mean of x^2 over the last axis (keepdims=True), add self.eps, mx.rsqrt;
        # - multiply x by it and by the weight ([dim], broadcast), cast back to x.dtype.
        raise NotImplementedError(
            "Week 1 Day 4, task 1: implement `RMSNorm.__call__` in src/tiny_llm/layer_norm.py"
        )
