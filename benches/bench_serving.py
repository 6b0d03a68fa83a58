"""Serving many requests: continuous batching on a paged cache vs static batching on contiguous
caches, same model, same KV memory budget, same machine, one run.

The workload is seeded and long-tailed (tiny_llm_common.workload): `--requests` requests whose
prompt and output lengths are drawn from log-normal distributions, clipped to `--max-len`
tokens. Prompts are windows of real text (the book's chapters, tokenized); every request
generates exactly its drawn output length (greedy, EOS ignored), so both systems do the same
work and their outputs can be compared token for token.

- static + contiguous: a contiguous allocator cannot know how long an answer will be, so it
  reserves `max_len` token slots per request; the budget of `--budget-seqs * max_len` slots
  fits `--budget-seqs` requests. They are prefilled together (left padding) and decoded until
  the longest is done (finished rows leave the computation, but their memory stays reserved
  until the batch ends); then the next batch starts (Week 2 Day 6's batch cache).
- continuous + paged: the Week 3 engine, a pool with the same number of slots in blocks of
  `--block-size`, admitting, decoding, retiring and preempting at every step.

Then two variants on the paged engine: every prompt starting with the same system prompt,
with prefix caching on (prefill tokens saved), and n = 4 samples per prompt (blocks saved by
sharing). Memory over time for both systems is plotted to
book/src/images/week3-serving-memory.png.

On Linux the run restarts itself with NumPy's OpenBLAS preloaded for MLX's float32 matmuls
(tiny_llm_common.fastblas; TINY_LLM_FAST_BLAS=0 turns that off), and the model's weights are
dequantized to float32 (`--quantized` keeps MLX's 4-bit matmuls instead).

Run: pdm run bench-serving [--requests 64] [--quick] [--no-plot]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLOT = ROOT / "book" / "src" / "images" / "week3-serving-memory.png"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=2048, help="most tokens a request may hold")
    p.add_argument("--prompt-median", type=float, default=160.0)
    p.add_argument("--output-median", type=float, default=64.0)
    p.add_argument("--sigma", type=float, default=0.8, help="spread of the log-normal lengths")
    p.add_argument("--budget-seqs", type=int, default=4, help="KV budget, in max-length requests")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--system-prompt", type=int, default=192, help="shared prefix, tokens")
    p.add_argument("--quick", action="store_true", help="16 requests, for a smoke test")
    p.add_argument("--quantized", action="store_true", help="keep the 4-bit weights")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.max_len, args.system_prompt = 16, 512, 64
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def text_tokens(tokenizer) -> list[int]:
    """The book's chapters as one token stream: real text, shipped with the repository."""
    text = "\n\n".join(p.read_text() for p in sorted((ROOT / "book" / "src").glob("week*.md")))
    return tokenizer.encode(text)


def make_requests(args, tokenizer, shared_prefix: int = 0):
    import numpy as np

    from tiny_llm_common.workload import make_workload

    work = make_workload(
        args.requests,
        args.seed,
        max_len=args.max_len,
        shared_prefix_len=shared_prefix,
        prompt_median=args.prompt_median,
        output_median=args.output_median,
        sigma=args.sigma,
    )
    stream = text_tokens(tokenizer)
    rng = np.random.default_rng(args.seed + 1)
    system = stream[:shared_prefix]
    prompts = []
    for r in work:
        n = r.prompt_len - shared_prefix
        start = int(rng.integers(shared_prefix, len(stream) - n))
        prompts.append(system + stream[start : start + n])
    return prompts, [r.output_len for r in work]


