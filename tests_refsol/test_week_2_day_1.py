"""Week 2 Day 1: the contiguous KV cache and generation with it.

Oracles: a float64 NumPy attention over every stored key for `KVCache.attend`; mlx-lm's own
model classes with mlx-lm's own `KVCache` (the same random checkpoint written in the hub's
layout) for cached logits; a greedy loop without any cache around mlx-lm's model for the
generated tokens; and on SmolLM2, mlx-lm's llama class built from the course loader's weights.
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
for _module in ("model", "kv_cache", "decode"):  # so that sol.kv_cache etc. are attributes
    importlib.import_module(f"{sol.__name__}.{_module}")

PROMPT = [3, 141, 59, 26, 5, 200, 17, 8, 99]
# float32 logits of tiny random models (|logit| up to ~50): the two implementations differ only
# in summation order, as on Week 1 Day 5.
LOGIT_ATOL = 2e-4
# (family, seed, quantization): seeds whose greedy continuations are not one repeated token.
CHECKPOINTS = [("llama", 5, None), ("qwen2", 0, None), ("qwen3", 1, (64, 4))]
IDS = ["llama", "qwen2", "qwen3-q4"]


def no_eos():
    return SimpleNamespace(eos_token_ids=[])


@pytest.fixture(scope="module", params=CHECKPOINTS, ids=IDS)
def checkpoint(request):
    family, seed, quant = request.param
    args, weights = random_checkpoint(family, seed=seed, quantize=quant)
    from mlx_lm.utils import load_model

    with tempfile.TemporaryDirectory() as d:
        write_hub_checkpoint(d, args, weights)
        oracle, _ = load_model(Path(d))
    return args, weights, oracle


# --- Task 1 and 2: KVCache.attend ---------------------------------------------------------------


def np_attention(q, k, v, scale, first_pos):
    """float64 oracle: queries at positions first_pos.., keys 0..S-1, causal, grouped heads."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    k = np.repeat(k, Hq // Hkv, axis=1)
    v = np.repeat(v, Hq // Hkv, axis=1)
    scores = q @ k.swapaxes(-1, -2) * scale
    pos = first_pos + np.arange(L)[:, None]
    scores = np.where(np.arange(S)[None, :] > pos, -np.inf, scores)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("chunks", [[9], [5, 3, 1], [1, 1, 1, 1], [4, 1, 6]])
def test_attend_matches_numpy(chunks):
    rng = np.random.default_rng(len(chunks))
    B, Hq, Hkv, D = 2, 6, 2, 16
    total = sum(chunks)
    q = rng.standard_normal((B, Hq, total, D))
    k = rng.standard_normal((B, Hkv, total, D))
    v = rng.standard_normal((B, Hkv, total, D))
    cache = sol.kv_cache.KVCache(step=4)  # a small step: the buffer grows several times
    start = 0
    for n in chunks:
        sl = slice(start, start + n)
        assert cache.offset == start, f"offset {cache.offset} before a chunk at {start}"
        out = cache.attend(
            *(mx.array(a[:, :, sl], dtype=mx.float32) for a in (q, k, v)), scale=D**-0.5
        )
        expected = np_attention(
            q[:, :, sl], k[:, :, : start + n], v[:, :, : start + n], D**-0.5, start
        )
        assert_allclose(out, expected, atol=TOL["float32"], what=f"attend, chunk {sl}")
        start += n
    assert cache.offset == total


def test_attend_keeps_float16():
    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.standard_normal((1, 4, 3, 8)), dtype=mx.float16) for _ in range(3))
    cache = sol.kv_cache.KVCache()
    out = cache.attend(q, k[:, :2], v[:, :2], 8**-0.5)
    assert out.dtype == mx.float16, f"attend changed float16 to {out.dtype}"
    expected = np_attention(
        *(np.array(a.astype(mx.float32)) for a in (q, k[:, :2], v[:, :2])), 8**-0.5, 0
    )
    assert_allclose(out, expected, atol=TOL["float16"], what="float16 attend")


