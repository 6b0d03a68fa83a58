"""Generation with and without the KV cache: runtime, forward calls and peak memory against N.

For each N, the reference generates N tokens after a 4-token prompt twice: with Week 1's
`simple_generate` (every step re-runs the whole sequence) and with Week 2's `generate_with_cache`
(the prompt once, then one token per step). It counts the model calls and the token positions
they process, records MLX's peak memory, fits t ~ c * N^e to each method's times, renders a
Markdown table and a log-log plot (book/src/images/week2-complexity.png) and ends with one JSON
line.

The default model is a tiny random Llama (2 layers, hidden 64): the lecture's exponents are about
the context length, and a tiny model lets N reach 1024 in minutes on 2 CPU cores. Without the
cache the run time grows fast: a point whose predicted time exceeds --max-run-seconds is
skipped (and reported as such).

Run: pdm run bench-complexity [--quick] [--ns 32 64 ...] [--model smollm2] [--no-plot]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import mlx.core as mx

from tiny_llm_common.checkpoints import random_checkpoint
from tiny_llm_common.machine import describe_machine
from tiny_llm_ref.complexity import (
    attention_share,
    dense_flops_per_token,
    fit_power_law,
    tokens_processed,
)
from tiny_llm_ref.decode import generate_with_cache
from tiny_llm_ref.generate import simple_generate
from tiny_llm_ref.model import Model

ROOT = Path(__file__).resolve().parents[1]
PLOT = ROOT / "book" / "src" / "images" / "week2-complexity.png"
DEFAULT_NS = (32, 64, 128, 256, 512, 1024)
QUICK_NS = (16, 32, 64)
PROMPT = [1, 2, 3, 4]


class Counting:
    """The model, counting calls and token positions."""

    def __init__(self, model):
        self.model, self.args = model, model.args
        self.calls = self.positions = 0

    def __call__(self, tokens, cache=None):
        self.calls += 1
        self.positions += tokens.shape[0] * tokens.shape[1]
        return self.model(tokens, cache)


def run_once(model, n: int, cached: bool) -> dict:
    """Generate n tokens; the best of up to 3 runs when one takes under a second (noise)."""
    gen = generate_with_cache if cached else simple_generate
    best = None
    for _ in range(3):
        counter = Counting(model)
        mx.clear_cache()
        mx.reset_peak_memory()
        start = time.perf_counter()
        out = gen(counter, None, PROMPT, n)  # no tokenizer: no EOS, exactly n tokens
        seconds = time.perf_counter() - start
        assert len(out) == n
        best = seconds if best is None else min(best, seconds)
        if seconds > 1.0:
            break
    seconds = best
    return {
        "n": n,
        "seconds": seconds,
        "calls": counter.calls,
        "positions": counter.positions,
        "expected_positions": tokens_processed(len(PROMPT), n, cached),
        "peak_mb": mx.get_peak_memory() / 2**20,
    }


def load(name: str | None, max_n: int):
    if name is None:
        args, weights = random_checkpoint(
            "llama", seed=0, max_position_embeddings=max(4096, max_n + len(PROMPT))
        )
        return "tiny random llama (2 layers, hidden 64, 4/2 heads)", Model(args, weights)
    from tiny_llm_common.models import load_model

    loaded = load_model(name)
    return loaded.name, Model(loaded.args, loaded.weights)


def local_exponents(rows: list[dict]) -> None:
    """Slope of log t between each measured point and the previous one of the same method."""
    prev: dict[str, dict] = {}
    for r in rows:
        r["local_exponent"] = None
        if r["seconds"] is None:
            continue
        p = prev.get(r["cache"])
        if p is not None:
            r["local_exponent"] = math.log(r["seconds"] / p["seconds"]) / math.log(r["n"] / p["n"])
        prev[r["cache"]] = r


def table(rows: list[dict]) -> str:
    lines = [
        "| N | cache | time (s) | local exponent | forward calls | positions run | peak memory (MiB) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = "skipped" if r["seconds"] is None else f"{r['seconds']:.3f}"
        le = "" if r.get("local_exponent") is None else f"{r['local_exponent']:.2f}"
        calls = "" if r["seconds"] is None else r["calls"]
        pos = r["expected_positions"] if r["seconds"] is None else r["positions"]
        mem = "" if r["seconds"] is None else f"{r['peak_mb']:.1f}"
        lines.append(f"| {r['n']} | {r['cache']} | {t} | {le} | {calls} | {pos} | {mem} |")
    return "\n".join(lines)


def plot(rows: list[dict], fits: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for cache, marker in (("none", "o"), ("contiguous", "s")):
        pts = [(r["n"], r["seconds"]) for r in rows if r["cache"] == cache and r["seconds"]]
        if not pts:
            continue
        ns, ts = zip(*pts, strict=True)
        e, c = fits[cache]
        label = f"{'no cache' if cache == 'none' else 'KV cache'}: t ~ N^{e:.2f}"
        (points,) = ax.loglog(ns, ts, marker=marker, linestyle="none", label=label)
        ax.loglog(ns, [c * n**e for n in ns], linestyle="--", linewidth=1, color=points.get_color())
    ax.set_xlabel("tokens generated N")
    ax.set_ylabel("seconds")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ns", type=int, nargs="+", default=None, help="values of N")
    p.add_argument("--quick", action="store_true", help=f"N in {QUICK_NS} (CI-sized)")
    p.add_argument("--model", default=None, help="a model name for load_model (default: tiny)")
    p.add_argument("--max-run-seconds", type=float, default=120.0)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--plot-path", type=Path, default=PLOT)
    args = p.parse_args(argv)
    ns = sorted(args.ns or (QUICK_NS if args.quick else DEFAULT_NS))
    if ns[0] < 1:
        p.error("every N must be >= 1")

    label, model = load(args.model, ns[-1])
    for gen in (simple_generate, generate_with_cache):  # warm up both paths
        gen(model, None, PROMPT, 8)
    rows: list[dict] = []
    for cached in (False, True):
        cache = "contiguous" if cached else "none"
        done: list[tuple[int, float]] = []
        for n in ns:
            if len(done) >= 2:  # predict from the points so far; skip what would take too long
                e, c = fit_power_law(*zip(*done[-3:], strict=True))
                predicted = c * n**e
                if predicted > args.max_run_seconds:
                    print(f"skip N={n} cache={cache}: predicted {predicted:.0f} s", flush=True)
                    rows.append(
                        {
                            "n": n,
                            "cache": cache,
                            "seconds": None,
                            "expected_positions": tokens_processed(len(PROMPT), n, cached),
                        }
                    )
                    continue
            r = run_once(model, n, cached) | {"cache": cache}
            print(
                f"N={n:5d} cache={cache:10s} {r['seconds']:8.3f} s  {r['calls']} calls  "
                f"{r['positions']} positions  peak {r['peak_mb']:.1f} MiB",
                flush=True,
            )
            rows.append(r)
            done.append((n, r["seconds"]))

    fits = {}
    for cache in ("none", "contiguous"):
        pts = [(r["n"], r["seconds"]) for r in rows if r["cache"] == cache and r["seconds"]]
        fits[cache] = fit_power_law(*zip(*pts, strict=True)) if len(pts) >= 2 else (None, None)
    local_exponents(rows)
    print()
    print(table(rows))
    print()
    for cache, (e, _) in fits.items():
        if e is not None:
            print(f"fitted exponent of run time in N, cache={cache}: {e:.2f}")
    args_m = model.args
    share = {c: round(attention_share(args_m, c), 3) for c in (64, 1024, 4096)}
    print(f"attention's share of a decode step's flops at context 64/1024/4096: {share}")
    # The context at which one decode step's attention flops equal its matrices' flops.
    per_key = 4 * args_m.head_dim * args_m.num_attention_heads * args_m.num_hidden_layers
    even = round(dense_flops_per_token(args_m) / per_key)
    print(f"attention and the matrices cost the same at a context of {even} tokens")
    machine = describe_machine()
    if not args.no_plot and fits["none"][0] is not None:
        plot(rows, fits, args.plot_path, f"{label}\nMLX {mx.__version__}, {machine}")
        print(f"plot: {args.plot_path}")
    result = {
        "bench": "complexity",
        "model": label,
        "mlx": mx.__version__,
        "machine": machine,
        "ns": ns,
        "exponent_no_cache": None if fits["none"][0] is None else round(fits["none"][0], 3),
        "exponent_cache": None
        if fits["contiguous"][0] is None
        else round(fits["contiguous"][0], 3),
        "seconds": {
            r["cache"] + f"/{r['n']}": None if r["seconds"] is None else round(r["seconds"], 4)
            for r in rows
        },
        "calls_match_n": all(r["calls"] == r["n"] for r in rows if r["seconds"]),
        "positions_match_formula": all(
            r["positions"] == r["expected_positions"] for r in rows if r["seconds"]
        ),
        "peak_mb_max_n": {
            r["cache"]: round(r["peak_mb"], 2)
            for r in rows
            if r["seconds"]
            and r["n"] == max(x["n"] for x in rows if x["cache"] == r["cache"] and x["seconds"])
        },
        "attention_share": share,
        "attention_equals_matrices_at": even,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
