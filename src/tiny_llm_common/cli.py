"""`pdm run main`: load a model, run it with the reference or your own code, stream the answer.

    pdm run main                                   # SmolLM2, the reference, the best cache it has
    pdm run main --solution tiny_llm --cache none  # your Week 1 code
    pdm run main --model qwen2-0.5b --temp 0.7 --top-p 0.9 --seed 1

The solution package provides `Model`, `make_sampler`, `simple_generate` (Week 1, no cache) and
`generate_with_cache(model, tokenizer, prompt_tokens, max_tokens, cache_kind, sampler, on_token)`
(Weeks 2 and 3). A task that is not done yet raises NotImplementedError naming the task; we print
that one line instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable

from tiny_llm_common.models import DEFAULT_MODEL, KNOWN_MODELS, ModelLoadError, load_model

SOLUTIONS = ("tiny_llm_ref", "tiny_llm")
CACHE_KINDS = ("none", "contiguous", "paged")
# What each cache needs from the solution package; the message when it is missing.
CACHE_NEEDS = {
    "contiguous": "Week 2 Day 1 (the contiguous KV cache: `generate_with_cache` in decode.py)",
    "paged": "Week 3 Day 3 (the paged KV cache: `generate_with_cache` in decode.py)",
}
# Where each public name lives if the package's __init__ does not re-export it.
_MODULE_OF = {
    "Model": "model",
    "make_sampler": "sampler",
    "simple_generate": "generate",
    "generate_with_cache": "decode",
}


class CliError(Exception):
    """A problem to report in one line (exit status 2)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pdm run main", description="Generate text with the course's model code."
    )
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--max-tokens", type=_positive_int, default=64)
    p.add_argument(
        "--solution",
        choices=SOLUTIONS,
        default="tiny_llm_ref",
        help="whose code runs the model: the reference or yours (default: %(default)s)",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"{', '.join(KNOWN_MODELS)}, a .gguf file, a directory with config.json "
        "and *.safetensors, or a hub repo id (default: %(default)s)",
    )
    p.add_argument(
        "--cache",
        choices=CACHE_KINDS,
        default=None,
        help="KV cache (default: the best the solution implements: paged, contiguous, then none)",
    )
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed the sampler")
    p.add_argument(
        "--no-chat",
        action="store_true",
        help="feed the prompt as is instead of through the chat template",
    )
    return p


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def lookup(pkg, name: str) -> Callable | None:
    """`pkg.name`, or `pkg.<module>.name`; None when neither exists."""
    found = getattr(pkg, name, None)
    if found is not None:
        return found
    module_name = f"{pkg.__name__}.{_MODULE_OF[name]}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            return None
        raise
    return getattr(module, name, None)


def _require(pkg, name: str, task: str) -> Callable:
    found = lookup(pkg, name)
    if found is None:
        raise CliError(f"{pkg.__name__} has no `{name}` yet: it comes with {task}")
    return found


_mid_line = False  # streamed text is on screen without its newline yet


def _end_line() -> None:
    global _mid_line
    if _mid_line:
        print(flush=True)
        _mid_line = False


class _Stream:
    """Prints tokens as they arrive and records when each one came."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.detok = tokenizer.detokenizer()
        self.times: list[float] = []

    def __call__(self, token_id) -> None:
        self.times.append(time.perf_counter())
        token_id = int(token_id)
        if token_id in self.tokenizer.eos_token_ids:
            return
        global _mid_line
        self.detok.add_token(token_id)
        print(self.detok.last_segment, end="", flush=True)
        _mid_line = True

    def finish(self) -> None:
        global _mid_line
        self.detok.finalize()
        print(self.detok.last_segment, flush=True)
        _mid_line = False


def _generate(sol, model, tokenizer, prompt_ids, args, sampler, cache: str | None):
    """Run generation with `cache` (None: the best available). Returns (stream, start, kind)."""
    kinds = [cache] if cache else ["paged", "contiguous", "none"]
    with_cache = lookup(sol, "generate_with_cache")
    skipped: list[str] = []
    for kind in kinds:
        if kind != "none" and with_cache is None:
            if cache:
                raise CliError(f"--cache {kind} needs {CACHE_NEEDS[kind]}")
            skipped.append(kind)
            continue
        stream = _Stream(tokenizer)
        start = time.perf_counter()
        try:
            if kind == "none":
                generate = _require(sol, "simple_generate", "Week 1 Day 6")
                generate(
                    model, tokenizer, prompt_ids, args.max_tokens, sampler=sampler, on_token=stream
                )
            else:
                with_cache(model, tokenizer, prompt_ids, args.max_tokens, kind, sampler, stream)
        except NotImplementedError as e:
            # Week 1's own tasks, or a failure half-way: report the task as it is.
            if kind == "none" or stream.times:
                raise
            if cache:
                detail = f": {e}" if str(e) else ""
                raise CliError(
                    f"--cache {kind} needs {CACHE_NEEDS.get(kind, kind)}{detail}"
                ) from None
            skipped.append(kind)
            continue
        if skipped:
            kind += f" ({', '.join(skipped)}: not implemented yet)"
        return stream, start, kind
    raise AssertionError("unreachable: 'none' either returns or raises")


def run(args: argparse.Namespace) -> None:
    sol = importlib.import_module(args.solution)
    loaded = load_model(args.model, verbose=True)
    tokenizer = loaded.tokenizer

    make_sampler = _require(sol, "make_sampler", "Week 1 Day 7")
    try:
        sampler = make_sampler(temp=args.temp, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except (TypeError, ValueError) as e:
        raise CliError(f"bad sampling option: {e}") from None

    if args.no_chat:
        prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=True)
    else:
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
        except ValueError as e:
            raise CliError(str(e)) from None
        prompt_ids = tokenizer.encode(text)  # the template already holds any BOS

    model = _require(sol, "Model", "Week 1 Day 5")(loaded.args, loaded.weights)
    print(f"[{args.solution}] {args.prompt}", flush=True)
    stream, start, kind = _generate(sol, model, tokenizer, prompt_ids, args, sampler, args.cache)
    stream.finish()
    print(_stats(len(prompt_ids), start, stream.times, kind), flush=True)


def _stats(n_prompt: int, start: float, times: list[float], kind: str) -> str:
    """Prompt speed: prompt tokens over the time to the first token. Generation speed: the tokens
    after the first over the time they took (so the prompt's cost is not counted twice)."""
    if not times:
        return f"prompt: {n_prompt} tokens | generation: 0 tokens | cache: {kind}"
    prompt_tps = n_prompt / max(times[0] - start, 1e-9)
    gen = f"{len(times)} tokens"
    if len(times) > 1:
        gen += f", {(len(times) - 1) / max(times[-1] - times[0], 1e-9):.1f} tok/s"
    return f"prompt: {n_prompt} tokens, {prompt_tps:.1f} tok/s | generation: {gen} | cache: {kind}"


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        run(args)
    except (ModelLoadError, CliError) as e:
        _end_line()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NotImplementedError as e:
        hint = (
            " (`--solution tiny_llm_ref` runs the reference)" if args.solution == "tiny_llm" else ""
        )
        print(f"error: {e or 'not implemented'}{hint}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        _end_line()
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
