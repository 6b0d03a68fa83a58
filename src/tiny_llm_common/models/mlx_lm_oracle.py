"""Build mlx-lm's own model from course weights: the independent oracle for whole-model graders.

`build_mlx_lm_model(args, weights)` returns mlx-lm's Llama / Qwen2 / Qwen3 `Model` holding the
same tensors the course's `Model(args, weights)` gets, quantized layers as mlx-lm's
`QuantizedLinear` / `QuantizedEmbedding` (or dequantized with `dequantize=True`).
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn

from tiny_llm_common.weights import ModelArgs, QuantizedWeights


def dequantize(w: QuantizedWeights, dtype=mx.float32) -> mx.array:
    return mx.dequantize(w.weight, w.scales, w.biases, group_size=w.group_size, bits=w.bits).astype(
        dtype
    )


def build_mlx_lm_model(
    args: ModelArgs,
    weights: dict,
    dequantize_weights: bool = False,
    rope_traditional: bool = False,
    dtype=None,
):
    """mlx-lm's model for `args`, loaded with `weights` (the hub's names).

    `rope_traditional=True` selects interleaved RoPE (llama only): the layout llama.cpp's
    permuted Q/K rows expect. `dtype` casts the non-quantized floating tensors.
    """
    from mlx_lm.models import llama, qwen2, qwen3

    module = {"llama": llama, "qwen2": qwen2, "qwen3": qwen3}[args.model_type]
    fields = {f.name for f in dataclasses.fields(module.ModelArgs)}
    config = {k: v for k, v in dataclasses.asdict(args).items() if k in fields}
    if rope_traditional:
        config["rope_traditional"] = True
    model = module.Model(module.ModelArgs(**config))

    flat: dict[str, mx.array] = {}
    quant: dict[str, dict] = {}
    for name, value in weights.items():
        if isinstance(value, QuantizedWeights):
            if dequantize_weights:
                flat[name] = dequantize(value, dtype or mx.float32)
                continue
            prefix = name[: -len(".weight")]
            quant[prefix] = {"group_size": value.group_size, "bits": value.bits}
            flat[name] = value.weight
            flat[f"{prefix}.scales"] = value.scales
            flat[f"{prefix}.biases"] = value.biases
        else:
            cast = dtype is not None and mx.issubdtype(value.dtype, mx.floating)
            flat[name] = value.astype(dtype) if cast else value
    if quant:
        nn.quantize(model, class_predicate=lambda path, m: quant.get(path, False))
    model.load_weights(list(flat.items()), strict=True)
    mx.eval(model.parameters())
    return model
