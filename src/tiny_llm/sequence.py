"""Week 3 Days 4-7: what the serving engine knows about a request (all provided).

A request is a prompt plus `SamplingParams`; with `n > 1` it becomes n *sequences* that share
the prompt. A sequence's `tokens` are its prompt followed by what it generated so far, and
`num_cached` of them have their keys and values in the paged cache. The next forward pass
feeds `tokens[num_cached:]`: the whole prompt when the sequence is new (or was preempted and
must be recomputed), one token when it is decoding.

Chapter: book/src/week3-04-continuous-batching.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import mlx.core as mx

from .sampler import apply_top_k, apply_top_p


@dataclass(frozen=True)
class SamplingParams:
    """How to generate for one request (in the spirit of vLLM's `SamplingParams`).

    - `max_tokens`: the most tokens each sample generates;
    - `temperature` 0 is greedy; otherwise `top_k` (0: off) and `top_p` (1: off) filter first;
    - `n`: independent samples of the same prompt (they share the prompt's KV blocks);
    - `seed`: makes sampling reproducible whatever else runs in the same batch;
    - `ignore_eos`: keep generating after an end-of-sequence token (benchmarks use it to get
      exact output lengths).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        for name in ("max_tokens", "n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1: off), got {p!r}")
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 0):
            raise ValueError(f"seed must be an int >= 0 or None, got {s!r}")
        if self.n > 1 and self.temperature == 0:
            raise ValueError("n > 1 samples need temperature > 0 (greedy samples are all equal)")


class SeqStatus(Enum):
    WAITING = "waiting"  # new, or preempted: its tokens must be (re)computed
    RUNNING = "running"  # its KV is in the cache; it decodes one token per step
    FINISHED = "finished"


@dataclass
class Sequence:
    """One sample of one request."""

    seq_id: int
    request_id: int
    index: int  # which of the request's n samples
    prompt: list[int]
    params: SamplingParams
    seed: int  # this sample's sampling seed
    output: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose keys/values are stored in the paged cache
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None  # "stop" (EOS) or "length"
    forked: bool = False  # sample 0 of an n > 1 request: have its siblings been forked off?

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def num_to_compute(self) -> int:
        """Tokens the next forward pass must feed: all uncached ones."""
        return self.num_tokens - self.num_cached


@dataclass
class CompletionOutput:
    index: int  # sample number within the request
    tokens: list[int]
    finish_reason: str  # "stop" or "length"
    text: str | None = None


@dataclass
class RequestOutput:
    """A finished request: its prompt and its `n` samples, in sample order."""

    request_id: int
    prompt_tokens: list[int]
    outputs: list[CompletionOutput]


def sample_rows(logits: mx.array, seqs: list[Sequence]) -> list[int]:
    """One token per row of `logits` [B, V] for `seqs[b]`. Greedy rows take the argmax; the
    others draw with a key made from (the sample's seed, how many tokens it has generated), so
    a sample's tokens never depend on which other sequences share its batch, or on whether it
    was preempted and recomputed."""
    greedy = mx.argmax(logits, axis=-1)
    picks: list[mx.array] = []
    for b, seq in enumerate(seqs):
        p = seq.params
        if p.temperature == 0:
            picks.append(greedy[b])
            continue
        row = logits[b].astype(mx.float32) / p.temperature
        row = row - mx.logsumexp(row, keepdims=True)
        row = apply_top_p(apply_top_k(row, p.top_k), p.top_p)
        key = mx.random.key((seq.seed * 1_000_003 + len(seq.output)) % (1 << 63))
        picks.append(mx.random.categorical(row, key=key))
    return [int(t) for t in mx.stack(picks).tolist()]
