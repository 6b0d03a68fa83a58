"""Decode attention: the course's CPU kernel against MLX's fused attention, on the same K/V.

One decode step of one layer: a batch of sequences, each with one new query and a cache of
--context keys and values, [B, H_kv, S, D]. Both sides compute the same thing:
- ours: `tiny_llm_ref.decode_attention.decode_attention` (the C++ kernel of Week 2 Day 5), or with
  --learner yours, `tiny_llm.decode_attention.decode_attention`;
- SDPA: `mx.fast.scaled_dot_product_attention(q[:, :, None], k, v)`, MLX's own op (on a Linux
  CPU it runs as matmuls and a softmax through the BLAS MLX was loaded with).
Shapes: SmolLM2-135M's attention (9 query / 3 KV heads, D 64) and a Llama-style one (32 / 8,
D 128), float32 and float16. A step must read all of K and V at least once:
bytes = 2 * B * H_kv * S * D * itemsize, so time >= bytes / read bandwidth. Every timing cycles
through enough copies of K/V (--working-set-mib in all) that they cannot sit in the CPU's caches,
as in a real model, where each layer has its own cache.

Read bandwidth is measured on the very same bytes, alternating with our kernel: NumPy's max over
K and V viewed as uint32 (it reads each byte once and does almost nothing else), on one thread
and split over all cores, the faster of the two. read_bandwidth_fraction = that read time / our
time, both the fastest of --reps alternating runs, so a neighbour's load on a shared machine hits
both sides alike. The arithmetic side: a step does 4 * B * H_q * S * D flops (flop/B column:
2 * H_q / H_kv flops per element over its size), printed as GFLOP/s beside NumPy's float32
matmul rate, this machine's arithmetic ceiling measured in the same run. SDPA's time is the
fastest of --sdpa-reps runs. Per-dtype and overall figures are geometric means over the cases.

Ends with one JSON line (ours_over_sdpa, read_bandwidth_fraction, per-case figures).
Run: pdm run bench-decode-attention [--learner] [--batch 8] [--context 4096] [--reps 20]
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

from tiny_llm_common.machine import describe_machine, detect_blas

# (name, query heads, KV heads, head dim)
SHAPES = [("SmolLM2-135M 9/3 D64", 9, 3, 64), ("Llama-style 32/8 D128", 32, 8, 128)]
DTYPES = ["float32", "float16"]


def matmul_gflops(n: int = 1024, reps: int = 5) -> float:
    """float32 GFLOP/s of NumPy's n x n matmul (its OpenBLAS, every core): the arithmetic rate
    this machine reaches when arithmetic, not memory, is the limit."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


