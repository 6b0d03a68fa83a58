"""Week 2 Day 6: batched decoding with a left-padded contiguous cache.

Oracles: a float64 NumPy attention over each row's own (unpadded) keys for `BatchKVCache.attend`;
for `batch_generate`, greedy decoding of each prompt alone, without any cache, by mlx-lm's model
class loaded from the same random checkpoint (and on SmolLM2 by mlx-lm's `generate_step`).
"""

import importlib
import tempfile
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from tiny_llm_common.checkpoints import random_checkpoint, write_hub_checkpoint
from tiny_llm_common.grading import TOL, assert_allclose, solution

sol = solution()
for _module in ("model", "kv_cache", "decode"):
    importlib.import_module(f"{sol.__name__}.{_module}")

# Prompts of different lengths: the longest sets the padding of the others.
PROMPTS = [[3, 141, 59], [26, 5, 200, 17, 8, 99, 12, 40], [77], [9, 9, 250, 1, 64]]
STEPS = 10


def np_attention(q, k, v, scale, first_pos):
    """float64 causal grouped attention for one sequence: q [Hq, L, D], k/v [Hkv, S, D]."""
    Hq, L, _ = q.shape
    Hkv, S, _ = k.shape
    k, v = np.repeat(k, Hq // Hkv, axis=0), np.repeat(v, Hq // Hkv, axis=0)
    scores = q @ k.swapaxes(-1, -2) * scale
    pos = first_pos + np.arange(L)[:, None]
    scores = np.where(np.arange(S)[None, :] > pos, -np.inf, scores)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


# --- Task 1: BatchKVCache.attend ----------------------------------------------------------------


def test_batch_attend_matches_each_row_alone():
    rng = np.random.default_rng(0)
    lengths = [3, 6, 1]
    pads = [max(lengths) - n for n in lengths]
    B, Hq, Hkv, D, steps = len(lengths), 4, 2, 8, 3
    cache = sol.kv_cache.BatchKVCache(pads, step=4)
    # Each row's real tokens; padding columns get random junk that must not matter.
    L0 = max(lengths)
    q, k, v = (rng.standard_normal((B, h, L0 + steps, D)) for h in (Hq, Hkv, Hkv))
    out = cache.attend(*(mx.array(a[:, :, :L0], dtype=mx.float32) for a in (q, k, v)), D**-0.5)
    assert np.array(cache.offset).tolist() == lengths, "offset after prefill: each prompt's length"
    outs = [np.array(out)]
    for s in range(steps):
        col = slice(L0 + s, L0 + s + 1)
        out = cache.attend(*(mx.array(a[:, :, col], dtype=mx.float32) for a in (q, k, v)), D**-0.5)
        outs.append(np.array(out))
        assert np.array(cache.offset).tolist() == [n + s + 1 for n in lengths], "offset per step"
    got = np.concatenate(outs, axis=2)
    for b, pad in enumerate(pads):
        real = slice(pad, L0 + steps)  # this row's tokens, without its padding
        expected = np_attention(q[b, :, real], k[b, :, real], v[b, :, real], D**-0.5, 0)
        assert_allclose(got[b, :, real], expected, atol=TOL["float32"], what=f"row {b} (pad {pad})")


def test_batch_attend_padding_never_produces_nan():
    cache = sol.kv_cache.BatchKVCache([2, 0])
    x = mx.ones((2, 2, 3, 4))
    out = cache.attend(x, x, x, 0.5)
    assert not np.isnan(np.array(out)).any(), "padding queries must not produce NaN"


# --- Task 2: BatchKVCache.filter ----------------------------------------------------------------


def test_filter_keeps_rows_and_their_positions():
    rng = np.random.default_rng(1)
    lengths = [2, 5, 4]
    pads = [5 - n for n in lengths]
    cache = sol.kv_cache.BatchKVCache(pads)
    q, k, v = (rng.standard_normal((3, 2, 6, 4)) for _ in range(3))
    cache.attend(*(mx.array(a[:, :, :5], dtype=mx.float32) for a in (q, k, v)), 0.5)
    cache.filter([2, 0])  # row 1, the longest, finishes: rows 2 and 0 remain, in that order
    assert np.array(cache.offset).tolist() == [4, 2], "filter must keep each row's offset"
    out = cache.attend(*(mx.array(a[[2, 0], :, 5:6], dtype=mx.float32) for a in (q, k, v)), 0.5)
    for row, b in enumerate((2, 0)):
        real = slice(pads[b], 6)
        expected = np_attention(q[b, :, 5:6], k[b, :, real], v[b, :, real], 0.5, lengths[b])
        assert_allclose(out[row], expected, atol=TOL["float32"], what=f"row {b} after filter")


# --- Task 3: batch_generate ---------------------------------------------------------------------


@pytest.fixture(scope="module", params=[("qwen2", 0), ("llama", 5)], ids=["qwen2", "llama"])
def checkpoint(request):
    family, seed = request.param
    args, weights = random_checkpoint(family, seed=seed)
    from mlx_lm.utils import load_model

    with tempfile.TemporaryDirectory() as d:
        write_hub_checkpoint(d, args, weights)
        oracle, _ = load_model(Path(d))
    return args, weights, oracle


def oracle_greedy(oracle, prompt, steps, eos=()):
    """Decode one prompt alone, without a cache, with mlx-lm's model; stop before an EOS."""
    seq, out = list(prompt), []
    for _ in range(steps):
        last = np.array(oracle(mx.array([seq], dtype=mx.int32))[0, -1].astype(mx.float32))
        top2 = np.sort(last)[-2:]
        assert top2[1] - top2[0] > 1e-3, "oracle has a near-tie: pick another seed"
        token = int(np.argmax(last))
        if token in eos:
            break
        seq.append(token)
        out.append(token)
    return out


def test_batch_equals_each_request_alone(checkpoint):
    args, weights, oracle = checkpoint
    expected = [oracle_greedy(oracle, p, STEPS) for p in PROMPTS]
    model = sol.model.Model(args, weights)
    out = sol.decode.batch_generate(model, SimpleNamespace(eos_token_ids=[]), PROMPTS, STEPS)
    for i, (got, want) in enumerate(zip(out, expected, strict=True)):
        assert got == want, f"request {i} (prompt of {len(PROMPTS[i])}): {got} != alone {want}"


class CountingModel:
    """Passes calls through and records the batch size of each one."""

    def __init__(self, model):
        self.model, self.args, self.rows = model, model.args, []

    def __call__(self, tokens, cache=None):
        self.rows.append(tokens.shape[0])
        return self.model(tokens, cache)


def test_finished_requests_stop(checkpoint):
    args, weights, oracle = checkpoint
    alone = [oracle_greedy(oracle, p, STEPS) for p in PROMPTS]
    # An EOS id that request 0 produces at step 2 or later (and does not produce before).
    eos = next(t for i, t in enumerate(alone[0]) if i >= 2 and alone[0].index(t) == i)
    expected = [oracle_greedy(oracle, p, STEPS, eos=(eos,)) for p in PROMPTS]
    model = CountingModel(sol.model.Model(args, weights))
    out = sol.decode.batch_generate(model, SimpleNamespace(eos_token_ids=[eos]), PROMPTS, STEPS)
    assert out == expected, f"with EOS {eos}: {out} != each alone {expected}"
    assert len(out[0]) < STEPS, "request 0 should have stopped at its EOS"
    # After request 0 stops, the model must not run it any more.
    assert model.rows[len(out[0]) + 1] < len(PROMPTS), (
        f"batch sizes per call {model.rows}: a finished request is still decoded"
    )


def test_batch_generate_respects_max_tokens(checkpoint):
    args, weights, _ = checkpoint
    out = sol.decode.batch_generate(sol.model.Model(args, weights), None, PROMPTS, 3)
    assert [len(o) for o in out] == [3] * len(PROMPTS)


def test_batch_generate_checks_arguments():
    args, weights = random_checkpoint("llama", seed=5)
    model = sol.model.Model(args, weights)
    with pytest.raises(ValueError):
        sol.decode.batch_generate(model, None, [], 3)
    with pytest.raises(ValueError):
        sol.decode.batch_generate(model, None, [[1, 2], []], 3)
    with pytest.raises(ValueError):
        sol.decode.batch_generate(model, None, [[1, 2]], 0)


@pytest.mark.slow
def test_smollm2_batch_matches_mlx_lm():
    from mlx_lm.generate import generate_step

    from tiny_llm_common.models import load_model
    from tiny_llm_common.models.mlx_lm_oracle import build_mlx_lm_model

    loaded = load_model("smollm2", verbose=False)
    tok = loaded.tokenizer
    # Plain text, no chat template: short prompts keep this under ~20 s on 2 CPU cores.
    texts = ["The capital of France is", "Once upon a time, in a small village by the sea,"]
    prompts = [tok.encode(t) for t in texts]
    assert len(prompts[0]) != len(prompts[1])
    oracle = build_mlx_lm_model(loaded.args, loaded.weights)
    expected = [
        [int(t) for t, _ in generate_step(mx.array(p), oracle, max_tokens=6)] for p in prompts
    ]
    model = sol.model.Model(loaded.args, loaded.weights)
    out = sol.decode.batch_generate(model, SimpleNamespace(eos_token_ids=[]), prompts, 6)
    assert out == expected, f"SmolLM2 batch {out} != each alone with mlx-lm {expected}"
