"""Week 1 Day 7: sampling (greedy, temperature, top-k, top-p, seeded streams).

Oracles are float64 NumPy written here. Greedy and the top-k / top-p masks are compared exactly;
the logits are drawn so that no two are equal and no cumulative probability lies within 1e-3 of
p, so any correct tie or rounding rule gives the same mask. Sampled tokens are checked against
the filtered distribution with a chi-square test at a false-alarm rate of about 3e-7 (z = 5 in
the Wilson-Hilferty approximation), on 20,000 draws from a fixed seed.
"""

import importlib
import math

import mlx.core as mx
import numpy as np
import pytest

from tiny_llm_common.grading import solution, to_numpy

sol = solution()
sampler = importlib.import_module(f"{sol.__name__}.sampler")


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def distinct_logits(rng: np.random.Generator, shape, scale: float = 2.0) -> np.ndarray:
    """float32 logits with no two values of a row closer than 1e-3, so "the k largest" is
    unambiguous: Gaussian draws, each pushed up by 1e-3 times its rank in its row."""
    x = rng.standard_normal(shape) * scale
    ranks = np.argsort(np.argsort(x, axis=-1), axis=-1)
    return (x + ranks * 1e-3).astype(np.float32)


def np_top_k_keep(logprobs: np.ndarray, k: int) -> np.ndarray:
    V = logprobs.shape[-1]
    if k <= 0 or k >= V:
        return np.isfinite(logprobs) | True
    kth = np.sort(logprobs, axis=-1)[..., V - k][..., None]
    return logprobs >= kth


def np_top_p_keep(logprobs: np.ndarray, p: float) -> np.ndarray:
    """Keep the fewest most probable tokens whose (renormalised) probabilities sum to >= p."""
    probs = np.exp(np_log_softmax(logprobs))
    order = np.argsort(-probs, axis=-1)
    sorted_p = np.take_along_axis(probs, order, axis=-1)
    keep_sorted = (np.cumsum(sorted_p, axis=-1) - sorted_p) < p
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return keep


def p_margin(logprobs: np.ndarray, p: float) -> float:
    """Distance from p to the nearest cumulative probability of any row."""
    probs = np.exp(np_log_softmax(logprobs))
    cum = np.cumsum(-np.sort(-probs, axis=-1), axis=-1)
    return float(np.min(np.abs(cum - p)))


def safe_p(logprobs: np.ndarray, p: float) -> float:
    """The p closest to the one asked (steps of 1e-3) with no cumulative sum within 1e-3 of it,
    so float32 rounding in the solution cannot flip a token in or out."""
    for step in range(200):
        for cand in (p + step * 1e-3, p - step * 1e-3):
            if 0 < cand < 1 and p_margin(logprobs, cand) >= 1e-3:
                return cand
    raise AssertionError(f"grader bug: no safe p near {p}")


def check_filter(out: mx.array, logprobs: np.ndarray, keep: np.ndarray, what: str) -> None:
    out = to_numpy(out)
    assert out.shape == logprobs.shape, f"{what}: shape {out.shape}, expected {logprobs.shape}"
    kept = np.isfinite(out)
    wrong = np.argwhere(kept != keep)
    assert wrong.size == 0, (
        f"{what}: {len(wrong)} entries kept/dropped wrongly (first at {tuple(wrong[0])}); "
        f"kept {kept.sum(-1).tolist()} per row, expected {keep.sum(-1).tolist()}"
    )
    assert (out[kept] == logprobs.astype(np.float32)[kept]).all(), (
        f"{what}: kept entries must be unchanged"
    )
    assert (out[~kept] == -np.inf).all(), f"{what}: dropped entries must be -inf"


