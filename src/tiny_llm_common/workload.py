"""Seeded synthetic serving workloads: how long prompts and answers are, and when requests arrive.

Real chat traffic is long-tailed: most prompts and answers are short, a few are very long. A
log-normal distribution has that shape, so prompt and output lengths are drawn from one each and
clipped so that a request never holds more than `max_len` tokens. The same arguments give the same
workload on every run, so benchmarks and graders that use it are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Request:
    """One request: `prompt_len` tokens in (the first `shared_prefix_len` of them are the same
    for every request, like a system prompt), `output_len` tokens out, arriving at `arrival`
    seconds after the start."""

    prompt_len: int
    output_len: int
    arrival: float
    shared_prefix_len: int = 0

    @property
    def total_len(self) -> int:
        """Tokens in the KV cache once the request has finished."""
        return self.prompt_len + self.output_len


def make_workload(
    n_requests: int,
    seed: int,
    *,
    max_len: int = 2048,
    shared_prefix_len: int = 0,
    prompt_median: float = 100.0,
    output_median: float = 200.0,
    sigma: float = 1.0,
    arrival_rate: float | None = None,
) -> list[Request]:
    """`n_requests` requests drawn with NumPy's PCG64 generator seeded with `seed`.

    - `prompt_median`, `output_median`, `sigma`: the log-normal distributions of the lengths (the
      median, and the standard deviation of the log; the mean is `median * exp(sigma**2 / 2)`).
      The defaults give means near 165 prompt and 330 output tokens before clipping, close to
      the ShareGPT averages the vLLM paper reports (161 and 338).
    - `max_len`: the most tokens a request may hold; prompts are clipped to
      `[shared_prefix_len + 1, max_len - 1]`, then outputs to `[1, max_len - prompt_len]`.
    - `shared_prefix_len`: tokens every prompt starts with (added on top of the drawn length).
    - `arrival_rate`: requests per second of a Poisson process; `None` means all arrive at 0.0
      (an offline batch).
    """
    for name, value, low in (("n_requests", n_requests, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len must be an int >= 2, got {max_len!r}")
    if not isinstance(shared_prefix_len, int) or not 0 <= shared_prefix_len <= max_len - 2:
        raise ValueError(
            f"shared_prefix_len must be in [0, max_len - 2], got {shared_prefix_len!r}"
        )
    for name, value in (("prompt_median", prompt_median), ("output_median", output_median)):
        if not value > 0 or math.isinf(value):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not sigma >= 0 or math.isinf(sigma):
        raise ValueError(f"sigma must be >= 0, got {sigma!r}")
    if arrival_rate is not None and (not arrival_rate > 0 or math.isinf(arrival_rate)):
        raise ValueError(f"arrival_rate must be a positive number or None, got {arrival_rate!r}")

    rng = np.random.default_rng(seed)
    prompt = rng.lognormal(math.log(prompt_median), sigma, n_requests)
    output = rng.lognormal(math.log(output_median), sigma, n_requests)
    gaps = rng.exponential(1.0 / arrival_rate, n_requests) if arrival_rate else np.zeros(n_requests)
    prompt = np.clip(np.rint(prompt) + shared_prefix_len, shared_prefix_len + 1, max_len - 1)
    output = np.clip(np.rint(output), 1, max_len - prompt)
    arrival = np.cumsum(gaps)
    return [
        Request(int(p), int(o), float(a), shared_prefix_len)
        for p, o, a in zip(prompt, output, arrival, strict=True)
    ]
