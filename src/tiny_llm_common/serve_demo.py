"""`pdm run serve-demo`: many chat requests through one engine, with a live view of the pool.

    pdm run serve-demo                                # the reference engine, 16 questions
    pdm run serve-demo --solution tiny_llm            # your Week 3 engine
    pdm run serve-demo --blocks 48 --max-tokens 96    # a small pool: watch preemption happen

Each line of the live display is one engine step: how many sequences are running (holding KV
blocks) and waiting, the blocks in use, and the tokens generated so far. The answers are
printed at the end, in the order the questions were asked.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Write a haiku about the sea.",
    "What does a CPU do?",
    "Why is the sky blue? Answer in one sentence.",
    "Give me a tip for learning a new language.",
    "What is 12 times 12?",
    "Translate 'good morning' into Spanish.",
    "What is photosynthesis?",
    "Suggest a name for a pet turtle.",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "Explain what a KV cache is in one sentence.",
    "List two benefits of regular exercise.",
    "What is the largest planet in our solar system?",
    "Write one sentence about autumn.",
]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdm run serve-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--solution", choices=("tiny_llm_ref", "tiny_llm"), default="tiny_llm_ref")
    p.add_argument("--requests", type=int, default=len(QUESTIONS), help="questions to ask")
    p.add_argument("--max-tokens", type=int, default=48, help="per answer")
    p.add_argument("--blocks", type=int, default=256, help="KV pool size, in blocks")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=16, help="most sequences running at once")
    p.add_argument("--quantized", action="store_true", help="keep 4-bit weights (slow batches)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from tiny_llm_common.fastblas import active, reexec_with_fast_blas

    if argv is None:
        reexec_with_fast_blas(["-m", "tiny_llm_common.serve_demo", *sys.argv[1:]])

    from tiny_llm_common.models import load_model
    from tiny_llm_common.models.mlx_lm_oracle import dequantized_weights

    try:
        engine_mod = importlib.import_module(f"{args.solution}.engine")
        seq_mod = importlib.import_module(f"{args.solution}.sequence")
        model_mod = importlib.import_module(f"{args.solution}.model")
    except ModuleNotFoundError as e:
        print(
            f"error: {args.solution} has no {e.name}: it comes with Week 3 Day 4", file=sys.stderr
        )
        return 1
    loaded = load_model(verbose=True)
    weights = loaded.weights
    if active() and not args.quantized:  # dense float32 matmuls batch well with OpenBLAS
        weights = dequantized_weights(weights)
    tok = loaded.tokenizer
    model = model_mod.Model(loaded.args, weights)
    engine = engine_mod.LLMEngine(
        model, tok, num_blocks=args.blocks, block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
    )  # fmt: skip
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)]
    params = seq_mod.SamplingParams(max_tokens=args.max_tokens)
    ids = []
    for q in questions:
        text = tok.apply_chat_template([{"role": "user", "content": q}])
        ids.append(engine.add_request(tok.encode(text), params))
    print(
        f"{len(ids)} requests, pool of {args.blocks} blocks x {args.block_size} tokens", flush=True
    )

    start, done, results = time.perf_counter(), 0, {}
    while engine.has_unfinished():
        finished = engine.step()
        results.update((r.request_id, r) for r in finished)
        done += len(finished)
        s = engine.stats.steps[-1]
        elapsed = time.perf_counter() - start
        line = (
            f"step {len(engine.stats.steps):4d} {'prefill' if s.is_prefill else 'decode '} "
            f"| running {s.running:3d} | waiting {s.waiting:3d} | blocks {s.used_blocks:4d}/"
            f"{args.blocks} | done {done:3d}/{len(ids)} | {engine.stats.generated_tokens:5d} "
            f"tokens, {engine.stats.generated_tokens / elapsed:5.1f} tok/s"
        )
        if sys.stdout.isatty():  # one line, redrawn in place
            print("\r" + line, end="", flush=True)
        elif finished or len(engine.stats.steps) % 10 == 1:
            print(line, flush=True)
    print()
    for q, i in zip(questions, ids, strict=True):
        out = results[i].outputs[0]
        print(f"\n> {q}\n{out.text.strip()}  [{len(out.tokens)} tokens, {out.finish_reason}]")
    print(f"\npreemptions: {engine.stats.preemptions}; pool free at the end: "
          f"{engine.cache.num_free_blocks}/{args.blocks} blocks")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
