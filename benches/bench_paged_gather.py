"""What the pure-MLX paged attention costs: decode attention over contiguous K/V versus the same
keys and values scattered over a block pool and gathered through block tables.

For each context length, a batch of sequences (SmolLM2-135M's attention shape by default:
9 query heads, 3 KV heads, head dim 64, float32) attends one new query each over:
- contiguous: K/V already laid out [B, H_kv, S, D] (the Week 2 cache), grouped attention;
- gather only: `gather_kv_batch`, the copy the paged version makes first;
- paged (MLX): `paged_attention_mlx`: that gather, then the same masked grouped attention.
Block ids are a random permutation of the pool, so no two consecutive logical blocks are
neighbours. Each timing is the fastest of --reps evaluations (after warm-up; on a machine shared
with other jobs the minimum is the least disturbed), inputs evaluated beforehand. "read" counts the K/V bytes a decode step must read at least: 2 * B * S * H_kv *
D * itemsize.

Then the write side: `reshape_and_cache_mlx` stores one token per sequence into a pool of
--pool-mib MiB per cache, once with the caller rebinding its caches (MLX reuses the buffers: an
in-place write) and once while the caller still holds the old caches (MLX must copy them).

Ends with one JSON line of the figures.
Run: python benches/bench_paged_gather.py [--batch 4] [--contexts 256 1024 4096] [--reps 30]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import mlx.core as mx
import numpy as np

from tiny_llm_ref.attention import scaled_dot_product_attention_grouped
from tiny_llm_ref.paged_attention import (
    gather_kv_batch,
    paged_attention_mlx,
    reshape_and_cache_mlx,
)


def timed(fn, reps: int) -> float:
    """The fastest mx.eval(fn()) of `reps` runs, in seconds, after two warm-up runs."""
    for _ in range(2):
        mx.eval(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def one_context(args, context: int) -> dict:
    rng = np.random.default_rng(context)
    B, hq, hkv, d, bs = args.batch, args.heads, args.kv_heads, args.head_dim, args.block_size
    per_seq = -(-context // bs)
    num_blocks = B * per_seq
    kc = mx.array(rng.standard_normal((num_blocks, bs, hkv, d)).astype(np.float32))
    vc = mx.array(rng.standard_normal((num_blocks, bs, hkv, d)).astype(np.float32))
    tables = mx.array(rng.permutation(num_blocks).reshape(B, per_seq).astype(np.int32))
    lens = mx.array([context] * B, dtype=mx.int32)
    q = mx.array(rng.standard_normal((B, hq, d)).astype(np.float32))
    k, v = gather_kv_batch(kc, vc, tables)  # the same tokens, laid out [B, H_kv, S, D] ...
    # ... in fresh row-major arrays (a transposed view would make attention copy it each time)
    k, v = (mx.array(np.ascontiguousarray(np.array(x)[:, :, :context])) for x in (k, v))
    mx.eval(kc, vc, tables, lens, q, k, v)
    scale = d**-0.5

    contiguous = timed(
        lambda: scaled_dot_product_attention_grouped(q[:, :, None], k, v, scale), args.reps
    )
    gather = timed(lambda: gather_kv_batch(kc, vc, tables), args.reps)
    paged = timed(lambda: paged_attention_mlx(q, kc, vc, tables, lens, scale), args.reps)
    read = 2 * B * context * hkv * d * 4
    return {
        "context": context,
        "contiguous_us": round(contiguous * 1e6, 1),
        "gather_us": round(gather * 1e6, 1),
        "paged_mlx_us": round(paged * 1e6, 1),
        "paged_over_contiguous": round(paged / contiguous, 2),
        "kv_read_mib": round(read / 2**20, 2),
    }


def write_cost(args, reps: int) -> dict:
    """Seconds per one-token-per-sequence write, rebinding (in place) versus keeping the old
    caches alive (a copy of both)."""
    hkv, d, bs = args.kv_heads, args.head_dim, args.block_size
    num_blocks = args.pool_mib * 2**20 // (bs * hkv * d * 4)
    key = mx.ones((args.batch, hkv, d))
    slots = mx.arange(args.batch, dtype=mx.int32) * bs
    results = {}
    for mode in ("rebind", "keep_old"):
        kc, vc = mx.zeros((num_blocks, bs, hkv, d)), mx.zeros((num_blocks, bs, hkv, d))
        mx.eval(kc, vc)
        times = []
        for i in range(reps + 2):
            start = time.perf_counter()
            new_k, new_v = reshape_and_cache_mlx(key, key, kc, vc, slots)
            if mode == "rebind":
                kc, vc = new_k, new_v
                del new_k, new_v
                mx.eval(kc, vc)
            else:
                mx.eval(new_k, new_v)
            if i >= 2:
                times.append(time.perf_counter() - start)
        results[mode] = min(times)
    return {
        "pool_mib_per_cache": args.pool_mib,
        "write_in_place_us": round(results["rebind"] * 1e6, 1),
        "write_with_copy_us": round(results["keep_old"] * 1e6, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--pool-mib", type=int, default=64)
    args = p.parse_args()
    print(
        f"decode attention, B={args.batch}, H_q={args.heads}, H_kv={args.kv_heads}, "
        f"D={args.head_dim}, float32, block size {args.block_size}; "
        f"MLX {mx.__version__} on {mx.default_device()}, {platform.system()}"
    )
    print(
        f"{'context':>8} {'contiguous':>11} {'gather':>9} {'paged MLX':>10} {'ratio':>6} {'K/V read':>9}"
    )
    rows = []
    for context in args.contexts:
        r = one_context(args, context)
        rows.append(r)
        print(
            f"{r['context']:>8} {r['contiguous_us']:>9.0f}us {r['gather_us']:>7.0f}us "
            f"{r['paged_mlx_us']:>8.0f}us {r['paged_over_contiguous']:>5.2f}x "
            f"{r['kv_read_mib']:>6.2f}MiB"
        )
    w = write_cost(args, args.reps)
    print(
        f"write {args.batch} tokens into a {args.pool_mib} MiB pool (per cache): "
        f"{w['write_in_place_us']:.0f}us rebinding (in place), "
        f"{w['write_with_copy_us']:.0f}us with the old caches still held (copy)"
    )
    print(
        json.dumps(
            {
                "bench": "paged_gather",
                "batch": args.batch,
                "block_size": args.block_size,
                "rows": rows,
                "write": w,
            }
        )
    )


if __name__ == "__main__":
    main()
