"""Week 1 Day 5: quantized weights and the whole decoder (Llama, Qwen2, Qwen3).

Oracles: a NumPy float64 unpacking of MLX's packed format (and mx.dequantize) for the ops; for
the model, mlx-lm's own `llama`, `qwen2` and `qwen3` classes loading the same checkpoint from
disk, and for the real SmolLM2 weights mlx-lm's `llama` class built from the course's loader.
"""

import importlib
import math
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from tiny_llm_common.checkpoints import (
    LLAMA3_ROPE_SCALING,
    random_checkpoint,
    write_hub_checkpoint,
)
from tiny_llm_common.grading import TOL, assert_allclose, solution
from tiny_llm_common.weights import QuantizedWeights

sol = solution()
for _module in ("basics", "quantize", "model"):  # so that sol.quantize etc. are attributes
    importlib.import_module(f"{sol.__name__}.{_module}")

# Float32 logits of about +-3 from two implementations that differ only in the order of their
# sums: they agree to ~1e-6; a missing bias, norm or rotation moves them by > 1e-2.
LOGIT_ATOL = 1e-4


def np_dequantize(qw: QuantizedWeights) -> np.ndarray:
    """The oracle: unpack in NumPy, lowest bits first, w = q * scale + bias in float64."""
    words = np.array(qw.weight).astype(np.uint64)
    per_word = 32 // qw.bits
    shifts = np.arange(per_word, dtype=np.uint64) * qw.bits
    q = (words[..., None] >> shifts) & ((1 << qw.bits) - 1)
    lead = words.shape[:-1]
    q = q.reshape(*lead, -1, qw.group_size).astype(np.float64)
    scales = np.array(qw.scales.astype(mx.float32), dtype=np.float64)
    biases = np.array(qw.biases.astype(mx.float32), dtype=np.float64)
    return (q * scales[..., None] + biases[..., None]).reshape(*lead, -1)


def random_quantized(rows, cols, group_size, bits, seed=0, dtype=mx.float32) -> QuantizedWeights:
    """Arbitrary packed words (every bit pattern is a valid 4- or 8-bit code) and scales."""
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 2**32, size=(rows, cols * bits // 32), dtype=np.uint64)
    groups = cols // group_size
    scales = rng.uniform(0.01, 0.1, size=(rows, groups))
    biases = rng.uniform(-1, 1, size=(rows, groups))
    return QuantizedWeights(
        mx.array(packed.astype(np.uint32)),
        mx.array(scales, dtype=dtype),
        mx.array(biases, dtype=dtype),
        group_size,
        bits,
    )


# --- Task 1: dequantize -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64])
def test_dequantize_matches_numpy(bits, group_size):
    qw = random_quantized(48, 256, group_size, bits, seed=bits + group_size)
    out = sol.quantize.dequantize(qw)
    assert out.dtype == mx.float32, f"dequantize should return the scales' dtype, got {out.dtype}"
    assert_allclose(out, np_dequantize(qw), atol=TOL["float32"], what=f"dequantize {bits}-bit")
    # A second, independent oracle: MLX's own kernel.
    ref = mx.dequantize(qw.weight, qw.scales, qw.biases, group_size=group_size, bits=bits)
    assert_allclose(out, ref, atol=TOL["float32"], what="dequantize vs mx.dequantize")


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32)])
def test_dequantize_round_trips_mx_quantize(bits, group_size):
    w = mx.random.normal((32, 128), key=mx.random.key(1))
    q, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    out = sol.quantize.dequantize(QuantizedWeights(q, s, b, group_size, bits))
    # Each weight comes back within one quantization step |scale| of its group.
    step = np.repeat(np.abs(np.array(s)), group_size, axis=1)
    err = np.abs(np.array(out) - np.array(w))
    assert np.all(err <= step + 1e-5), f"error up to {(err / step).max():.3g} steps, expected <= 1"


def test_dequantize_float16_scales():
    qw = random_quantized(16, 128, 32, 4, seed=3, dtype=mx.float16)
    out = sol.quantize.dequantize(qw)
    assert out.dtype == mx.float16, f"dequantize should return the scales' dtype, got {out.dtype}"
    assert_allclose(out, np_dequantize(qw), atol=TOL["float16"] * 2, what="float16 dequantize")


