"""Week 1 Day 5: affine-quantized weights (MLX's format, also what MLX makes of GGUF's Q4/Q8).

Each run of `group_size` consecutive inputs of a row shares one `scale` and one `bias`; each
weight is stored as a `bits`-wide integer q, and w = q * scale + bias. `32 // bits` integers are
packed into one uint32, the first in the lowest bits.
"""

import mlx.core as mx

from tiny_llm_common.weights import QuantizedWeights

SUPPORTED_BITS = (2, 4, 8)  # the widths that divide 32, so no value straddles two words


def _check(qw: QuantizedWeights) -> None:
    """Provided: reject inconsistent shapes before any arithmetic."""
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
    # TODO: with per_word = 32 // bits values in each uint32 word, value j of a word is
    #   (word >> (j * bits)) & (2**bits - 1).
    # 1. Shift every word by [0, bits, 2*bits, ...] (broadcast a new last axis) and mask:
    #    [..., packed] -> [..., packed, per_word]; flattened that is [..., in_features] in order.
    # 2. View it as [..., in_features / group_size, group_size], cast to scales.dtype, and apply
    #    w = q * scale + bias with scales/biases [..., groups] broadcast over the group axis.
    # 3. Reshape back to [..., in_features]. Work on any leading shape (quantized_embedding
    #    calls this on gathered rows [B, L, packed]).
    raise NotImplementedError(
        "Week 1 Day 5, task 1: implement `dequantize` in src/tiny_llm/quantize.py"
    )


def quantized_linear(x: mx.array, qw: QuantizedWeights, bias: mx.array | None = None) -> mx.array:
    """x @ dequantize(qw).T + bias, without ever materialising the dense matrix."""
    _check(qw)
    if qw.weight.ndim != 2:
        raise ValueError(f"a linear layer's packed weight is 2-D, got {qw.weight.shape}")
    if x.shape[-1] != qw.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the layer expects {qw.shape[1]}")
    # TODO: one call to mx.quantized_matmul(x, weight, scales, biases, transpose=True,
    # group_size=..., bits=...) multiplies straight from the packed words; then add `bias`.
    raise NotImplementedError(
        "Week 1 Day 5, task 2: implement `quantized_linear` in src/tiny_llm/quantize.py"
    )


def quantized_embedding(tokens: mx.array, qw: QuantizedWeights) -> mx.array:
    """Rows `tokens` of a quantized embedding table: [...] int -> [..., hidden].

    Gathering the packed rows first and dequantizing only those keeps a lookup cheap: SmolLM2's
    table is 49152 x 576, and a prompt needs a handful of its rows.
    """
    # TODO: index weight, scales and biases with `tokens`, wrap the three in a QuantizedWeights
    # (same group_size and bits) and dequantize only those rows.
    raise NotImplementedError(
        "Week 1 Day 5, task 3: implement `quantized_embedding` in src/tiny_llm/quantize.py"
    )