def test_state_holds_what_was_stored():
    rng = np.random.default_rng(1)
    cache = sol.kv_cache.KVCache(step=8)
    ks, vs = [], []
    for n in (3, 1, 7):
        q = mx.array(rng.standard_normal((1, 2, n, 4)), dtype=mx.float32)
        k = mx.array(rng.standard_normal((1, 1, n, 4)), dtype=mx.float32)
        v = mx.array(rng.standard_normal((1, 1, n, 4)), dtype=mx.float32)
        cache.attend(q, k, v, 0.5)
        ks.append(np.array(k))
        vs.append(np.array(v))
    keys, values = cache.state
    assert_allclose(keys, np.concatenate(ks, axis=2), atol=0, what="stored keys")
    assert_allclose(values, np.concatenate(vs, axis=2), atol=0, what="stored values")
    # 11 tokens in steps of 8: 16 slots of 4 float32 for K and for V.
    assert cache.nbytes == 2 * 16 * 4 * 4, f"nbytes {cache.nbytes}: capacity should be 16 slots"


def test_max_len_cache_refuses_overflow():
    cache = sol.kv_cache.KVCache(max_len=4)
    x = mx.zeros((1, 1, 3, 4))
    cache.attend(x, x, x, 1.0)
    assert cache.nbytes == 2 * 4 * 4 * 4, "a max_len cache should hold exactly max_len slots"
    with pytest.raises(ValueError):
        cache.attend(x[:, :, :2], x[:, :, :2], x[:, :, :2], 1.0)


def test_attend_rejects_bad_shapes():
    cache = sol.kv_cache.KVCache()
    x = mx.zeros((1, 2, 2, 4))
    assert cache.attend(x, x, x, 1.0).shape == (1, 2, 2, 4)
    with pytest.raises(ValueError):
        cache.attend(mx.zeros((1, 3, 2, 4)), mx.zeros((1, 2, 2, 4)), mx.zeros((1, 2, 2, 4)), 1.0)
    with pytest.raises(ValueError):
        cache.attend(mx.zeros((1, 2, 2, 4)), mx.zeros((1, 2, 2, 4)), mx.zeros((1, 2, 3, 4)), 1.0)
    with pytest.raises(ValueError):  # 3 KV heads do not fit a cache holding 2
        cache.attend(mx.zeros((1, 3, 1, 4)), mx.zeros((1, 3, 1, 4)), mx.zeros((1, 3, 1, 4)), 1.0)


# --- The cache inside the model -----------------------------------------------------------------


def test_offsets_advance(checkpoint):
    args, weights, _ = checkpoint
    model = sol.model.Model(args, weights)
    cache = sol.kv_cache.make_cache(model)
    assert len(cache) == args.num_hidden_layers, "make_cache: one cache per layer"
    assert len(sol.kv_cache.make_cache(args)) == args.num_hidden_layers, "make_cache(ModelArgs)"
    assert [c.offset for c in cache] == [0] * len(cache)
    model(mx.array([PROMPT[:5]], dtype=mx.int32), cache)
    assert [c.offset for c in cache] == [5] * len(cache)
    model(mx.array([[7]], dtype=mx.int32), cache)
    assert [c.offset for c in cache] == [6] * len(cache)


def test_cached_logits_match_mlx_lm_cache(checkpoint):
    """Prefill, then 6 teacher-forced decode steps, against mlx-lm's model and its KVCache."""
    from mlx_lm.models.cache import make_prompt_cache

    args, weights, oracle = checkpoint
    model = sol.model.Model(args, weights)
    ours, theirs = sol.kv_cache.make_cache(model), make_prompt_cache(oracle)
    feed = [PROMPT] + [[t] for t in (12, 250, 0, 77, 3, 3)]
    for step, chunk in enumerate(feed):
        tokens = mx.array([chunk], dtype=mx.int32)
        expected = oracle(tokens, cache=theirs).astype(mx.float32)
        assert_allclose(model(tokens, ours), expected, atol=LOGIT_ATOL, what=f"logits, step {step}")