# -- the two systems -----------------------------------------------------------------------------
def run_static(model, prompts, out_lens, batch_size: int, max_len: int):
    """Static batching over Week 2's contiguous batch cache; outputs and a memory timeline of
    (seconds, requests holding memory, slots reserved, slots holding a token)."""
    import mlx.core as mx

    from tiny_llm_ref.kv_cache import make_batch_cache

    outputs, timeline, t0 = [None] * len(prompts), [], time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        idx = list(range(first, min(first + batch_size, len(prompts))))
        longest = max(len(prompts[i]) for i in idx)
        pads = [longest - len(prompts[i]) for i in idx]
        cache = make_batch_cache(model, pads)
        rows = [[0] * pad + prompts[i] for pad, i in zip(pads, idx, strict=True)]
        outs = {i: [] for i in idx}
        active = list(idx)
        logits = model(mx.array(rows, dtype=mx.int32), cache)
        while True:
            tokens = mx.argmax(logits[:, -1, :], axis=-1).tolist()
            for i, t in zip(active, tokens, strict=True):
                outs[i].append(t)
            stored = sum(len(prompts[i]) + len(outs[i]) - 1 for i in idx)
            timeline.append((time.perf_counter() - t0, len(idx), len(idx) * max_len, stored))
            keep = [r for r, i in enumerate(active) if len(outs[i]) < out_lens[i]]
            if not keep:
                break
            if len(keep) < len(active):  # finished rows stop computing; memory stays reserved
                for layer in cache:
                    layer.filter(keep)
                active = [active[r] for r in keep]
                tokens = [tokens[r] for r in keep]
            logits = model(mx.array(tokens, dtype=mx.int32)[:, None], cache)
        for i in idx:
            outputs[i] = outs[i]
        log(f"  static: {idx[-1] + 1}/{len(prompts)} requests, {timeline[-1][0]:.0f} s")
    return outputs, timeline, time.perf_counter() - t0


def run_paged(model, prompts, params, args, num_blocks: int, prefix_caching: bool = False):
    from tiny_llm_ref.engine import LLMEngine

    engine = LLMEngine(
        model,
        None,
        num_blocks=num_blocks,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        enable_prefix_caching=prefix_caching,
    )
    done = [0]

    def progress(eng, finished):
        done[0] += len(finished)
        steps = eng.stats.steps
        if finished or len(steps) % 25 == 0:
            s = steps[-1]
            log(
                f"  paged: {done[0]}/{len(prompts)} done, running {s.running}, waiting "
                f"{s.waiting}, blocks {s.used_blocks}/{num_blocks}, {s.time:.0f} s"
            )

    t0 = time.perf_counter()
    results = engine.generate(prompts, params, on_step=progress)
    return engine, results, time.perf_counter() - t0


# -- figures -------------------------------------------------------------------------------------
def time_weighted_mean(times, values) -> float:
    """Mean of a step function: values[i] holds from times[i - 1] to times[i]."""
    total, prev, acc = times[-1], 0.0, 0.0
    for t, v in zip(times, values, strict=True):
        acc += v * (t - prev)
        prev = t
    return acc / total if total else 0.0


