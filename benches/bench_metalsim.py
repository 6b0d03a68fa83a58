"""How fast the Metal-on-CPU harness runs a realistic kernel, and how long compiling takes.

Times src/metalsim/tests_kernels/paged_decode_attention.metal (single-query attention over a
paged KV cache, 256 threads = 8 SIMD-groups per threadgroup, one threadgroup per head and
sequence) in fiber mode (hand-written context switch, and ucontext for comparison) and thread
mode (one OS thread per GPU thread, the ThreadSanitizer mode), and checks every run against a
float64 NumPy reference. Then measures compiling: a cold cache (precompiled header and runtime
built first), a new kernel file with a warm cache, and a cached load.

    .venv/bin/python benches/bench_metalsim.py [--quick]

Prints a table and ends with one JSON line of its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import metalsim

KERNEL = Path(metalsim.__file__).parent / "tests_kernels" / "paged_decode_attention.metal"
CONFIGS = {
    # name: (sequences, query heads, kv heads, keys per sequence, head dim)
    "2x4x300": (2, 4, 2, 300, 64),
    "4x8x1024": (4, 8, 2, 1024, 64),
}
BLOCK = 16


def make_case(seqs, heads, kv_heads, keys, d, seed=0):
    rng = np.random.default_rng(seed)
    max_blocks = -(-keys // BLOCK)
    num_blocks = seqs * max_blocks
    tables = rng.permutation(num_blocks).reshape(seqs, max_blocks).astype(np.int32)
    q = rng.standard_normal((seqs, heads, d)).astype(np.float32)
    k = rng.standard_normal((num_blocks, kv_heads, BLOCK, d)).astype(np.float32)
    v = rng.standard_normal((num_blocks, kv_heads, BLOCK, d)).astype(np.float32)
    lens = np.full(seqs, keys, np.int32)
    scale = 1.0 / np.sqrt(d)
    params = np.array([heads, kv_heads, max_blocks, BLOCK], np.uint32).tobytes()
    params += np.float32(scale).tobytes()
    ref = np.zeros((seqs, heads, d))
    for s in range(seqs):
        ks = (
            k[tables[s]].transpose(1, 0, 2, 3).reshape(kv_heads, -1, d)[:, :keys].astype(np.float64)
        )
        vs = (
            v[tables[s]].transpose(1, 0, 2, 3).reshape(kv_heads, -1, d)[:, :keys].astype(np.float64)
        )
        for h in range(heads):
            sc = ks[h // (heads // kv_heads)] @ q[s, h].astype(np.float64) * scale
            w = np.exp(sc - sc.max())
            ref[s, h] = (w / w.sum()) @ vs[h // (heads // kv_heads)]
    buffers = {0: q, 1: k, 2: v, 3: tables, 4: lens, 6: params}
    return buffers, ref


def time_kernel(lib, config: str, mode: str, repeats: int) -> dict:
    seqs, heads, kv_heads, keys, d = CONFIGS[config]
    buffers, ref = make_case(seqs, heads, kv_heads, keys, d)
    out = np.zeros((seqs, heads, d), np.float32)
    best = best_cpu = float("inf")
    for _ in range(repeats):
        out[:] = 0
        t0, c0 = time.perf_counter(), time.process_time()
        lib.dispatch(
            f"paged_decode_float32_d{d}",
            grid=(heads, seqs),
            threads_per_threadgroup=256,
            buffers={**buffers, 5: out},
            mode=mode,
        )
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    err = float(np.abs(out - ref).max())
    return {
        "config": config,
        "mode": mode,
        "ms": round(best * 1e3, 2),
        "cpu_ms": round(best_cpu * 1e3, 2),
        "max_abs_err": err,
    }


def child_ucontext(config: str, repeats: int) -> None:
    lib = metalsim.compile(KERNEL)
    r = time_kernel(lib, config, "fiber", repeats)
    r["mode"] = f"fiber ({lib.fiber_implementation})"
    print(json.dumps(r))


def run_child(args: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=True
    )
    return time.perf_counter() - t0, proc.stdout


def compile_times() -> dict:
    """Cold cache, new file with a warm cache, cached load: each in a fresh Python process."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "METALSIM_CACHE": tmp}
        load = "import metalsim, sys; metalsim.compile(sys.argv[1])"
        cmd = [sys.executable, "-c", load]

        def timed(path: Path) -> float:
            t0 = time.perf_counter()
            subprocess.run([*cmd, str(path)], env=env, check=True, capture_output=True)
            return time.perf_counter() - t0

        cold = timed(KERNEL)
        copy = Path(tmp) / "copy_of_attention.metal"
        copy.write_text(KERNEL.read_text() + "\nconstant int metalsim_bench_copy = 1;\n")
        warm = timed(copy)
        cached = timed(KERNEL)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import metalsim"], env=env, check=True)
        import_only = time.perf_counter() - t0
    return {
        "cold_cache_s": round(cold, 2),
        "new_file_warm_cache_s": round(warm, 2),
        "cached_s": round(cached, 2),
        "python_import_s": round(import_only, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="skip the compile timings and thread mode on the large case",
    )
    ap.add_argument("--child-ucontext", metavar="CONFIG", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    if args.child_ucontext:
        child_ucontext(args.child_ucontext, args.repeats)
        return

    lib = metalsim.compile(KERNEL)
    rows = [
        time_kernel(lib, "2x4x300", "fiber", args.repeats),
        time_kernel(lib, "4x8x1024", "fiber", args.repeats),
        time_kernel(lib, "2x4x300", "thread", 2),
    ]
    if not args.quick:
        rows.append(time_kernel(lib, "4x8x1024", "thread", 1))
    env = {**os.environ, "METALSIM_FIBER_IMPL": "ucontext"}
    for config in ("2x4x300", "4x8x1024"):
        _, out = run_child(["--child-ucontext", config, "--repeats", str(args.repeats)], env)
        rows.append(json.loads(out.strip().splitlines()[-1]))
    for r in rows:
        if r["mode"] == "fiber":
            r["mode"] = f"fiber ({lib.fiber_implementation})"

    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}"
    load = round(os.getloadavg()[0], 1)
    print(f"metalsim: paged decode attention, float32, d=64, 256 threads/threadgroup ({machine})")
    print(f"load average {load} (other processes share the machine: compare CPU ms)")
    print(
        f"{'seqs x heads x keys':<20} {'mode':<22} {'wall ms':>10} {'CPU ms':>10} {'max |err|':>10}"
    )
    for r in rows:
        print(
            f"{r['config']:<20} {r['mode']:<22} {r['ms']:>10.1f} {r['cpu_ms']:>10.1f} "
            f"{r['max_abs_err']:>10.1e}"
        )
    print("(best of several runs; CPU ms adds up every thread's time, so thread mode shows more)")
    figures = {"bench": "metalsim", "machine": machine, "load_average": load, "kernel_ms": rows}
    if not args.quick:
        ct = compile_times()
        print(
            "compile: cold cache {cold_cache_s} s, new file (warm cache) {new_file_warm_cache_s} s, "
            "cached {cached_s} s (python + import alone {python_import_s} s)".format(**ct)
        )
        figures["compile"] = ct
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
