"""Decode attention: the course's CPU kernel against MLX's fused attention, on the same K/V.

One decode step of one layer: a batch of sequences, each with one new query and a cache of
--context keys and values, [B, H_kv, S, D]. Both sides compute the same thing:
- ours: `tiny_llm_ref.decode_attention.decode_attention` (the C++ kernel of Week 2 Day 5);
- SDPA: `mx.fast.scaled_dot_product_attention(q[:, :, None], k, v)`, MLX's own op (on a Linux
  CPU it runs as matmuls and a softmax through the BLAS MLX was loaded with).
Shapes: SmolLM2-135M's attention (9 query / 3 KV heads, D 64) and a Llama-style one (32 / 8,
D 128), float32 and float16. A step must read all of K and V at least once:
bytes = 2 * B * H_kv * S * D * itemsize, so time >= bytes / memory bandwidth. Every timing
cycles through enough copies of K/V (--working-set-mib in all) that they cannot sit in the CPU's
caches, as in a real model, where each layer has its own cache.

Read bandwidth is measured in the same run, interleaved with the cases: NumPy's max over a
--working-set-mib float32 array (reading it once, almost no arithmetic), on one thread and split
over all cores; the best rate seen in the run is the reference. read_bandwidth_fraction is
(bytes / our time) / that rate. Timings are the fastest of --reps (ours) or --sdpa-reps (SDPA)
runs after a warm-up: on a machine shared with other jobs the minimum is the least disturbed.
Per-dtype and overall figures are geometric means over the cases.

Ends with one JSON line (ours_over_sdpa, read_bandwidth_fraction, per-case figures).
Run: pdm run bench-decode-attention [--batch 8] [--context 4096] [--reps 20] [--sdpa-reps 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np

from tiny_llm_ref.decode_attention import decode_attention

# (name, query heads, KV heads, head dim)
SHAPES = [("SmolLM2-135M 9/3 D64", 9, 3, 64), ("Llama-style 32/8 D128", 32, 8, 128)]
DTYPES = ["float32", "float16"]


def describe_machine() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        name = next(
            ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if "model name" in ln
        )
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{os.cpu_count()}-core {name}, {platform.system()}"


def detect_blas() -> str:
    """The BLAS MLX's CPU matmuls (and so its CPU attention) call, from the mapped libraries."""
    mx.eval(mx.ones((8, 8)) @ mx.ones((8, 8)))
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    libs = {ln.split()[-1] for ln in maps.splitlines() if "blas" in ln.lower() and "/" in ln}
    libs = sorted(lib for lib in libs if "scipy_openblas" not in lib)  # NumPy's own copy
    if any("openblas" in Path(lib).name.lower() for lib in libs):
        return "OpenBLAS (preloaded)"
    if any("mlx_cpu" in lib for lib in libs):
        return "reference BLAS bundled with mlx-cpu"
    return "unknown"


class ReadBandwidth:
    """NumPy's max over a large float32 array: one thread, and split over every core."""

    def __init__(self, mib: int):
        self.data = np.ones(mib * 2**20 // 4, dtype=np.float32)
        self.threads = os.cpu_count() or 1
        self.parts = np.array_split(self.data, self.threads)
        self.pool = ThreadPoolExecutor(self.threads)  # NumPy reductions release the GIL
        self.best = {"1 thread": 0.0, f"{self.threads} threads": 0.0}

    def measure(self, reps: int = 3) -> None:
        runs = {
            "1 thread": lambda: self.data.max(),
            f"{self.threads} threads": lambda: list(self.pool.map(np.max, self.parts)),
        }
        for name, run in runs.items():
            run()
            for _ in range(reps):
                start = time.perf_counter()
                run()
                rate = self.data.nbytes / (time.perf_counter() - start) / 1e9
                self.best[name] = max(self.best[name], rate)

    @property
    def gbs(self) -> float:
        return max(self.best.values())


def fastest(fn, copies: list, reps: int) -> float:
    """The fastest of `reps` evaluations of fn(*copy) (cycling through copies), in seconds."""
    mx.eval(fn(*copies[0]))  # warm-up
    best = float("inf")
    for i in range(reps):
        args = copies[(i + 1) % len(copies)]
        start = time.perf_counter()
        mx.eval(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def run_case(name, H_q, H_kv, D, dtype, args, bandwidth: ReadBandwidth) -> dict:
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
    lengths = mx.full((B,), S, dtype=mx.int32)

    def ours(q, k, v):
        return decode_attention(q, k, v, lengths, scale, stream=mx.cpu)

    def sdpa(q, k, v):
        return mx.fast.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale)

    bandwidth.measure()
    ours_s = fastest(ours, copies, args.reps)
    sdpa_s = fastest(sdpa, copies, args.sdpa_reps)
    bandwidth.measure()
    q, k, v = copies[0]
    diff = mx.abs(ours(q, k, v).astype(mx.float32) - sdpa(q, k, v)[:, :, 0].astype(mx.float32))
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
        "ours_gbs": round(kv_bytes / ours_s / 1e9, 2),
        "sdpa_gbs": round(kv_bytes / sdpa_s / 1e9, 3),
        "ours_over_sdpa": round(ours_s / sdpa_s, 4),
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
    p.add_argument("--dtypes", nargs="+", default=DTYPES, choices=DTYPES + ["bfloat16"])
    args = p.parse_args(argv)

    machine, blas = describe_machine(), detect_blas()
    print(f"machine: {machine}; MLX {mx.__version__}; MLX's BLAS: {blas}")
    print(f"batch {args.batch}, context {args.context}, K/V rotated over {args.working_set_mib} MiB")
    bandwidth = ReadBandwidth(args.working_set_mib)
    cases = [
        run_case(name, H_q, H_kv, D, dtype, args, bandwidth)
        for name, H_q, H_kv, D in SHAPES
        for dtype in args.dtypes
    ]
    bw = bandwidth.gbs
    for c in cases:
        c["read_bandwidth_fraction"] = round(c["ours_gbs"] / bw, 3)

    print(f"read bandwidth (NumPy max, best seen): {bw:.1f} GB/s  {bandwidth.best}")
    header = (
        f"{'case':24s} {'dtype':8s} {'K/V MiB':>8s} {'ours ms':>9s} {'GB/s':>6s} "
        f"{'SDPA ms':>9s} {'GB/s':>6s} {'ours/SDPA':>9s} {'of read BW':>10s}"
    )
    print(header)
    print("-" * len(header))
    for c in cases:
        print(
            f"{c['case']:24s} {c['dtype']:8s} {c['kv_mib']:8.1f} {c['ours_ms']:9.2f} "
            f"{c['ours_gbs']:6.2f} {c['sdpa_ms']:9.2f} {c['sdpa_gbs']:6.2f} "
            f"{c['ours_over_sdpa']:9.3f} {c['read_bandwidth_fraction']:10.2f}"
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
        "batch": args.batch,
        "context": args.context,
        "read_bandwidth_gbs": round(bw, 2),
        "read_bandwidth_by": {k: round(v, 2) for k, v in bandwidth.best.items()},
        "ours_over_sdpa": summary("ours_over_sdpa"),
        "read_bandwidth_fraction": summary("read_bandwidth_fraction"),
        "cases": cases,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