def chi_square_check(tokens: np.ndarray, expected_p: np.ndarray, what: str) -> None:
    """Counts of `tokens` vs the distribution `expected_p`; zero-probability tokens never appear."""
    n = tokens.size
    counts = np.bincount(tokens, minlength=expected_p.size)
    banned = np.flatnonzero(expected_p == 0)
    assert counts[banned].sum() == 0, (
        f"{what}: drew filtered-out tokens {banned[counts[banned] > 0].tolist()}"
    )
    live = expected_p > 0
    exp_counts = n * expected_p[live]
    chi2 = float(np.sum((counts[live] - exp_counts) ** 2 / exp_counts))
    df = int(live.sum()) - 1
    if df == 0:
        return
    z = 5.0  # Wilson-Hilferty: chi2_df quantile at the normal quantile z
    limit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    assert chi2 < limit, (
        f"{what}: chi-square {chi2:.1f} > {limit:.1f} (df={df}, false-alarm rate ~3e-7): "
        f"observed {np.round(counts[live] / n, 4).tolist()}, expected {np.round(expected_p[live], 4).tolist()}"
    )


def np_filtered_distribution(
    logits: np.ndarray, temp: float, top_k: int, top_p: float
) -> np.ndarray:
    lp = np_log_softmax(logits / temp)
    lp = np.where(np_top_k_keep(lp, top_k), lp, -np.inf)
    lp = np.where(np_top_p_keep(lp, top_p), lp, -np.inf)
    return np.exp(np_log_softmax(lp))


# --- task 1: top-k --------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 49, 50, 80, 0, -3])
def test_top_k_mask(k):
    rng = np.random.default_rng(100 + k)
    lp = np_log_softmax(distinct_logits(rng, (3, 50))).astype(np.float32)
    out = sampler.apply_top_k(mx.array(lp), k)
    check_filter(out, lp, np_top_k_keep(lp, k), f"apply_top_k(k={k})")


def test_top_k_works_on_any_leading_shape():
    rng = np.random.default_rng(1)
    lp = np_log_softmax(distinct_logits(rng, (2, 3, 30))).astype(np.float32)
    check_filter(
        sampler.apply_top_k(mx.array(lp), 4), lp, np_top_k_keep(lp, 4), "apply_top_k on [2, 3, V]"
    )


# --- task 2: top-p --------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1e-6, 0.05, 0.3, 0.5, 0.75, 0.9, 0.99])
@pytest.mark.parametrize("scale", [0.5, 2.0, 5.0], ids=["flat", "peaked", "very_peaked"])
def test_top_p_mask(p, scale):
    rng = np.random.default_rng(int(scale * 10))
    lp = np_log_softmax(distinct_logits(rng, (4, 40), scale)).astype(np.float32)
    p = safe_p(lp, p)
    out = sampler.apply_top_p(mx.array(lp), p)
    check_filter(out, lp, np_top_p_keep(lp, p), f"apply_top_p(p={p:.4f})")


def test_top_p_always_keeps_the_top_token():
    lp = np.log(np.array([[0.9, 0.05, 0.05 - 1e-3, 1e-3]], dtype=np.float64)).astype(np.float32)
    out = to_numpy(sampler.apply_top_p(mx.array(lp), 0.5))
    assert np.isfinite(out).tolist() == [[True, False, False, False]], f"p=0.5 kept {out}"


@pytest.mark.parametrize("p", [1.0, 1.5])
def test_top_p_of_one_or_more_keeps_everything(p):
    lp = np_log_softmax(distinct_logits(np.random.default_rng(2), (2, 20))).astype(np.float32)
    check_filter(
        sampler.apply_top_p(mx.array(lp), p), lp, np.ones(lp.shape, bool), f"apply_top_p(p={p})"
    )


def test_top_p_renormalises_what_top_k_left():
    # After top-k the row no longer sums to 1: p is a share of the probability that is left.
    lp = np_log_softmax(distinct_logits(np.random.default_rng(3), (3, 40), 1.0))
    topk = np.where(np_top_k_keep(lp, 10), lp, -np.inf).astype(np.float32)
    p = safe_p(topk, 0.6)
    out = sampler.apply_top_p(mx.array(topk), p)
    check_filter(out, topk, np_top_p_keep(topk, p), f"apply_top_p(p={p:.4f}) after top-k=10")


def test_top_p_rejects_bad_p():
    lp = mx.array(np.log(np.full((1, 4), 0.25, np.float32)))
    for p in (0.0, -0.2, float("nan")):
        with pytest.raises(ValueError):
            sampler.apply_top_p(lp, p)


