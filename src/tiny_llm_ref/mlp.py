"""Week 1 Day 4: the SwiGLU feed-forward block of Llama and Qwen."""

import mlx.core as mx

from tiny_llm_common.weights import QuantizedWeights

from .basics import linear, silu

Weight = mx.array | QuantizedWeights


class MLP:
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int, w_gate: Weight, w_up: Weight, w_down: Weight):
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.w_gate, self.w_up, self.w_down = w_gate, w_up, w_down

    def __call__(self, x: mx.array) -> mx.array:
        return linear(silu(linear(x, self.w_gate)) * linear(x, self.w_up), self.w_down)
