"""KV-cache bytes per token for real model shapes, GQA's saving, and max-length waste.

- Bytes per token (2 x layers x kv_heads x head_dim x dtype size) for SmolLM2-135M, Qwen2-0.5B,
  Qwen3-0.6B and Llama-2-7B, with their shapes hard-coded from their config.json files, next to
  what the same model would store with one KV head per query head (multi-head attention).
- Measured: SmolLM2 (the course's default model) runs a prompt with the reference KVCache and
  the bytes it stores are weighed against the formula (--no-measure skips it).
- The waste of reserving `max_len` slots per request on the seeded long-tailed workload of
  tiny_llm_common.workload (the same one Week 3's benches use).

Ends with one JSON line. Run: pdm run bench-kv-memory [--requests N] [--seed S] [--no-measure]
"""

from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx

from tiny_llm_common.machine import describe_machine
from tiny_llm_common.weights import ModelArgs
from tiny_llm_common.workload import make_workload
from tiny_llm_ref.kv_memory import contiguous_waste, gqa_savings, kv_bytes, kv_bytes_per_token

# (name, shape from the model's config.json, dtype its checkpoint ships in)
MODELS = [
    ("SmolLM2-135M", ModelArgs("llama", 576, 30, 1536, 9, 3, 49152, head_dim=64), "bfloat16"),
    ("Qwen2-0.5B", ModelArgs("qwen2", 896, 24, 4864, 14, 2, 151936, head_dim=64), "bfloat16"),
    ("Qwen3-0.6B", ModelArgs("qwen3", 1024, 28, 3072, 16, 8, 151936, head_dim=128), "bfloat16"),
    ("Llama-2-7B", ModelArgs("llama", 4096, 32, 11008, 32, 32, 32000, head_dim=128), "float16"),
]
MAX_LENS = (2048, 4096)


def model_rows() -> list[dict]:
    rows = []
    for name, args, dtype in MODELS:
        per_token = kv_bytes_per_token(args, dtype)
        mha = ModelArgs(**{**vars(args), "num_key_value_heads": args.num_attention_heads})
        rows.append(
            {
                "model": name,
                "layers": args.num_hidden_layers,
                "heads": args.num_attention_heads,
                "kv_heads": args.num_key_value_heads,
                "head_dim": args.head_dim,
                "dtype": dtype,
                "bytes_per_token": per_token,
                "mha_bytes_per_token": kv_bytes_per_token(mha, dtype),
                "gqa_savings": round(gqa_savings(args), 4),
                "tokens_per_gib": 2**30 // per_token,
                "gib_at_4096_tokens": round(kv_bytes(args, 4096, dtype) / 2**30, 4),
            }
        )
    return rows


def measure_smollm2(n_tokens: int) -> dict:
    """Prefill SmolLM2 with `n_tokens` tokens through the reference cache; weigh the cache."""
    from tiny_llm_common.models import load_model
    from tiny_llm_ref.kv_cache import make_cache
    from tiny_llm_ref.model import Model

    loaded = load_model("smollm2")
    model = Model(loaded.args, loaded.weights)
    cache = make_cache(model)
    tokens = mx.array([[(7 * i + 1) % 1000 for i in range(n_tokens)]], dtype=mx.int32)
    start = time.perf_counter()
    mx.eval(model(tokens, cache))
    seconds = time.perf_counter() - start
    states = [c.state for c in cache]
    dtype = states[0][0].dtype
    stored = sum(k.nbytes + v.nbytes for k, v in states)
    return {
        "tokens": n_tokens,
        "cache_dtype": str(dtype).removeprefix("mlx.core."),
        "stored_bytes": stored,
        "formula_bytes": kv_bytes(loaded.args, n_tokens, dtype),
        "allocated_bytes": sum(c.nbytes for c in cache),
        "prefill_seconds": round(seconds, 3),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--measure-tokens", type=int, default=64)
    p.add_argument("--no-measure", action="store_true", help="skip running SmolLM2")
    args = p.parse_args(argv)

    rows = model_rows()
    print(
        "| model | layers | heads / KV heads | head_dim | dtype | KV bytes/token | "
        "with MHA | GQA saves | tokens per GiB |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['layers']} | {r['heads']} / {r['kv_heads']} | {r['head_dim']} | "
            f"{r['dtype']} | {r['bytes_per_token']:,} ({r['bytes_per_token'] / 2**10:.0f} KiB) | "
            f"{r['mha_bytes_per_token'] / 2**10:.0f} KiB | {r['gqa_savings']:.0%} | "
            f"{r['tokens_per_gib']:,} |"
        )

    waste = {}
    print()
    print("| max_len | requests | mean tokens at the end | slots reserved | waste |")
    print("|---:|---:|---:|---:|---:|")
    for max_len in MAX_LENS:
        lengths = [r.total_len for r in make_workload(args.requests, args.seed, max_len=max_len)]
        w = contiguous_waste(lengths, max_len)
        waste[str(max_len)] = round(w, 4)
        print(
            f"| {max_len} | {len(lengths)} | {sum(lengths) / len(lengths):.0f} | "
            f"{max_len * len(lengths):,} | {w:.1%} |"
        )

    measured = None
    if not args.no_measure:
        measured = measure_smollm2(args.measure_tokens)
        ok = measured["stored_bytes"] == measured["formula_bytes"]
        print()
        print(
            f"SmolLM2, {measured['tokens']} tokens through the reference KVCache "
            f"({measured['cache_dtype']}): stored {measured['stored_bytes']:,} bytes, formula "
            f"{measured['formula_bytes']:,} ({'equal' if ok else 'DIFFERENT'}); allocated "
            f"{measured['allocated_bytes']:,} (whole steps of 256 tokens)"
        )

    result = {
        "bench": "kv_memory",
        "machine": describe_machine(),
        "mlx": mx.__version__,
        "bytes_per_token": {r["model"]: r["bytes_per_token"] for r in rows},
        "gqa_savings": {r["model"]: r["gqa_savings"] for r in rows},
        "workload": {"requests": args.requests, "seed": args.seed},
        "contiguous_waste": waste,
        "measured_smollm2": measured,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