# --- Task 2: quantized_linear -------------------------------------------------------------------


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (8, 32), (8, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_quantized_linear_matches_numpy(bits, group_size, with_bias):
    qw = random_quantized(40, 128, group_size, bits, seed=7)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 5, 128))
    bias = rng.standard_normal(40) if with_bias else None
    out = sol.quantize.quantized_linear(
        mx.array(x, dtype=mx.float32),
        qw,
        None if bias is None else mx.array(bias, dtype=mx.float32),
    )
    expected = x @ np_dequantize(qw).T + (0 if bias is None else bias)
    # Sums of 128 products of magnitude ~1: float32 rounding stays well under 1e-3.
    assert_allclose(out, expected, atol=1e-3, rtol=1e-5, what="quantized_linear")


def test_linear_dispatches_to_quantized_linear():
    qw = random_quantized(24, 64, 32, 4, seed=5)
    x = np.random.default_rng(2).standard_normal((3, 64))
    out = sol.basics.linear(mx.array(x, dtype=mx.float32), qw)
    assert_allclose(out, x @ np_dequantize(qw).T, atol=1e-3, what="linear(x, QuantizedWeights)")


def test_quantized_linear_rejects_wrong_width():
    qw = random_quantized(24, 64, 32, 4)
    with pytest.raises(ValueError):
        sol.quantize.quantized_linear(mx.zeros((3, 32)), qw)


# --- Task 3: quantized_embedding ----------------------------------------------------------------


@pytest.mark.parametrize("bits,group_size", [(8, 32), (4, 64)])
def test_quantized_embedding_matches_numpy(bits, group_size):
    table = random_quantized(300, 128, group_size, bits, seed=9)
    tokens = np.array([[0, 299, 5, 5], [17, 42, 0, 123]])
    out = sol.quantize.quantized_embedding(mx.array(tokens, dtype=mx.int32), table)
    expected = np_dequantize(table)[tokens]
    assert_allclose(out, expected, atol=TOL["float32"], what="quantized_embedding")


# --- Task 4: Llama 3 RoPE scaling ---------------------------------------------------------------


def np_llama3_inv_freqs(dims, base, cfg):
    """Hugging Face's `_compute_llama3_parameters`, in float64."""
    inv = 1.0 / base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    factor, low, high = cfg["factor"], cfg["low_freq_factor"], cfg["high_freq_factor"]
    old = cfg["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return np.array(out)


@pytest.mark.parametrize(
    "dims,base,cfg",
    [
        (16, 10000.0, LLAMA3_ROPE_SCALING),
        (64, 500000.0, {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}),
        (128, 500000.0, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}),
    ],
)  # fmt: skip
def test_llama3_inv_freqs(dims, base, cfg):
    out = sol.model.llama3_inv_freqs(dims, base, cfg)
    expected = np_llama3_inv_freqs(dims, base, cfg)
    assert_allclose(out, expected, atol=0, rtol=1e-5, what="llama3 inverse frequencies")


# --- Tasks 5-7: the model against mlx-lm --------------------------------------------------------

CASES = {
    "llama": ("llama", {}),
    "llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE_SCALING}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
}
QUANT = {"float32": None, "q4-g64": (64, 4), "q8-g32": (32, 8)}


def mlx_lm_oracle(args, weights):
    """mlx-lm's own model class, loaded from the checkpoint written in the hub's layout."""
    from mlx_lm.utils import load_model

    with tempfile.TemporaryDirectory() as d:
        write_hub_checkpoint(d, args, weights)
        model, _ = load_model(Path(d))
    return model


