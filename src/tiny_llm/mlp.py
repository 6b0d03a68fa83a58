"""Week 1 Day 4: the SwiGLU feed-forward block of Llama and Qwen.

Chapter: book/src/week1-04-rmsnorm-mlp.md.
"""

import mlx.core as mx

from tiny_llm_common.weights import QuantizedWeights

from .basics import linear, silu  # noqa: F401 (your Day 1 and Day 4 building blocks)

Weight = mx.array | QuantizedWeights


class MLP:
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int, w_gate: Weight, w_up: Weight, w_down: Weight):
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.w_gate, self.w_up, self.w_down = w_gate, w_up, w_down

    def __call__(self, x: mx.array) -> mx.array:
        """x: [..., dim] -> [..., dim]."""
        # TODO(Week 1 Day 4, task 3): w_gate and w_up are [hidden_dim, dim], w_down [dim, hidden_dim].
        # gate = linear(x, w_gate) and up = linear(x, w_up) are [..., hidden_dim];
        # return linear(silu(gate) * up, w_down) -> [..., dim]. Use `linear`, not `@`: it also
        # handles quantized weights (Day 5).
        raise NotImplementedError(
            "Week 1 Day 4, task 3: implement `MLP.__call__` in src/tiny_llm/mlp.py"
        )