class Reader:
    """Reads arrays once with NumPy's max over uint32 views: on one thread, and split over all
    cores (NumPy releases the GIL in reductions); returns the faster time."""

    def __init__(self):
        self.threads = os.cpu_count() or 1
        self.pool = ThreadPoolExecutor(self.threads)

    def plan(self, arrays: list[mx.array]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        # np.asarray shares the memory of an evaluated mx.array (no copy).
        whole = [np.asarray(a).reshape(-1).view(np.uint32) for a in arrays]
        parts = [p for w in whole for p in np.array_split(w, self.threads)]
        return whole, parts

    def time(self, plan) -> float:
        whole, parts = plan
        start = time.perf_counter()
        for w in whole:
            w.max()
        one = time.perf_counter() - start
        start = time.perf_counter()
        list(self.pool.map(np.max, parts))
        return min(one, time.perf_counter() - start)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    mx.eval(fn(*args))
    return time.perf_counter() - start


def run_case(name, H_q, H_kv, D, dtype, args, reader: Reader, decode_attention) -> dict:
    B, S = args.batch, args.context
    dt = getattr(mx, dtype)
    scale = D**-0.5
    kv_bytes = 2 * B * H_kv * S * D * dt.size
    n_copies = max(1, math.ceil(args.working_set_mib * 2**20 / kv_bytes))
    mx.random.seed(0)
    copies = []
    for _ in range(n_copies):
        q = mx.random.normal((B, H_q, D)).astype(dt)
        k = mx.random.normal((B, H_kv, S, D)).astype(dt)
        v = mx.random.normal((B, H_kv, S, D)).astype(dt)
        mx.eval(q, k, v)
        copies.append((q, k, v))
    reads = [reader.plan([k, v]) for _, k, v in copies]
    lengths = mx.full((B,), S, dtype=mx.int32)

    def ours(q, k, v):
        return decode_attention(q, k, v, lengths, scale, stream=mx.cpu)

    def sdpa(q, k, v):
        return mx.fast.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale)

    timed(ours, *copies[0])  # warm-up
    reader.time(reads[0])
    ours_s = read_s = float("inf")
    for i in range(args.reps):  # ours and a plain read of the same bytes, alternately
        c = (i + 1) % n_copies
        ours_s = min(ours_s, timed(ours, *copies[c]))
        read_s = min(read_s, reader.time(reads[c]))
    timed(sdpa, *copies[0])
    sdpa_s = min(timed(sdpa, *copies[(i + 1) % n_copies]) for i in range(args.sdpa_reps))

    q, k, v = copies[0]
    diff = mx.abs(ours(q, k, v).astype(mx.float32) - sdpa(q, k, v)[:, :, 0].astype(mx.float32))
    flops = 4 * B * H_q * S * D  # q . k and weight * v: a multiply and an add each
    return {
        "case": name,
        "dtype": dtype,
        "heads": H_q,
        "kv_heads": H_kv,
        "head_dim": D,
        "kv_mib": round(kv_bytes / 2**20, 1),
        "copies": n_copies,
        "ours_ms": round(ours_s * 1e3, 3),
        "sdpa_ms": round(sdpa_s * 1e3, 3),
        "read_ms": round(read_s * 1e3, 3),
        "ours_gbs": round(kv_bytes / ours_s / 1e9, 2),
        "sdpa_gbs": round(kv_bytes / sdpa_s / 1e9, 3),
        "read_gbs": round(kv_bytes / read_s / 1e9, 2),
        "ours_over_sdpa": round(ours_s / sdpa_s, 4),
        "read_bandwidth_fraction": round(read_s / ours_s, 3),
        "flops_per_byte": round(flops / kv_bytes, 2),
        "ours_gflops": round(flops / ours_s / 1e9, 1),
        "max_abs_diff": float(mx.max(diff)),
    }


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(x) for x in values) / len(values))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--reps", type=int, default=20, help="timed runs of our kernel per case")
    p.add_argument("--sdpa-reps", type=int, default=3, help="timed runs of MLX SDPA per case")
    p.add_argument("--working-set-mib", type=int, default=256)
    p.add_argument("--dtypes", nargs="+", default=DTYPES, choices=DTYPES)
    p.add_argument(
        "--learner",
        action="store_true",
        help="time your kernel (tiny_llm) instead of the reference",
    )
    args = p.parse_args(argv)
    package = "tiny_llm" if args.learner else "tiny_llm_ref"
    decode_attention = importlib.import_module(f"{package}.decode_attention").decode_attention

    machine, blas = describe_machine(), detect_blas()
    print(f"machine: {machine}; MLX {mx.__version__}; MLX's BLAS: {blas}; ours: {package}")
    print(
        f"batch {args.batch}, context {args.context}, K/V rotated over {args.working_set_mib} MiB"
    )
    reader = Reader()
    gflops = matmul_gflops()
    cases = [
        run_case(name, H_q, H_kv, D, dtype, args, reader, decode_attention)
        for name, H_q, H_kv, D in SHAPES
        for dtype in args.dtypes
    ]
    gflops = max(gflops, matmul_gflops())
    print(f"NumPy float32 matmul (the arithmetic ceiling): {gflops:.0f} GFLOP/s")
    header = (
        f"{'case':24s} {'dtype':8s} {'K/V MiB':>7s} {'ours ms':>8s} {'GB/s':>6s} "
        f"{'SDPA ms':>8s} {'GB/s':>5s} {'read GB/s':>9s} {'ours/SDPA':>9s} {'of read':>7s} "
        f"{'flop/B':>6s} {'GFLOP/s':>7s}"
    )
    print(header)
    print("-" * len(header))
    for c in cases:
        print(
            f"{c['case']:24s} {c['dtype']:8s} {c['kv_mib']:7.0f} {c['ours_ms']:8.2f} "
            f"{c['ours_gbs']:6.2f} {c['sdpa_ms']:8.1f} {c['sdpa_gbs']:5.2f} {c['read_gbs']:9.2f} "
            f"{c['ours_over_sdpa']:9.3f} {c['read_bandwidth_fraction']:7.2f} "
            f"{c['flops_per_byte']:6.1f} {c['ours_gflops']:7.1f}"
        )

    def summary(key: str) -> dict:
        out = {d: round(geomean(c[key] for c in cases if c["dtype"] == d), 4) for d in args.dtypes}
        out["overall"] = round(geomean(c[key] for c in cases), 4)
        return out

    result = {
        "bench": "decode_attention",
        "machine": machine,
        "mlx": mx.__version__,
        "blas": blas,
        "solution": package,
        "batch": args.batch,
        "context": args.context,
        "read_gbs_best": max(c["read_gbs"] for c in cases),
        "matmul_gflops": round(gflops, 1),
        "ours_over_sdpa": summary("ours_over_sdpa"),
        "read_bandwidth_fraction": summary("read_bandwidth_fraction"),
        "cases": cases,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
