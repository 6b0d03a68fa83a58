"""Decode speed: the reference with its KV cache against mlx-lm on the same model and prompt.

Both run greedy decoding of the same prompt for the same number of tokens (end-of-sequence
ignored, so both produce exactly --max-tokens): ours through `generate_with_cache`, mlx-lm
through `mlx_lm.generate.generate_step` (the loop under its `generate` and `stream_generate`),
with mlx-lm's own llama Model built from the very tensors the course's loader returns. Decode
speed is (tokens - 1) / (time of the last token - time of the first): prefill excluded. The two
alternate for --rounds rounds so that a busy machine slows both alike; the ratio is the median
of the rounds' ratios.

--float32 casts the float16 quantization scales and biases (and any float16 tensor) to float32
for both models: exact, as every float16 is a float32. --dequantize unpacks every 4/8-bit matrix
into a dense float32 one for both: the matmuls then run in the BLAS.

Ends with one JSON line (ours_tok_s, mlx_lm_tok_s, ratio = ours / mlx-lm, ...).
Run: pdm run bench-decode [--model smollm2] [--max-tokens 24] [--rounds 5] [--float32 | --dequantize]
On Linux, preload OpenBLAS for float32 matmuls: LD_PRELOAD=/usr/lib/x86_64-linux-gnu/
openblas-pthread/libopenblas.so.0 pdm run bench-decode (see book/src/week2-07-benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import mlx.core as mx

from tiny_llm_common.machine import describe_machine, detect_blas
from tiny_llm_common.models import load_model
from tiny_llm_common.models.mlx_lm_oracle import build_mlx_lm_model
from tiny_llm_common.weights import QuantizedWeights
from tiny_llm_ref.decode import generate_with_cache
from tiny_llm_ref.model import Model

QUESTION = "Write a short story about a lighthouse keeper who finds a message in a bottle."


class NoEos:
    """A tokenizer stand-in with no end-of-sequence token: both runs make exactly N tokens."""

    eos_token_ids: set[int] = set()


def matmul_gflops(n: int = 512, reps: int = 5) -> float:
    """float32 GFLOP/s of one n x n matmul, the best of `reps` (what the BLAS delivers)."""
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a @ b)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def to_float32(weights: dict) -> dict:
    def conv(a: mx.array) -> mx.array:
        return a.astype(mx.float32) if a.dtype in (mx.float16, mx.bfloat16) else a

    out = {}
    for name, v in weights.items():
        if isinstance(v, QuantizedWeights):
            v = QuantizedWeights(v.weight, conv(v.scales), conv(v.biases), v.group_size, v.bits)
        else:
            v = conv(v)
        out[name] = v
    return out


def dequantized(weights: dict) -> dict:
    """Every quantized matrix unpacked to a dense float32 one: the matmuls go to the BLAS."""
    out = {}
    for name, v in weights.items():
        if isinstance(v, QuantizedWeights):
            v = mx.dequantize(v.weight, v.scales, v.biases, group_size=v.group_size, bits=v.bits)
        out[name] = v.astype(mx.float32)
    mx.eval(list(out.values()))
    return out


def profile_step(model, context: int, reps: int = 5) -> dict:
    """Milliseconds of one decode step and of its parts at about `context` cached tokens, each
    evaluated on its own (best of `reps`): where the reference's decode time goes."""
    from tiny_llm_ref.basics import linear
    from tiny_llm_ref.kv_cache import KVCache, make_cache

    def best(fn) -> float:
        mx.eval(fn())
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            mx.eval(fn())
            times.append(time.perf_counter() - start)
        return min(times) * 1e3

    hidden = model.args.hidden_size
    layer = model.layers[0]
    x = mx.random.normal((1, 1, hidden))
    # Layer 0's attention on its own cache, filled with `context` random tokens; every timed
    # call appends one more, as a decode step does.
    attn_cache = KVCache()
    mx.eval(layer.self_attn(mx.random.normal((1, context, hidden)), attn_cache))
    cache = make_cache(model)
    mx.eval(model(mx.zeros((1, context), dtype=mx.int32), cache))
    token = mx.array([[1]], dtype=mx.int32)
    parts = {
        "attention block, one layer": best(
            lambda: layer.self_attn(layer.input_layernorm(x), attn_cache)
        ),
        "MLP block, one layer": best(lambda: layer.mlp(layer.post_attention_layernorm(x))),
        "output head (norm + lm_head)": best(lambda: linear(model.norm(x), model.lm_head)),
        "whole decode step": best(lambda: model(token, cache)),
    }
    per_layer = parts["attention block, one layer"] + parts["MLP block, one layer"]
    parts["sum: layers x blocks + head"] = (
        len(model.layers) * per_layer + parts["output head (norm + lm_head)"]
    )
    return {k: round(v, 2) for k, v in parts.items()}


