"""Week 2 Day 2: counting what generation costs with and without the KV cache.

Oracles: brute-force loops that add up each step's work; the generators themselves (Week 1's
`simple_generate` and Day 1's `generate_with_cache`) run on a model that records what it is fed;
the weight matrices of a random checkpoint, counted one by one; and NumPy's `polyfit` for the
power-law fit.
"""

import importlib
import math

import mlx.core as mx
import numpy as np
import pytest

from tiny_llm_common.checkpoints import random_checkpoint
from tiny_llm_common.grading import solution
from tiny_llm_common.weights import ModelArgs, QuantizedWeights

sol = solution()
for _module in ("complexity", "decode", "generate"):
    importlib.import_module(f"{sol.__name__}.{_module}")
cx = sol.complexity

CASES = [(1, 1), (1, 10), (4, 32), (17, 5), (100, 1000)]

# SmolLM2-135M's shape (its config.json): the chapter's numbers.
SMOLLM2 = ModelArgs(
    model_type="llama",
    hidden_size=576,
    num_hidden_layers=30,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    head_dim=64,
)


# --- Task 1: tokens_processed -------------------------------------------------------------------


@pytest.mark.parametrize("prompt_len,new_tokens", CASES)
def test_tokens_processed_matches_a_loop(prompt_len, new_tokens):
    no_cache = sum(prompt_len + i for i in range(new_tokens))
    cached = prompt_len + sum(1 for _ in range(1, new_tokens))
    assert cx.tokens_processed(prompt_len, new_tokens, False) == no_cache
    assert cx.tokens_processed(prompt_len, new_tokens, True) == cached
    assert cx.tokens_processed(prompt_len, 0, True) == 0


class Recording:
    """A stand-in model: records how many positions each call feeds, returns fixed logits."""

    def __init__(self):
        self.args = ModelArgs("llama", 8, 3, 16, 2, 1, 50, max_position_embeddings=4096)
        self.fed = []
        self.logits = mx.arange(50, dtype=mx.float32)  # argmax: token 49, never an EOS here

    def __call__(self, tokens, cache=None):
        B, L = tokens.shape
        self.fed.append(L)
        return mx.broadcast_to(self.logits, (B, L, 50))


@pytest.mark.parametrize("cached", [False, True], ids=["simple_generate", "generate_with_cache"])
def test_counts_match_what_the_generators_do(cached):
    model = Recording()
    if cached:
        sol.decode.generate_with_cache(model, None, [1, 2, 3, 4, 5], 12)
    else:
        sol.generate.simple_generate(model, None, [1, 2, 3, 4, 5], 12)
    assert len(model.fed) == cx.forward_calls(12, cached), "one forward call per token"
    assert sum(model.fed) == cx.tokens_processed(5, 12, cached), f"positions fed: {model.fed}"
    scores = sum(L * (sum(model.fed[:i]) if cached else 0) + L * L for i, L in enumerate(model.fed))
    assert cx.attention_scores(5, 12, cached) == scores


def test_arguments_are_checked():
    assert cx.tokens_processed(2, 3, True) == 4
    for bad in ((0, 3), (3, -1)):
        with pytest.raises(ValueError):
            cx.tokens_processed(*bad, True)
    with pytest.raises(TypeError):
        cx.tokens_processed(2.5, 3, True)


# --- Task 2: attention_scores -------------------------------------------------------------------


@pytest.mark.parametrize("prompt_len,new_tokens", CASES)
def test_attention_scores_match_a_loop(prompt_len, new_tokens):
    no_cache = sum((prompt_len + i) ** 2 for i in range(new_tokens))
    cached = prompt_len**2 + sum(prompt_len + i for i in range(1, new_tokens))
    got = cx.attention_scores(prompt_len, new_tokens, False)
    assert got == no_cache and isinstance(got, int), f"no cache: {got!r} != {no_cache}"
    assert cx.attention_scores(prompt_len, new_tokens, True) == cached


def test_the_cache_changes_the_exponent():
    """The lecture's table: N^3 scores without the cache, N^2 with it (ratio of N = 2k vs k)."""
    for cached, power in ((False, 3), (True, 2)):
        a, b = cx.attention_scores(1, 10_000, cached), cx.attention_scores(1, 20_000, cached)
        assert abs(math.log2(b / a) - power) < 0.01


# --- Task 3: dense_flops_per_token --------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_dense_flops_count_the_checkpoints_matrices(family):
    args, weights = random_checkpoint(
        family, seed=0, quantize=(32, 4) if family == "qwen3" else None
    )
    weights_per_token = 0
    for name, w in weights.items():
        shape = w.shape if isinstance(w, QuantizedWeights) else tuple(w.shape)
        if len(shape) == 2 and name != "model.embed_tokens.weight":
            weights_per_token += shape[0] * shape[1]  # each matrix multiplies every position
    if args.tie_word_embeddings:  # the output projection reuses the embedding table
        weights_per_token += args.vocab_size * args.hidden_size
    assert cx.dense_flops_per_token(args) == 2 * weights_per_token
    assert cx.dense_flops(args, 3, 7, True) == 2 * weights_per_token * (3 + 6)


def test_attention_share_smollm2():
    # Attention flops per step grow with the context, the matrices' do not: they are equal at
    # context = dense / (4 * head_dim * heads * layers).
    per_token = 2 * (30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) + 576 * 49152)
    assert cx.dense_flops_per_token(SMOLLM2) == per_token
    even = per_token / (4 * 64 * 9 * 30)
    assert cx.attention_share(SMOLLM2, round(even)) == pytest.approx(0.5, abs=1e-3)
    assert cx.attention_share(SMOLLM2, 64) < 0.05
    assert cx.attention_flops(SMOLLM2, 4, 2, True) == 4 * 64 * 9 * 30 * (16 + 5)


# --- Task 4: fit_power_law ----------------------------------------------------------------------


def test_fit_recovers_an_exact_power_law():
    ns = [32, 64, 128, 256, 512]
    e, c = cx.fit_power_law(ns, [0.003 * n**2.5 for n in ns])
    assert e == pytest.approx(2.5, abs=1e-9) and c == pytest.approx(0.003, rel=1e-9)


def test_fit_matches_numpy_polyfit():
    rng = np.random.default_rng(0)
    ns = np.array([10, 20, 40, 80, 160, 320])
    times = 1e-4 * ns**1.7 * np.exp(rng.normal(0, 0.2, ns.size))
    slope, intercept = np.polyfit(np.log(ns), np.log(times), 1)
    e, c = cx.fit_power_law(ns.tolist(), times.tolist())
    assert e == pytest.approx(slope, abs=1e-9)
    assert c == pytest.approx(math.exp(intercept), rel=1e-9)


@pytest.mark.parametrize(
    "ns,times", [([1], [1.0]), ([1, 2], [1.0]), ([1, 2], [1.0, 0.0]), ([2, 2], [1.0, 2.0])]
)
def test_fit_rejects_bad_input(ns, times):
    with pytest.raises(ValueError):
        cx.fit_power_law(ns, times)