# --- task 3: make_sampler -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_is_argmax(dtype):
    rng = np.random.default_rng(4)
    # Distinct integers are exact in bfloat16 too, so argmax has a single answer.
    logits = np.stack([rng.permutation(200) - 100.0 for _ in range(5)]).astype(np.float32)
    logits[0, [0, -1]], logits[1, [0, -1]] = 200, -200  # the edges: max first, max last
    logits[2, [0, -1]] = -200, 200
    out = sampler.make_sampler()(mx.array(logits).astype(getattr(mx, dtype)))
    assert out.shape == (5,), f"token ids must be [B], got {out.shape}"
    assert mx.issubdtype(out.dtype, mx.integer), f"token ids must be integers, got {out.dtype}"
    np.testing.assert_array_equal(to_numpy(out), logits.argmax(-1), err_msg="temp=0 must be argmax")
    out = sampler.make_sampler(temp=0.0, top_k=3, top_p=0.5, seed=1)(mx.array(logits))
    np.testing.assert_array_equal(
        to_numpy(out), logits.argmax(-1), err_msg="temp=0 ignores top-k/p"
    )


N_DRAWS = 20_000

SAMPLING_CASES = [  # (temp, top_k, top_p)
    (1.0, 0, 1.0),  # the model's own distribution
    (0.6, 0, 1.0),  # temperature only
    (1.3, 6, 1.0),  # top-k only
    (0.8, 0, 0.8),  # top-p only
    (0.7, 8, 0.85),  # both: top-p acts on what top-k left
    (1.0, 3, 0.7),  # both, where the order matters: top-p first would keep all 3
]


@pytest.mark.parametrize(("temp", "top_k", "top_p"), SAMPLING_CASES)
def test_sampled_frequencies_match_filtered_distribution(temp, top_k, top_p):
    rng = np.random.default_rng(5)
    two = distinct_logits(rng, (2, 12), 1.5)  # two different rows, interleaved in the batch
    lp_k = np_log_softmax(two / temp)
    lp_k = np.where(np_top_k_keep(lp_k, top_k), lp_k, -np.inf)
    top_p = safe_p(lp_k, top_p) if top_p < 1 else top_p
    logits = np.tile(two, (N_DRAWS // 2, 1))
    tokens = to_numpy(
        sampler.make_sampler(temp=temp, top_k=top_k, top_p=top_p, seed=2024)(mx.array(logits))
    )
    assert tokens.shape == (N_DRAWS,), f"token ids must be [B], got {tokens.shape}"
    for row in range(2):
        expected = np_filtered_distribution(two[row : row + 1], temp, top_k, top_p)[0]
        what = f"temp={temp} top_k={top_k} top_p={top_p:.4f} row {row}"
        chi_square_check(tokens[row::2].astype(np.int64), expected, what)


def test_same_seed_gives_the_same_stream():
    logits = mx.array(distinct_logits(np.random.default_rng(6), (64, 50), 0.3))

    def stream(seed, global_seed):
        s = sampler.make_sampler(temp=1.0, top_k=40, top_p=0.95, seed=seed)
        out = []
        for i in range(3):
            mx.random.seed(global_seed + i)  # the global RNG must not matter
            out.append(to_numpy(s(logits)).tolist())
        return out

    a, b, c = stream(7, global_seed=100), stream(7, global_seed=200), stream(8, global_seed=100)
    assert a == b, "two samplers with the same seed must produce the same tokens"
    assert a[0] != a[1] != a[2], (
        "successive calls of one sampler must draw new tokens (split the key)"
    )
    assert a != c, "different seeds must give different streams"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temp": -0.5},
        {"temp": float("nan")},
        {"temp": float("inf")},
        {"temp": 1.0, "top_p": 0.0},
        {"temp": 1.0, "top_p": 1.01},
        {"temp": 1.0, "top_p": -0.3},
        {"temp": 1.0, "top_k": -1},
    ],
    ids=str,
)
def test_make_sampler_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        sampler.make_sampler(**kwargs)


def test_sampler_rejects_logits_that_are_not_batched():
    s = sampler.make_sampler(temp=1.0, seed=0)
    with pytest.raises(ValueError):
        s(mx.zeros((10,)))
