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


def dequantized_weights(weights: dict) -> dict:
    """The same weights with every quantized matrix unpacked to dense float32 (evaluated), so
    that its matmuls go to the BLAS; other tensors unchanged."""
    out = {k: dequantize(v) if isinstance(v, QuantizedWeights) else v for k, v in weights.items()}
    mx.eval(out)
    return out


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


# -- decoding with the oracle (graders of the serving engine, Week 3 days 4-7) -------------------
TIE_GAP = 1e-3  # a grader's oracle step must beat its runner-up by this much (nats)


def greedy_tokens(oracle, prompt: list[int], max_tokens: int) -> list[int]:
    """mlx-lm's greedy tokens for `prompt` decoded alone (its own KVCache, `generate_step`).
    Fails if a step nearly ties, where float rounding could flip a correct implementation's
    token: the grader must then pick another seed."""
    import numpy as np
    from mlx_lm.generate import generate_step

    out = []
    for token, logprobs in generate_step(mx.array(prompt), oracle, max_tokens=max_tokens):
        top2 = np.sort(np.array(logprobs))[-2:]
        assert top2[1] - top2[0] > TIE_GAP, "the oracle nearly ties: pick another seed"
        out.append(int(token))
    return out


def seeded_samples(oracle, prompt: list[int], params) -> list[list[int]]:
    """A request's `params.n` samples (temperature only), each decoded alone by mlx-lm and drawn
    with the engine's documented key for sample i, token t: (seed + i) * 1_000_003 + t, by the
    Gumbel-max trick (`mx.random.categorical` draws the same way)."""
    import numpy as np
    from mlx_lm.models.cache import make_prompt_cache

    samples = []
    for i in range(params.n):
        seed, cache, out = params.seed + i, make_prompt_cache(oracle), []
        logits = oracle(mx.array([prompt], dtype=mx.int32), cache=cache)[0, -1]
        for t in range(params.max_tokens):
            row = logits.astype(mx.float32) / params.temperature
            row = row - mx.logsumexp(row)
            key = mx.random.key((seed * 1_000_003 + t) % (1 << 63))
            scores = np.array(row + mx.random.gumbel(row.shape, key=key))
            top2 = np.sort(scores)[-2:]
            assert top2[1] - top2[0] > TIE_GAP, "the oracle's draw nearly ties: pick another seed"
            out.append(int(np.argmax(scores)))
            logits = oracle(mx.array([[out[-1]]], dtype=mx.int32), cache=cache)[0, -1]
        samples.append(out)
    return samples
