"""Week 1 Day 5: the Llama / Qwen2 / Qwen3 decoder, built from weights in the hub's names."""

from __future__ import annotations

import math  # noqa: F401  (llama3_inv_freqs needs math.pi)

import mlx.core as mx

from tiny_llm_common.weights import ModelArgs, QuantizedWeights  # noqa: F401

from .attention import scaled_dot_product_attention_grouped  # noqa: F401
from .basics import linear  # noqa: F401
from .layer_norm import RMSNorm  # noqa: F401
from .mlp import MLP  # noqa: F401
from .positional_encoding import RoPE
from .quantize import quantized_embedding  # noqa: F401

Weights = dict[str, "mx.array | QuantizedWeights"]


def llama3_inv_freqs(dims: int, base: float, scaling: dict) -> mx.array:
    """Llama 3.1's RoPE scaling: inverse frequencies [dims/2] for a longer context.

    Rotations with wavelengths longer than the original context are slowed by `factor`, short
    ones are kept, and the band between is blended linearly in 1 / wavelength.
    """
    # TODO: inv = 1 / base ** (arange(0, dims, 2) / dims) (float32), wavelen = 2*pi / inv.
    # scaling has "factor", "low_freq_factor" (default 1), "high_freq_factor" (default 4) and
    # "original_max_position_embeddings" (default 8192), call it old_len.
    # - wavelen > old_len / low_freq_factor  -> inv / factor   (slow rotations are stretched)
    # - wavelen < old_len / high_freq_factor -> inv            (fast rotations are kept)
    # - between: s = (old_len / wavelen - low) / (high - low), (1 - s) * inv / factor + s * inv
    # (Clipping s to [0, 1] gives all three cases in one expression.)
    raise NotImplementedError(
        "Week 1 Day 5, task 4: implement `llama3_inv_freqs` in src/tiny_llm/model.py"
    )


def rope_for(args: ModelArgs) -> RoPE:
    """The model's one RoPE table, shared by every layer (HF layout: traditional=False)."""
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "llama3":
        freqs = llama3_inv_freqs(args.head_dim, args.rope_theta, scaling)
    elif kind == "default":
        freqs = None
    else:
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, llama3)")
    return RoPE(args.head_dim, args.max_position_embeddings, args.rope_theta, False, freqs)


class Attention:
    """Grouped-query self-attention with RoPE; Qwen2 adds q/k/v biases, Qwen3 per-head RMSNorm."""

    def __init__(self, args: ModelArgs, weights: Weights, prefix: str, rope: RoPE):
        # TODO: keep the head counts, args.head_dim (Qwen3's is not hidden / heads), the scale
        # head_dim ** -0.5 and `rope`; the four projections f"{prefix}.{q,k,v,o}_proj.weight"
        # (an mx.array or a QuantizedWeights: `linear` handles both); the biases
        # f"{prefix}.{q,k,v}_proj.bias" (Qwen2, args.attention_bias; None when absent); and for
        # Qwen3 (args.qk_norm) RMSNorm(head_dim, ...) from f"{prefix}.q_norm.weight" and
        # f"{prefix}.k_norm.weight".
        raise NotImplementedError(
            "Week 1 Day 5, task 5: implement `Attention.__init__` in src/tiny_llm/model.py"
        )

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        # TODO: x [B, L, hidden] -> [B, L, hidden].
        # 1. Project q, k, v (with biases if any) and view them as [B, L, heads, head_dim].
        # 2. Qwen3: apply q_norm / k_norm to each head. Then RoPE (it takes [B, L, H, D]) with
        #    offset = cache.offset if a cache is given, else 0; transpose to [B, H, L, D].
        # 3. No cache: scaled_dot_product_attention_grouped(q, k, v, scale, mask="causal").
        #    With a cache: cache.attend(q, k, v, scale) (the cache stores k and v itself).
        # 4. Back to [B, L, H * D] and through o_proj.
        raise NotImplementedError(
            "Week 1 Day 5, task 5: implement `Attention.__call__` in src/tiny_llm/model.py"
        )


class TransformerBlock:
    """Pre-norm residual block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, args: ModelArgs, weights: Weights, layer: int, rope: RoPE):
        # TODO: the names start with f"model.layers.{layer}": input_layernorm.weight,
        # self_attn.* (an Attention with prefix f"model.layers.{layer}.self_attn"),
        # post_attention_layernorm.weight and mlp.{gate,up,down}_proj.weight (your MLP).
        raise NotImplementedError(
            "Week 1 Day 5, task 6: implement `TransformerBlock.__init__` in src/tiny_llm/model.py"
        )

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        # TODO: h = x + attention(input_layernorm(x), cache); h + mlp(post_attention_layernorm(h))
        raise NotImplementedError(
            "Week 1 Day 5, task 6: implement `TransformerBlock.__call__` in src/tiny_llm/model.py"
        )


class Model:
    """tokens [B, L] -> float32 logits [B, L, vocab]; `cache` is None or one object per layer."""

    def __init__(self, args: ModelArgs, weights: Weights):
        # TODO: keep args; the embedding table "model.embed_tokens.weight" (an mx.array, or a
        # QuantizedWeights as in SmolLM2); one RoPE for all layers (rope_for(args)); one
        # TransformerBlock per layer; the final RMSNorm "model.norm.weight"; and the output
        # projection: "lm_head.weight", or the embedding table itself when
        # args.tie_word_embeddings.
        raise NotImplementedError(
            "Week 1 Day 5, task 7: implement `Model.__init__` in src/tiny_llm/model.py"
        )

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} entries, the model {len(self.layers)} layers")
        start = 0 if cache is None else cache[0].offset
        end = (start if isinstance(start, int) else 0) + tokens.shape[1]
        if end > self.args.max_position_embeddings:
            raise ValueError(
                f"position {end} is past max_position_embeddings "
                f"({self.args.max_position_embeddings})"
            )
        # TODO: embed the tokens (quantized_embedding for a QuantizedWeights table, plain
        # indexing otherwise) and cast them to the dtype of the final norm's weight (float32 for
        # the GGUF model: its float16 scales would otherwise make every layer run in float16,
        # slow on a CPU and not what mlx-lm computes); run every layer with its own cache entry
        # (None when cache is None); apply the final norm and the output projection; return
        # float32 logits.
        raise NotImplementedError(
            "Week 1 Day 5, task 7: implement `Model.__call__` in src/tiny_llm/model.py"
        )
