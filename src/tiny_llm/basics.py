"""Week 1 Day 1 (softmax, linear) and Day 4 (silu): the building blocks every layer uses.

Chapters: book/src/week1-01-attention.md (softmax, linear), book/src/week1-04-rmsnorm-mlp.md (silu).
"""

import mlx.core as mx

from tiny_llm_common.weights import QuantizedWeights


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """Numerically stable softmax along `axis`; the result has the dtype of `x`.

    softmax(x)_i = exp(x_i - m) / sum_j exp(x_j - m), with m = max_j x_j.
    """
    # TODO(Week 1 Day 1, task 1):
    # - compute in float32 (x.astype(mx.float32)): float16 exp() overflows above about 11;
    # - subtract the max along `axis` (keepdims=True) before mx.exp, so the largest term is
    #   exp(0) = 1 and nothing overflows; -inf entries (masked keys) then give exactly 0;
    # - divide by the sum along `axis` and cast back to x.dtype.
    raise NotImplementedError("Week 1 Day 1, task 1: implement `softmax` in src/tiny_llm/basics.py")


def linear(x: mx.array, w: "mx.array | QuantizedWeights", bias: mx.array | None = None) -> mx.array:
    """y = x @ w.T + bias, with w stored [out_features, in_features] as in PyTorch and the hub.

    x: [..., in_features] -> y: [..., out_features].
    """
    if isinstance(w, QuantizedWeights):
        from .quantize import quantized_linear  # Week 1 Day 5

        return quantized_linear(x, w, bias)
    # TODO(Week 1 Day 1, task 2): the dense case. `w` is [out, in], so multiply by its
    # transpose (w.T); add `bias` ([out], broadcast over the leading axes) only when given.
    raise NotImplementedError("Week 1 Day 1, task 2: implement `linear` in src/tiny_llm/basics.py")


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x), the gate activation of SwiGLU."""
    # TODO(Week 1 Day 4, task 2): x * mx.sigmoid(x) (or x / (1 + exp(-x))), same dtype as x.
    raise NotImplementedError("Week 1 Day 4, task 2: implement `silu` in src/tiny_llm/basics.py")
