"""Week 1 Day 6: generation without a cache.

The oracle is a greedy loop written here around mlx-lm's own model class (loaded from the same
random checkpoint written in the hub's layout), with the argmax taken in NumPy.
"""

import importlib
import tempfile
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from tiny_llm_common.checkpoints import random_checkpoint, write_hub_checkpoint
from tiny_llm_common.grading import assert_allclose, solution

sol = solution()
for _module in ("model", "generate"):  # so that sol.model etc. are attributes
    importlib.import_module(f"{sol.__name__}.{_module}")

PROMPT = [3, 141, 59, 26, 5]
LOGIT_ATOL = 1e-4  # float32 logits of about +-3: as on Day 5
STEPS = 12


def no_eos():
    return SimpleNamespace(eos_token_ids=[])


@pytest.fixture(
    scope="module", params=[("qwen3", 0, None), ("llama", 1, (64, 4))], ids=["qwen3", "llama-q4"]
)
def checkpoint(request):
    family, seed, quant = request.param
    args, weights = random_checkpoint(family, seed=seed, quantize=quant)
    from mlx_lm.utils import load_model

    with tempfile.TemporaryDirectory() as d:
        write_hub_checkpoint(d, args, weights)
        oracle, _ = load_model(Path(d))
    return args, weights, oracle


def oracle_greedy(oracle, prompt, steps):
    """The reference loop: the whole sequence through mlx-lm's model, argmax of the last row."""
    seq, out, margins = list(prompt), [], []
    for _ in range(steps):
        last = np.array(oracle(mx.array([seq], dtype=mx.int32))[0, -1].astype(mx.float32))
        top2 = np.sort(last)[-2:]
        margins.append(float(top2[1] - top2[0]))
        token = int(np.argmax(last))
        seq.append(token)
        out.append(token)
    # A near-tie could flip with rounding and make the comparison meaningless.
    assert min(margins) > 1e-3, f"oracle has a near-tie (margin {min(margins):.2g}): pick a seed"
    return out


def test_greedy_tokens_match_the_oracle(checkpoint):
    args, weights, oracle = checkpoint
    expected = oracle_greedy(oracle, PROMPT, STEPS)
    got = sol.generate.simple_generate(sol.model.Model(args, weights), no_eos(), PROMPT, STEPS)
    assert isinstance(got, list) and all(isinstance(t, int) for t in got), (
        f"simple_generate must return a list of Python ints, got {got!r}"
    )
    assert got == expected, f"greedy tokens differ:\n  got      {got}\n  expected {expected}"


def test_stops_at_eos_and_streams_each_token_once(checkpoint):
    args, weights, oracle = checkpoint
    expected = oracle_greedy(oracle, PROMPT, STEPS)
    # The first token that was not generated before, at position 3 or later, becomes the EOS.
    k = next(i for i in range(3, STEPS) if expected[i] not in expected[:i])
    eos = expected[k]
    streamed = []
    got = sol.generate.simple_generate(
        sol.model.Model(args, weights),
        SimpleNamespace(eos_token_ids=[10_000, eos]),
        PROMPT,
        STEPS,
        on_token=streamed.append,
    )
    assert got == expected[:k], f"should stop before EOS {eos} at step {k}: got {got}"
    assert streamed == got, f"on_token saw {streamed}, returned {got}: one call per token"


def test_max_tokens_bounds_the_output(checkpoint):
    args, weights, _ = checkpoint
    model = sol.model.Model(args, weights)
    for n in (1, 4):
        streamed = []
        got = sol.generate.simple_generate(model, no_eos(), PROMPT, n, on_token=streamed.append)
        assert len(got) == n and streamed == got, f"max_tokens={n}: got {got}, streamed {streamed}"


class RecordingModel:
    """Wraps a model and records what every call receives."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, tokens, cache=None):
        self.calls.append((np.array(tokens).tolist(), cache))
        return self.model(tokens, cache)


def test_each_step_runs_the_whole_sequence_without_cache(checkpoint):
    args, weights, oracle = checkpoint
    model = RecordingModel(sol.model.Model(args, weights))
    seen = []

    def sampler(logits):  # check the sampler's input, then force a known continuation
        seen.append(logits)
        return mx.array([7 + len(seen)])

    got = sol.generate.simple_generate(model, no_eos(), PROMPT, 5, sampler=sampler)
    assert got == [8, 9, 10, 11, 12], f"the sampler's choices must be returned, got {got}"
    assert len(model.calls) == 5, f"expected one model call per token, got {len(model.calls)}"
    for i, (tokens, cache) in enumerate(model.calls):
        assert cache is None, "Week 1 generation runs without a cache"
        assert tokens == [PROMPT + got[:i]], f"step {i} ran on {tokens}, not the sequence so far"
        expected = oracle(mx.array(tokens, dtype=mx.int32))[:, -1, :]
        assert seen[i].shape == (1, args.vocab_size), f"sampler got shape {seen[i].shape}"
        assert_allclose(
            seen[i], expected, atol=LOGIT_ATOL, what=f"last-position logits at step {i}"
        )


@pytest.mark.parametrize(
    "prompt,max_tokens", [([], 3), (PROMPT, 0), (PROMPT, -2)], ids=["empty-prompt", "zero", "neg"]
)
def test_bad_arguments_raise(prompt, max_tokens):
    def model(tokens, cache=None):
        pytest.fail("bad arguments must be rejected before the model runs")

    with pytest.raises(ValueError):
        sol.generate.simple_generate(model, no_eos(), prompt, max_tokens)


def test_smollm2_completes_the_capital_of_france():
    """The real model end to end (Day 5's grader already matched its logits with mlx-lm's)."""
    from tiny_llm_common.models import load_model

    loaded = load_model("smollm2", verbose=False)
    tok = loaded.tokenizer
    prompt = tok.encode("The capital of France is")
    streamed = []
    model = sol.model.Model(loaded.args, loaded.weights)
    got = sol.generate.simple_generate(model, tok, prompt, 2, on_token=streamed.append)
    assert streamed == got and len(got) == 2, f"got {got}, streamed {streamed}"
    assert tok.decode(got[:1]) == " Paris", f"greedy SmolLM2 said {tok.decode(got)!r}"