def test_chunked_prefill_equals_one_prefill(checkpoint):
    """5 + 3 + 1 tokens through the cache give the logits of 9 tokens at once (no cache)."""
    args, weights, oracle = checkpoint
    model = sol.model.Model(args, weights)
    expected = oracle(mx.array([PROMPT], dtype=mx.int32)).astype(mx.float32)
    cache = sol.kv_cache.make_cache(model)
    parts = [
        model(mx.array([PROMPT[a:b]], dtype=mx.int32), cache) for a, b in ((0, 5), (5, 8), (8, 9))
    ]
    assert_allclose(
        mx.concatenate(parts, axis=1), expected, atol=LOGIT_ATOL, what="chunked prefill"
    )


# --- Task 3: generate_with_cache ----------------------------------------------------------------


def oracle_greedy(oracle, prompt, steps):
    """Greedy decoding without a cache: the whole sequence through mlx-lm's model each step."""
    seq, out = list(prompt), []
    for _ in range(steps):
        last = np.array(oracle(mx.array([seq], dtype=mx.int32))[0, -1].astype(mx.float32))
        top2 = np.sort(last)[-2:]
        assert top2[1] - top2[0] > 1e-3, "oracle has a near-tie: pick another seed"
        token = int(np.argmax(last))
        seq.append(token)
        out.append(token)
    return out


def test_generate_with_cache_equals_no_cache(checkpoint):
    args, weights, oracle = checkpoint
    expected = oracle_greedy(oracle, PROMPT, 16)
    assert len(set(expected)) >= 3, f"degenerate oracle output {expected}: pick another seed"
    streamed = []
    out = sol.decode.generate_with_cache(
        sol.model.Model(args, weights), no_eos(), PROMPT, 16, on_token=streamed.append
    )
    assert out == expected, f"cached generation {out} != no-cache {expected}"
    assert streamed == expected, "on_token must see each returned token once, in order"


def test_generate_with_cache_stops_at_eos(checkpoint):
    args, weights, oracle = checkpoint
    expected = oracle_greedy(oracle, PROMPT, 16)
    eos = next(t for t in expected if expected.index(t) >= 2)  # a token first seen at step >= 2
    cut = expected.index(eos)
    out = sol.decode.generate_with_cache(
        sol.model.Model(args, weights), SimpleNamespace(eos_token_ids=[eos]), PROMPT, 16
    )
    assert out == expected[:cut], f"should stop before EOS {eos}: got {out}"


def test_generate_with_cache_uses_sampler():
    args, weights = random_checkpoint("llama", seed=5)
    model = sol.model.Model(args, weights)
    out = sol.decode.generate_with_cache(
        model, None, PROMPT, 5, sampler=lambda logits: mx.argmin(logits, axis=-1)
    )
    seq = list(PROMPT)
    for _ in range(5):  # the oracle for argmin: our Week 1 model without a cache
        seq.append(int(mx.argmin(model(mx.array([seq], dtype=mx.int32))[0, -1]).item()))
    assert out == seq[len(PROMPT) :], "generate_with_cache must pick tokens with `sampler`"


def test_generate_with_cache_checks_arguments():
    args, weights = random_checkpoint("llama", seed=5)
    model = sol.model.Model(args, weights)
    gen = sol.decode.generate_with_cache
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError):
            gen(model, None, PROMPT, bad)
    with pytest.raises(ValueError):
        gen(model, None, [], 3)
    with pytest.raises(ValueError):
        gen(model, None, PROMPT, 3, cache_kind="bogus")


# --- The real model -----------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_cached_generation_matches_mlx_lm():
    from mlx_lm.generate import generate_step

    from tiny_llm_common.models import load_model
    from tiny_llm_common.models.mlx_lm_oracle import build_mlx_lm_model

    loaded = load_model("smollm2", verbose=False)
    tok = loaded.tokenizer
    prompt = tok.encode("The three primary colours are")  # short: the test stays under ~20 s
    oracle = build_mlx_lm_model(loaded.args, loaded.weights)
    expected = [int(t) for t, _ in generate_step(mx.array(prompt), oracle, max_tokens=16)]
    out = sol.decode.generate_with_cache(
        sol.model.Model(loaded.args, loaded.weights), no_eos(), prompt, 16
    )
    assert out == expected, f"SmolLM2: {tok.decode(out)!r} != mlx-lm's {tok.decode(expected)!r}"