def time_ours(model, prompt: list[int], n: int) -> tuple[float, list[int]]:
    stamps: list[float] = []
    out = generate_with_cache(
        model, NoEos(), prompt, n, on_token=lambda _: stamps.append(time.perf_counter())
    )
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), out


def time_mlx_lm(model, prompt: list[int], n: int) -> tuple[float, list[int]]:
    from mlx_lm.generate import generate_step

    stamps, out = [], []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=n):
        stamps.append(time.perf_counter())
        out.append(int(token))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--float32", action="store_true", help="float16 scales/tensors -> float32")
    p.add_argument(
        "--dequantize", action="store_true", help="dense float32 weights for both (BLAS matmuls)"
    )
    p.add_argument(
        "--profile", action="store_true", help="also time the parts of one decode step of ours"
    )
    args = p.parse_args(argv)
    if args.max_tokens < 2 or args.rounds < 1:
        p.error("--max-tokens must be >= 2 and --rounds >= 1")

    blas = detect_blas()
    gflops = matmul_gflops()
    print(f"BLAS: {blas}; float32 512x512 matmul: {gflops:.1f} GFLOP/s")
    if sys.platform.startswith("linux") and "OpenBLAS" not in blas:
        print(
            "  (for fast float32 matmuls preload OpenBLAS: apt-get install libopenblas0-pthread, "
            "then LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0)"
        )
    loaded = load_model(args.model)
    weights = loaded.weights
    if args.dequantize:
        weights = dequantized(weights)
    elif args.float32:
        weights = to_float32(weights)
    tok = loaded.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": QUESTION}]))
    ours = Model(loaded.args, weights)
    theirs = build_mlx_lm_model(loaded.args, weights)
    dtype = "dense float32" if args.dequantize else "float32" if args.float32 else "as loaded"
    print(f"prompt {len(prompt)} tokens, {args.max_tokens} new tokens, weights {dtype}")

    ours_tps, theirs_tps, same = [], [], True
    for r in range(args.rounds):
        order = [("ours", ours), ("mlx-lm", theirs)]
        if r % 2:
            order.reverse()  # alternate who goes first
        for name, model in order:
            timer = time_ours if name == "ours" else time_mlx_lm
            tps, out = timer(model, prompt, args.max_tokens)
            (ours_tps if name == "ours" else theirs_tps).append(tps)
            if name == "ours":
                ours_out = out
            else:
                theirs_out = out
            print(f"round {r + 1}: {name:7s} {tps:7.2f} tok/s", flush=True)
        same = same and ours_out == theirs_out

    ours_med, theirs_med = statistics.median(ours_tps), statistics.median(theirs_tps)
    # Paired: each round's two runs shared the machine's load of the moment.
    ratio = statistics.median(a / b for a, b in zip(ours_tps, theirs_tps, strict=True))
    print(
        f"\ndecode: ours {ours_med:.2f} tok/s, mlx-lm {theirs_med:.2f} tok/s (medians), "
        f"ratio ours / mlx-lm {ratio:.2f} (median of the rounds' ratios)"
    )
    print(f"same tokens: {same}; text: {tok.decode(ours_out)!r}")
    result = {
        "bench": "decode",
        "model": loaded.name,
        "machine": describe_machine(),
        "mlx": mx.__version__,
        "blas": blas,
        "matmul_gflops": round(gflops, 1),
        "weights": dtype,
        "prompt_tokens": len(prompt),
        "new_tokens": args.max_tokens,
        "rounds": args.rounds,
        "ours_tok_s": round(ours_med, 3),
        "mlx_lm_tok_s": round(theirs_med, 3),
        "ratio": round(ratio, 3),
        "ours_all": [round(x, 3) for x in ours_tps],
        "mlx_lm_all": [round(x, 3) for x in theirs_tps],
        "same_tokens": same,
    }
    if args.profile:
        parts = profile_step(ours, len(prompt))
        print(f"\none decode step of ours at a context of ~{len(prompt)} tokens (ms):")
        for name, ms in parts.items():
            print(f"  {name:32s} {ms:9.2f}")
        result["profile_ms"] = parts
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
