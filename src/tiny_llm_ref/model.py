"""Week 1 Day 5: the Llama / Qwen2 / Qwen3 decoder, built from weights in the hub's names."""

from __future__ import annotations

import math

import mlx.core as mx

from tiny_llm_common.weights import ModelArgs, QuantizedWeights

from .attention import scaled_dot_product_attention_grouped
from .basics import linear
from .layer_norm import RMSNorm
from .mlp import MLP
from .positional_encoding import RoPE
from .quantize import quantized_embedding

Weights = dict[str, "mx.array | QuantizedWeights"]


def llama3_inv_freqs(dims: int, base: float, scaling: dict) -> mx.array:
    """Llama 3.1's RoPE scaling: inverse frequencies [dims/2] for a longer context.

    Rotations with wavelengths longer than the original context are slowed by `factor`, short
    ones are kept, and the band between is blended linearly in 1 / wavelength.
    """
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    inv = 1.0 / base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    wavelen = 2 * math.pi / inv
    keep = mx.clip((old_len / wavelen - low) / (high - low), 0.0, 1.0)  # 0: slow down, 1: keep
    return (1 - keep) * inv / factor + keep * inv


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
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        self.rope = rope
        self.wq, self.wk, self.wv, self.wo = (weights[f"{prefix}.{n}_proj.weight"] for n in "qkvo")
        # A flag in the config makes a missing tensor an error; extra tensors are used regardless.
        get = weights.__getitem__ if args.attention_bias else weights.get
        self.bq, self.bk, self.bv = (get(f"{prefix}.{n}_proj.bias") for n in "qkv")
        self.q_norm = self.k_norm = None
        if args.qk_norm or f"{prefix}.q_norm.weight" in weights:
            eps = args.rms_norm_eps
            self.q_norm = RMSNorm(self.head_dim, weights[f"{prefix}.q_norm.weight"], eps)
            self.k_norm = RMSNorm(self.head_dim, weights[f"{prefix}.k_norm.weight"], eps)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        B, L, _ = x.shape
        q = linear(x, self.wq, self.bq).reshape(B, L, self.n_heads, self.head_dim)
        k = linear(x, self.wk, self.bk).reshape(B, L, self.n_kv_heads, self.head_dim)
        v = linear(x, self.wv, self.bv).reshape(B, L, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:  # Qwen3 normalises each head before rotating it
            q, k = self.q_norm(q), self.k_norm(k)
        offset = 0 if cache is None else cache.offset
        q = self.rope(q, offset).transpose(0, 2, 1, 3)  # [B, H, L, D]
        k = self.rope(k, offset).transpose(0, 2, 1, 3)
        v = v.transpose(0, 2, 1, 3)
        if cache is None:
            out = scaled_dot_product_attention_grouped(q, k, v, self.scale, mask="causal")
        else:
            out = cache.attend(q, k, v, self.scale)
        return linear(out.transpose(0, 2, 1, 3).reshape(B, L, -1), self.wo)


class TransformerBlock:
    """Pre-norm residual block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, args: ModelArgs, weights: Weights, layer: int, rope: RoPE):
        p = f"model.layers.{layer}"
        dim, eps = args.hidden_size, args.rms_norm_eps
        self.input_layernorm = RMSNorm(dim, weights[f"{p}.input_layernorm.weight"], eps)
        self.self_attn = Attention(args, weights, f"{p}.self_attn", rope)
        self.post_attention_layernorm = RMSNorm(
            dim, weights[f"{p}.post_attention_layernorm.weight"], eps
        )
        mlp = [weights[f"{p}.mlp.{n}_proj.weight"] for n in ("gate", "up", "down")]
        self.mlp = MLP(dim, args.intermediate_size, *mlp)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Model:
    """tokens [B, L] -> float32 logits [B, L, vocab]; `cache` is None or one object per layer."""

    def __init__(self, args: ModelArgs, weights: Weights):
        self.args = args
        self.embed_tokens = weights["model.embed_tokens.weight"]
        rope = rope_for(args)
        self.layers = [
            TransformerBlock(args, weights, i, rope) for i in range(args.num_hidden_layers)
        ]
        self.norm = RMSNorm(args.hidden_size, weights["model.norm.weight"], args.rms_norm_eps)
        # Tied embeddings: the output projection reuses the (possibly quantized) input table.
        tied = args.tie_word_embeddings
        self.lm_head = self.embed_tokens if tied else weights["lm_head.weight"]

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
        if isinstance(self.embed_tokens, QuantizedWeights):
            h = quantized_embedding(tokens, self.embed_tokens)
        else:
            h = self.embed_tokens[tokens]
        # Compute in the norms' dtype, as mlx-lm's type promotion does: float32 for GGUF files
        # (float16 scales, float32 norms), whose float16 matmuls would be slow on a CPU.
        h = h.astype(self.norm.weight.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, None if cache is None else cache[i])
        return linear(self.norm(h), self.lm_head).astype(mx.float32)
