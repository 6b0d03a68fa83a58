"""Week 3 Days 4-7: a serving engine, continuous batching over the paged cache.

    engine = LLMEngine(model, tokenizer, num_blocks=256)
    engine.add_request(prompt_tokens, SamplingParams(max_tokens=64))   # as many as you like
    while engine.has_unfinished():
        for finished in engine.step():                                 # one forward pass
            print(finished.request_id, finished.outputs[0].tokens)

Model execution (this file) is kept apart from scheduling (scheduler.py) and block bookkeeping
(block_manager.py, prefix_cache.py): a step asks the scheduler for a batch, prepares the paged
cache once, runs the model once on a [B, L] token array, samples one token per sequence, and
hands finished sequences back to the scheduler, which frees their blocks at once.

Chapters: book/src/week3-04-continuous-batching.md to week3-07-preemption.md.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .paged_kv_cache import PagedKVCache
from .prefix_cache import PrefixCachingBlockManager
from .scheduler import ScheduledBatch, Scheduler
from .sequence import (
    CompletionOutput,
    RequestOutput,
    SamplingParams,
    SeqStatus,
    Sequence,
    sample_rows,
)


@dataclass
class StepRecord:
    """What one step did, and the pool right after it (for reports and plots)."""

    time: float  # seconds since the engine's first step began
    is_prefill: bool
    batch: int  # sequences in the forward pass
    tokens: int  # tokens fed (without padding)
    running: int  # sequences holding blocks after the step
    waiting: int
    used_blocks: int  # blocks held by at least one sequence
    table_blocks: int  # sum of the block tables' lengths: blocks used if nothing were shared
    allocated_slots: int  # used_blocks * block_size
    stored_tokens: int  # slots of used blocks that hold a token


@dataclass
class EngineStats:
    prompt_tokens: int = 0  # prompt tokens of the sequences admitted (first admissions)
    cached_prompt_tokens: int = 0  # of those, found in the prefix cache instead of computed
    computed_tokens: int = 0  # tokens fed to the model (recomputation included)
    generated_tokens: int = 0
    preemptions: int = 0
    steps: list[StepRecord] = field(default_factory=list)

    def prefix_cache_saved_fraction(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def sharing_saved_fraction(self) -> float:
        """Share of block-steps saved by sharing: 1 - sum(used) / sum(blocks if unshared)."""
        unshared = sum(s.table_blocks for s in self.steps)
        return 1 - sum(s.used_blocks for s in self.steps) / unshared if unshared else 0.0

    def waste_fraction(self) -> float:
        """Allocated KV slots holding no token, time-averaged over the run's steps."""
        pairs = [(s.allocated_slots, s.stored_tokens) for s in self.steps if s.allocated_slots]
        return float(np.mean([1 - st / al for al, st in pairs])) if pairs else 0.0


