"""Tiny random Llama / Qwen2 / Qwen3 checkpoints for the graders, and a writer in the hub's layout.

`random_checkpoint` returns what a loader returns, `(ModelArgs, weights in the hub's names)`, so a
test can feed it to the course's `Model`; `write_hub_checkpoint` saves it the way mlx-community
repositories are laid out (config.json + model.safetensors, quantized layers as `.weight`,
`.scales`, `.biases` and a "quantization" entry in the config), so that mlx-lm's own loader, the
graders' oracle, reads the same model offline.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import mlx.core as mx

from tiny_llm_common.weights import ModelArgs, QuantizedWeights

FAMILIES = ("llama", "qwen2", "qwen3")

_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    rms_norm_eps=1e-5,
    max_position_embeddings=512,
)
# What sets each family apart, at the smallest size that still shows it.
_FAMILY = {
    "llama": dict(head_dim=16, rope_theta=10000.0, tie_word_embeddings=False),
    "qwen2": dict(head_dim=16, rope_theta=1e6, tie_word_embeddings=True, attention_bias=True),
    # head_dim 32 != hidden / heads: a model must take head_dim from the config.
    "qwen3": dict(head_dim=32, rope_theta=1e6, tie_word_embeddings=True, qk_norm=True),
}

# Small next to the unit-scale layer outputs: with a large table a tied model's logits are
# dominated by e(last token) . e(last token) and greedy decoding repeats the last token forever.
EMBED_STD = 0.1

# A Llama 3.1-style rope_scaling whose three frequency bands all occur at head_dim 16.
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def random_checkpoint(
    model_type: str,
    *,
    seed: int = 0,
    quantize: tuple[int, int] | None = None,
    **overrides,
) -> tuple[ModelArgs, dict]:
    """A tiny random model: (ModelArgs, {hub tensor name: mx.array | QuantizedWeights}).

    `quantize=(group_size, bits)` quantizes every matrix (projections, embedding, lm_head) with
    mx.quantize, as `mlx_lm.convert -q` does; norms and biases stay float32. `overrides` replace
    ModelArgs fields (e.g. `num_hidden_layers=1`, `rope_scaling=LLAMA3_ROPE_SCALING`).
    """
    if model_type not in FAMILIES:
        raise ValueError(f"model_type must be one of {FAMILIES}, got {model_type!r}")
    args = ModelArgs(model_type=model_type, **{**_COMMON, **_FAMILY[model_type], **overrides})
    key = mx.random.key(seed)

    def normal(shape, std):
        nonlocal key
        key, sub = mx.random.split(key)
        return mx.random.normal(shape, key=sub) * std

    def matrix(n_out, n_in):  # std 1/sqrt(n_in) keeps activations near unit scale
        return normal((n_out, n_in), n_in**-0.5)

    def norm(n):  # not all ones, so a skipped or misplaced norm changes the output
        return 1.0 + normal((n,), 0.2)

    d, hd = args.hidden_size, args.head_dim
    nq, nkv = args.num_attention_heads * hd, args.num_key_value_heads * hd
    w = {"model.embed_tokens.weight": normal((args.vocab_size, d), EMBED_STD)}
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = norm(d)
        w[f"{p}.post_attention_layernorm.weight"] = norm(d)
        for name, n_out in (("q", nq), ("k", nkv), ("v", nkv)):
            w[f"{p}.self_attn.{name}_proj.weight"] = matrix(n_out, d)
            if args.attention_bias:
                w[f"{p}.self_attn.{name}_proj.bias"] = normal((n_out,), 0.5)
        w[f"{p}.self_attn.o_proj.weight"] = matrix(d, nq)
        if args.qk_norm:
            w[f"{p}.self_attn.q_norm.weight"] = norm(hd)
            w[f"{p}.self_attn.k_norm.weight"] = norm(hd)
        w[f"{p}.mlp.gate_proj.weight"] = matrix(args.intermediate_size, d)
        w[f"{p}.mlp.up_proj.weight"] = matrix(args.intermediate_size, d)
        w[f"{p}.mlp.down_proj.weight"] = matrix(d, args.intermediate_size)
    w["model.norm.weight"] = norm(d)
    if not args.tie_word_embeddings:
        w["lm_head.weight"] = matrix(args.vocab_size, d)

    if quantize is not None:
        group_size, bits = quantize
        for name, a in list(w.items()):
            if a.ndim == 2:
                q, s, b = mx.quantize(a, group_size=group_size, bits=bits)
                w[name] = QuantizedWeights(q, s, b, group_size, bits)
    mx.eval([x for v in w.values() for x in _arrays(v)])
    return args, w


def _arrays(v) -> list[mx.array]:
    return [v.weight, v.scales, v.biases] if isinstance(v, QuantizedWeights) else [v]


def write_hub_checkpoint(path: str | Path, args: ModelArgs, weights: dict) -> Path:
    """Save as mlx-community does: `path/config.json` and `path/model.safetensors`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in dataclasses.asdict(args).items() if v is not None}
    tensors, layouts = {}, {}
    for name, v in weights.items():
        if isinstance(v, QuantizedWeights):
            module = name.removesuffix(".weight")
            tensors[f"{module}.weight"] = v.weight
            tensors[f"{module}.scales"] = v.scales
            tensors[f"{module}.biases"] = v.biases
            layouts[module] = (v.group_size, v.bits)
        else:
            tensors[name] = v
    if layouts:
        # One default for the whole model and an entry for each layer that differs from it.
        (group_size, bits), _ = Counter(layouts.values()).most_common(1)[0]
        quant = {"group_size": group_size, "bits": bits}
        for module, (gs, b) in sorted(layouts.items()):
            if (gs, b) != (group_size, bits):
                quant[module] = {"group_size": gs, "bits": b}
        config["quantization"] = quant
        config["quantization_config"] = quant
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    mx.save_safetensors(str(path / "model.safetensors"), tensors, metadata={"format": "mlx"})
    return path
