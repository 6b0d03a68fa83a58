"""Types shared by the loader, the reference and the learner's code."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass
class QuantizedWeights:
    """A linear layer's weight in MLX's affine quantized format.

    `weight` packs `32 // bits` values per uint32 along the input dimension; each group of
    `group_size` inputs has its own `scales` and `biases`: w = q * scale + bias.
    """

    weight: mx.array  # uint32 [out_features, in_features * bits / 32]
    scales: mx.array  # [out_features, in_features / group_size]
    biases: mx.array  # [out_features, in_features / group_size]
    group_size: int
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the dequantized matrix."""
        return (self.weight.shape[0], self.weight.shape[1] * 32 // self.bits)


@dataclass
class ModelArgs:
    """The shape of a Llama / Qwen2 / Qwen3 decoder, in the hub's config.json names."""

    model_type: str  # "llama", "qwen2" or "qwen3"
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # e.g. Llama 3's {"rope_type": "llama3", ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # Qwen2: biases on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on each query and key head

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