class LLMEngine:
    """Continuous batching of many requests through one paged KV cache."""

    def __init__(
        self,
        model,
        tokenizer=None,
        num_blocks: int = 512,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = False,
        dtype=mx.float32,
    ):
        manager = (
            PrefixCachingBlockManager(num_blocks, block_size) if enable_prefix_caching else None
        )
        self.model, self.tokenizer = model, tokenizer
        self.cache = PagedKVCache(model, num_blocks, block_size, dtype, manager=manager)
        self.scheduler = Scheduler(self.cache, max_num_seqs, max_num_batched_tokens)
        self.eos = set() if tokenizer is None else {int(t) for t in tokenizer.eos_token_ids}
        self.vocab_size = model.args.vocab_size
        # The most tokens one sequence may ever hold: the pool, or the model's positions.
        self.max_seq_len = num_blocks * block_size
        if model.args.max_position_embeddings:
            self.max_seq_len = min(self.max_seq_len, model.args.max_position_embeddings)
        self.stats = EngineStats()
        self._requests: dict[int, list[Sequence]] = {}  # request id -> its samples
        self._next_request, self._next_seq = itertools.count(), itertools.count()
        self._t0: float | None = None

    # -- submission (provided) --------------------------------------------------------------------
    def add_request(self, prompt_tokens, params: SamplingParams | None = None) -> int:
        """Queue a request; returns its id. A request the engine could never serve raises
        ValueError here, and the engine goes on serving the others."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        prompt = self._check_prompt(prompt_tokens)
        request_id = next(self._next_request)
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        # Sample 0 is scheduled now; its n - 1 siblings are forked off it after its prefill.
        seq = Sequence(next(self._next_seq), request_id, 0, prompt, params, seed)
        self._requests[request_id] = [seq]
        self.scheduler.add(seq)
        return request_id

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- Day 4, tasks 3-5: one iteration ----------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward pass, sample, retire. Returns the requests that finished."""
        if self._t0 is None:
            self._t0 = time.perf_counter()
        preempted_before = self.scheduler.num_preemptions
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        if batch.is_prefill:
            for seq in batch.seqs:
                if not seq.output and seq.index == 0:  # first admission (not a recompute)
                    self.stats.prompt_tokens += len(seq.prompt)
                    self.stats.cached_prompt_tokens += seq.num_cached
        logits = self._forward(batch)
        tokens = sample_rows(logits, batch.seqs)
        finished = []
        for row, (seq, n, token) in enumerate(
            zip(batch.seqs, batch.num_new_tokens, tokens, strict=True)
        ):
            seq.num_cached += n
            self._commit(seq)
            if seq.params.n > 1 and not seq.forked:
                self._fork_samples(seq, logits[row])
            finished += self._append_token(seq, token)
        self.stats.computed_tokens += sum(batch.num_new_tokens)
        self.stats.preemptions += self.scheduler.num_preemptions - preempted_before
        self._record(batch)
        return finished

    def _forward(self, batch: ScheduledBatch) -> mx.array:
        """Logits [B, V] at each sequence's last new token."""
        seqs, counts = batch.seqs, batch.num_new_tokens
        self.cache.begin_step([s.seq_id for s in seqs], counts)
        width = max(counts)
        rows = [s.tokens[s.num_cached : s.num_cached + n] + [0] * (width - n)
                for s, n in zip(seqs, counts, strict=True)]  # fmt: skip
        logits = self.model(mx.array(rows, dtype=mx.int32), self.cache.layers())
        last = mx.array([n - 1 for n in counts], dtype=mx.int32)
        return logits[mx.arange(len(seqs)), last]

    def _append_token(self, seq: Sequence, token: int) -> list[RequestOutput]:
        """Add a sampled token; retire the sequence if it is done. Returns the request's output
        if this was its last unfinished sample."""
        reason = None
        if token in self.eos and not seq.params.ignore_eos:
            reason = "stop"  # the EOS token is not part of the output
        else:
            seq.output.append(token)
            self.stats.generated_tokens += 1
            if len(seq.output) >= seq.params.max_tokens or seq.num_tokens >= self.max_seq_len:
                reason = "length"
        if reason is None:
            return []
        self.scheduler.finish(seq, reason)
        samples = self._requests[seq.request_id]
        if len(samples) < seq.params.n or any(s.status != SeqStatus.FINISHED for s in samples):
            return []
        del self._requests[seq.request_id]
        return [self._output(seq.request_id, samples)]

    # -- Day 5, task 1: parallel sampling shares the prompt's blocks ------------------------------
    def _fork_samples(self, seq: Sequence, logits_row: mx.array) -> None:
        """After sample 0's prompt is in the cache, start its n - 1 siblings as forks of it:
        they share every block (no copy) and each draws its own first token from the same
        logits. Sample i samples with seed `seq.seed + i` (sample 0's is the request's seed).
        The first write into a shared, partly filled block is copied by the cache."""
        seq.forked = True
        siblings = []
        for index in range(1, seq.params.n):
            child = Sequence(
                next(self._next_seq), seq.request_id, index, list(seq.prompt), seq.params,
                seq.seed + index, num_cached=seq.num_cached, forked=True,
            )  # fmt: skip
            self.cache.manager.fork(seq.seq_id, child.seq_id)
            self._requests[seq.request_id].append(child)
            self.scheduler.add_running(child)
            siblings.append(child)
        tokens = sample_rows(mx.broadcast_to(logits_row, (len(siblings), logits_row.shape[-1])),
                             siblings)  # fmt: skip
        for child, token in zip(siblings, tokens, strict=True):
            self._append_token(child, token)

    # -- prefix caching hook (Day 6) and reports (provided) ---------------------------------------
    def _commit(self, seq: Sequence) -> None:
        if isinstance(self.cache.manager, PrefixCachingBlockManager) and seq.seq_id in self.cache:
            self.cache.manager.commit(seq.seq_id, seq.tokens)

    def _output(self, request_id: int, samples: list[Sequence]) -> RequestOutput:
        outs = []
        for s in sorted(samples, key=lambda s: s.index):
            text = None if self.tokenizer is None else self.tokenizer.decode(s.output)
            outs.append(CompletionOutput(s.index, list(s.output), s.finish_reason, text))
        return RequestOutput(request_id, list(samples[0].prompt), outs)

    def _record(self, batch: ScheduledBatch) -> None:
        usage, mgr = self.cache.usage(), self.cache.manager
        running = self.scheduler.running
        self.stats.steps.append(
            StepRecord(
                time=time.perf_counter() - self._t0,
                is_prefill=batch.is_prefill,
                batch=len(batch.seqs),
                tokens=sum(batch.num_new_tokens),
                running=len(running),
                waiting=len(self.scheduler.waiting),
                used_blocks=usage.used_blocks,
                table_blocks=sum(len(mgr.block_table(s.seq_id)) for s in running),
                allocated_slots=usage.allocated_slots,
                stored_tokens=usage.stored_tokens,
            )
        )

    def run(self, on_step: Callable[[LLMEngine, list[RequestOutput]], None] | None = None):
        """Step until every request is finished; outputs by request id. `on_step(engine,
        finished)` is called after every step (progress displays)."""
        results: dict[int, RequestOutput] = {}
        while self.has_unfinished():
            finished = self.step()
            results.update((r.request_id, r) for r in finished)
            if on_step is not None:
                on_step(self, finished)
        return results

    def generate(
        self,
        prompts: list,
        params: SamplingParams | list[SamplingParams] | None = None,
        on_step: Callable[[LLMEngine, list[RequestOutput]], None] | None = None,
    ) -> list[RequestOutput]:
        """vLLM-style offline generation: token lists (or strings, with a tokenizer) in, one
        RequestOutput per prompt out, in the prompts' order. Every prompt is checked before
        any runs."""
        if not isinstance(prompts, list | tuple) or not prompts:
            raise ValueError("prompts must be a non-empty list")
        plist = params if isinstance(params, list | tuple) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        encoded = [self._encode(p) for p in prompts]
        for tokens in encoded:  # fail before queueing anything
            self._check_prompt(tokens)
        ids = [self.add_request(t, p) for t, p in zip(encoded, plist, strict=True)]
        results = self.run(on_step)
        return [results[i] for i in ids]

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer")
            return self.tokenizer.encode(prompt)
        return prompt

    def _check_prompt(self, prompt_tokens) -> list[int]:
        """The prompt as a list of ints, or a clear error if the engine could never serve it."""
        if isinstance(prompt_tokens, str | bytes) or not hasattr(prompt_tokens, "__len__"):
            raise TypeError(
                f"prompt_tokens must be a list of token ids, got {type(prompt_tokens).__name__}"
            )
        prompt = list(prompt_tokens)
        if not prompt:
            raise ValueError("prompt_tokens is empty: the model needs at least one token to go on")
        for t in prompt:
            if (
                isinstance(t, bool)
                or not isinstance(t, int | np.integer)
                or not 0 <= t < self.vocab_size
            ):
                raise ValueError(f"token id {t!r} is not an int in [0, {self.vocab_size})")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(
                f"prompt of {len(prompt)} tokens cannot be served: one sequence holds at most "
                f"{self.max_seq_len} tokens (num_blocks * block_size, or the model's positions), "
                "and it needs room for at least one generated token"
            )
        return [int(t) for t in prompt]