def prompt(batch, length, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return mx.array(rng.integers(0, vocab, size=(batch, length)), dtype=mx.int32)


@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("case", list(CASES))
def test_model_matches_mlx_lm(case, quant):
    family, overrides = CASES[case]
    args, weights = random_checkpoint(family, seed=1, quantize=QUANT[quant], **overrides)
    oracle = mlx_lm_oracle(args, weights)
    # 40 positions: past the 16-token wavelength where Llama 3 scaling starts to matter.
    tokens = prompt(2, 40, args.vocab_size, seed=2)
    logits = sol.model.Model(args, weights)(tokens)
    assert logits.dtype == mx.float32, f"logits must be float32, got {logits.dtype}"
    expected = oracle(tokens).astype(mx.float32)
    assert_allclose(logits, expected, atol=LOGIT_ATOL, what=f"{case} {quant} logits")


def test_model_single_token_and_batch_rows_are_independent():
    args, weights = random_checkpoint("qwen3", seed=4)
    model = sol.model.Model(args, weights)
    tokens = prompt(3, 6, args.vocab_size, seed=5)
    full = model(tokens)
    for b in range(3):
        row = model(tokens[b : b + 1])
        assert_allclose(row[0], full[b], atol=LOGIT_ATOL, what=f"row {b} alone vs in the batch")
    one = model(tokens[:, :1])
    assert_allclose(one[:, 0], full[:, 0], atol=LOGIT_ATOL, what="a one-token prompt")


class ConcatCache:
    """The grader's own cache: the contract of CONTRIBUTING.md with plain concatenation."""

    def __init__(self, n_kv_heads, head_dim):
        self.keys = self.values = None
        self.offset = 0
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim

    def attend(self, q, k, v, scale):
        B, H_q, L, D = q.shape
        assert k.shape == v.shape == (B, self.n_kv_heads, L, self.head_dim), (
            f"attend got k {k.shape}, v {v.shape}; expected [B, H_kv, L, D]"
        )
        self.keys = k if self.keys is None else mx.concatenate([self.keys, k], axis=2)
        self.values = v if self.values is None else mx.concatenate([self.values, v], axis=2)
        S = self.keys.shape[2]
        rep = H_q // self.n_kv_heads
        keys = mx.repeat(self.keys, rep, axis=1)
        values = mx.repeat(self.values, rep, axis=1)
        scores = (q @ keys.swapaxes(-1, -2)) * scale
        visible = mx.arange(S)[None, :] <= mx.arange(L)[:, None] + self.offset
        scores = mx.where(visible, scores, -mx.inf)
        self.offset += L
        return mx.softmax(scores, axis=-1) @ values


@pytest.mark.parametrize("case", ["llama3-rope", "qwen2", "qwen3"])
def test_model_follows_the_cache_contract(case):
    family, overrides = CASES[case]
    args, weights = random_checkpoint(family, seed=6, quantize=(64, 4), **overrides)
    tokens = prompt(2, 24, args.vocab_size, seed=7)
    expected = mlx_lm_oracle(args, weights)(tokens)
    model = sol.model.Model(args, weights)
    cache = [
        ConcatCache(args.num_key_value_heads, args.head_dim) for _ in range(args.num_hidden_layers)
    ]
    # A prompt of 20, then 1, 1, 2: RoPE offsets and causal masking within a chunk must hold.
    start = 0
    for length in (20, 1, 1, 2):
        out = model(tokens[:, start : start + length], cache=cache)
        assert_allclose(
            out,
            expected[:, start : start + length],
            atol=LOGIT_ATOL,
            what=f"logits of positions {start}..{start + length - 1} with a cache",
        )
        start += length
    assert all(c.offset == 24 for c in cache), "every layer must call attend() once per step"


def test_model_rejects_tokens_that_are_not_2d():
    args, weights = random_checkpoint("llama", seed=0)
    with pytest.raises(ValueError):
        sol.model.Model(args, weights)(mx.array([1, 2, 3], dtype=mx.int32))


# --- The real model: SmolLM2-135M-Instruct (Q4_1 GGUF, 8-bit embedding table) --------------------


@pytest.fixture(scope="module")
def smollm2():
    from tiny_llm_common.models import load_model

    return load_model("smollm2", verbose=False)


def test_smollm2_matches_mlx_lm(smollm2):
    args, weights = smollm2.args, smollm2.weights
    assert isinstance(weights["model.embed_tokens.weight"], QuantizedWeights)
    ids = smollm2.tokenizer.encode("The capital of France is")
    tokens = mx.array([ids], dtype=mx.int32)
    logits = sol.model.Model(args, weights)(tokens)
    # Written in the hub's layout (4-bit layers, the 8-bit embedding as a per-layer override).
    expected = mlx_lm_oracle(args, weights)(tokens).astype(mx.float32)
    # Both compute in float32 (the norms' dtype) and agree to ~1e-4 on logits of about +-25;
    # running the layers in the float16 of the scales instead is off by ~0.7.
    assert_allclose(logits, expected, atol=1e-3, what="SmolLM2 logits")
    assert np.array_equal(np.argmax(np.array(logits), -1), np.argmax(np.array(expected), -1)), (
        "SmolLM2's greedy choices differ from mlx-lm's"
    )