def plot(static_tl, paged_steps, budget_slots, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    t, _, reserved, stored = zip(*static_tl, strict=True)
    axes[0].fill_between(t, reserved, step="pre", alpha=0.3, label="reserved")
    axes[0].plot(t, stored, drawstyle="steps-pre", label="holding a token")
    axes[0].set_title("static batching, contiguous (max length)")
    pt = [s.time for s in paged_steps]
    axes[1].fill_between(pt, [s.allocated_slots for s in paged_steps], step="pre", alpha=0.3,
                         label="allocated (blocks)")  # fmt: skip
    axes[1].plot(pt, [s.stored_tokens for s in paged_steps], drawstyle="steps-pre",
                 label="holding a token")  # fmt: skip
    axes[1].set_title("continuous batching, paged")
    for ax in axes:
        ax.axhline(budget_slots, color="grey", ls="--", lw=1, label="KV budget")
        ax.set_xlabel("seconds")
        ax.legend(loc="upper right", fontsize=8)
    axes[0].set_ylabel("KV token slots")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tiny_llm_common.fastblas import active, reexec_with_fast_blas

    reexec_with_fast_blas([__file__, *sys.argv[1:]])

    from tiny_llm_common.machine import describe_machine, detect_blas
    from tiny_llm_common.models import load_model
    from tiny_llm_common.models.mlx_lm_oracle import dequantized_weights
    from tiny_llm_ref.model import Model
    from tiny_llm_ref.sequence import SamplingParams

    log(f"machine: {describe_machine()}; fast BLAS shim: {active()}")
    lm = load_model(verbose=False)
    weights = lm.weights
    if not args.quantized:
        weights = dequantized_weights(weights)
    model = Model(lm.args, weights)
    budget_slots = args.budget_seqs * args.max_len
    num_blocks = budget_slots // args.block_size

    prompts, out_lens = make_requests(args, lm.tokenizer)
    n_prompt, n_out = sum(map(len, prompts)), sum(out_lens)
    log(f"workload: {len(prompts)} requests, {n_prompt} prompt + {n_out} output tokens; "
        f"KV budget {budget_slots} slots ({args.budget_seqs} x {args.max_len})")  # fmt: skip
    greedy = [SamplingParams(max_tokens=n, ignore_eos=True) for n in out_lens]

    log("paged + continuous batching:")
    engine, results, paged_s = run_paged(model, prompts, greedy, args, num_blocks)
    log("static batching + contiguous:")
    static_out, static_tl, static_s = run_static(
        model, prompts, out_lens, args.budget_seqs, args.max_len
    )
    steps = engine.stats.steps
    held_paged = time_weighted_mean([s.time for s in steps], [s.running for s in steps])
    held_static = time_weighted_mean([r[0] for r in static_tl], [r[1] for r in static_tl])
    # Waste: slot-seconds allocated but holding no token / slot-seconds allocated.
    pt = [s.time for s in steps]
    paged_waste = 1 - time_weighted_mean(pt, [s.stored_tokens for s in steps]) / (
        time_weighted_mean(pt, [s.allocated_slots for s in steps])
    )
    st = [r[0] for r in static_tl]
    static_waste = 1 - time_weighted_mean(st, [r[3] for r in static_tl]) / (
        time_weighted_mean(st, [r[2] for r in static_tl])
    )
    equal = sum(r.outputs[0].tokens == o for r, o in zip(results, static_out, strict=True))

    log("prefix caching, shared system prompt:")
    pre_prompts, pre_lens = make_requests(args, lm.tokenizer, shared_prefix=args.system_prompt)
    half = max(
        1, len(pre_prompts) // 2
    )  # prefill is what it saves: half the requests, short answers
    pre_prompts = pre_prompts[:half]
    short = [SamplingParams(max_tokens=min(n, 4), ignore_eos=True) for n in pre_lens[:half]]
    pre_engine, _, pre_s = run_paged(model, pre_prompts, short, args, num_blocks, True)

    log("parallel sampling, n = 4:")
    eighth = max(1, len(prompts) // 8)  # n = 4 samples each
    sampled = [SamplingParams(max_tokens=n, n=4, temperature=0.8, seed=i, ignore_eos=True)
               for i, n in enumerate(out_lens[:eighth])]  # fmt: skip
    par_engine, _, par_s = run_paged(model, prompts[:eighth], sampled, args, num_blocks)

    if not args.no_plot:
        plot(static_tl, steps, budget_slots, PLOT)
        log(f"plot: {PLOT.relative_to(ROOT)}")
    result = {
        "bench": "serving",
        "machine": describe_machine(),
        "blas": "numpy-openblas shim" if active() else detect_blas(),
        "weights": "4-bit" if args.quantized else "dequantized float32",
        "requests": len(prompts),
        "prompt_tokens": n_prompt,
        "output_tokens": n_out,
        "max_len": args.max_len,
        "kv_budget_slots": budget_slots,
        "block_size": args.block_size,
        "held_paged": round(held_paged, 2),
        "held_static": round(held_static, 2),
        "held_ratio": round(held_paged / held_static, 2),
        "paged_tok_s": round(n_out / paged_s, 1),
        "static_tok_s": round(n_out / static_s, 1),
        "throughput_ratio": round(static_s / paged_s, 2),
        "paged_waste": round(paged_waste, 4),
        "static_waste": round(static_waste, 4),
        "preemptions": engine.stats.preemptions,
        "outputs_equal": f"{equal}/{len(prompts)}",
        "prefix_cache_saved_fraction": round(pre_engine.stats.prefix_cache_saved_fraction(), 3),
        "prefix_run_s": round(pre_s, 1),
        "parallel_sampling_saved_fraction": round(par_engine.stats.sharing_saved_fraction(), 3),
        "parallel_run_s": round(par_s, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
