"""Week 1 Day 1 (softmax, linear) and Day 4 (silu): the building blocks every layer uses."""

import mlx.core as mx

from tiny_llm_common.weights import QuantizedWeights


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """Numerically stable softmax: subtract the max so exp() never overflows."""
    x32 = x.astype(mx.float32)
    e = mx.exp(x32 - mx.max(x32, axis=axis, keepdims=True))
    return (e / mx.sum(e, axis=axis, keepdims=True)).astype(x.dtype)


def linear(x: mx.array, w: "mx.array | QuantizedWeights", bias: mx.array | None = None) -> mx.array:
    """y = x @ w.T + bias, with w stored [out_features, in_features] as in PyTorch and the hub."""
    if isinstance(w, QuantizedWeights):
        from .quantize import quantized_linear  # Week 1 Day 5

        return quantized_linear(x, w, bias)
    y = x @ w.T
    return y if bias is None else y + bias


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x), the gate activation of SwiGLU."""
    return x * mx.sigmoid(x)
