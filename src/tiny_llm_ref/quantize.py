"""Week 1 Day 5: affine-quantized weights (MLX's format, also what MLX makes of GGUF's Q4/Q8).

Each run of `group_size` consecutive inputs of a row shares one `scale` and one `bias`; each
weight is stored as a `bits`-wide integer q, and w = q * scale + bias. `32 // bits` integers are
packed into one uint32, the first in the lowest bits.
"""

import mlx.core as mx

from tiny_llm_common.weights import QuantizedWeights

SUPPORTED_BITS = (2, 4, 8)  # the widths that divide 32, so no value straddles two words


def _check(qw: QuantizedWeights) -> None:
    if qw.bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {qw.bits}")
    if qw.weight.dtype != mx.uint32:
        raise TypeError(f"packed weight must be uint32, got {qw.weight.dtype}")
    n_in = qw.weight.shape[-1] * 32 // qw.bits
    if qw.group_size <= 0 or n_in % qw.group_size:
        raise ValueError(f"group_size {qw.group_size} does not divide the {n_in} inputs of a row")
    groups = n_in // qw.group_size
    for name, a in (("scales", qw.scales), ("biases", qw.biases)):
        if a.shape != (*qw.weight.shape[:-1], groups):
            raise ValueError(
                f"{name} has shape {a.shape}, expected {(*qw.weight.shape[:-1], groups)}"
            )


def dequantize(qw: QuantizedWeights) -> mx.array:
    """Unpack `qw` to a dense [..., in_features] matrix in the dtype of its scales."""
    _check(qw)
    *lead, packed = qw.weight.shape
    per_word = 32 // qw.bits
    shifts = mx.arange(0, 32, qw.bits, dtype=mx.uint32)  # [per_word]
    mask = mx.array((1 << qw.bits) - 1, dtype=mx.uint32)
    q = (qw.weight[..., None] >> shifts) & mask  # [..., packed, per_word]
    n_in = packed * per_word
    q = q.reshape(*lead, n_in // qw.group_size, qw.group_size).astype(qw.scales.dtype)
    w = q * qw.scales[..., None] + qw.biases[..., None]
    return w.reshape(*lead, n_in)


def quantized_linear(x: mx.array, qw: QuantizedWeights, bias: mx.array | None = None) -> mx.array:
    """x @ dequantize(qw).T + bias, without ever materialising the dense matrix."""
    _check(qw)
    if qw.weight.ndim != 2:
        raise ValueError(f"a linear layer's packed weight is 2-D, got {qw.weight.shape}")
    if x.shape[-1] != qw.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the layer expects {qw.shape[1]}")
    y = mx.quantized_matmul(
        x, qw.weight, qw.scales, qw.biases, transpose=True, group_size=qw.group_size, bits=qw.bits
    )
    return y if bias is None else y + bias


def quantized_embedding(tokens: mx.array, qw: QuantizedWeights) -> mx.array:
    """Rows `tokens` of a quantized embedding table: [...] int -> [..., hidden].

    Gathering the packed rows first and dequantizing only those keeps a lookup cheap: SmolLM2's
    table is 49152 x 576, and a prompt needs a handful of its rows.
    """
    rows = QuantizedWeights(
        qw.weight[tokens], qw.scales[tokens], qw.biases[tokens], qw.group_size, qw.bits
    )
    return dequantize(rows)
