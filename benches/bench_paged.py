"""The PagedAttention kernel against contiguous K/V, and what paging saves in memory.

Decode attention of B sequences of `context` tokens (SmolLM2-135M's heads: 9 query heads, 3 KV
heads, head dim 64), on the CPU, with the *same* keys and values laid out two ways:

- contiguous: key/value [B, H_kv, S, D], read by the Week 2 Day 5 kernel
  (`tiny_llm_ref.decode_attention.decode_attention`) and by MLX's
  `mx.fast.scaled_dot_product_attention`;
- paged: a pool [num_blocks, block_size, H_kv, D] whose blocks are handed out in a random order,
  read through block tables by the Week 3 Day 2 kernel (`paged_attention`), and by the pure-MLX
  version that gathers the blocks first (`paged_attention_mlx`).

The two kernels are timed in interleaved rounds (one call of each per round), so a neighbour's
load on a shared machine hits both alike, and their ratio is the median of the per-round ratios;
the slow MLX calls are timed in rounds of their own (medians). The read bandwidth the kernel is
held to is measured in the same run, before and after: NumPy summing a 256 MiB array on 1 and on
2 threads, the best of all. Memory waste comes from the seeded workload of
benches/bench_block_waste.py (its functions, unchanged). The block-size study times the kernel for
blocks of 8 to 128 tokens and plots time and waste to book/src/images/week3-paged-block-size.png.

Run: pdm run bench-paged [--batch 8] [--context 4096] [--rounds 15] [--no-plot]

`--device gpu` (MLX with CUDA on an NVIDIA GPU: `pdm install -G cuda`) benchmarks the CUDA kernel
instead (src/tiny_llm_ref/paged_attention_cuda.py), through the same `paged_attention` entry point:
batch 8, 32 query / 8 KV heads, D = 128, float16, contexts 1024 / 4096 / 16384, against
`mx.fast.scaled_dot_product_attention` on the same K/V laid out contiguously. Each timing evaluates
a batch of calls built beforehand (so Python's graph building is not timed) over several copies of
the data (so no call finds its K/V in the 50 MB L2 cache); the bandwidth the kernel is held to is
measured in the same run, before and after: a sum over 1 GiB (read) and a 1 GiB copy (read +
write), the best of both.

Run: pdm run bench-paged --device gpu [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np

from tiny_llm_common.workload import make_workload
from tiny_llm_ref.decode_attention import decode_attention
from tiny_llm_ref.paged_attention import paged_attention, paged_attention_mlx, reshape_and_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_block_waste as waste  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLOT = ROOT / "book" / "src" / "images" / "week3-paged-block-size.png"
H_Q, H_KV, D = 9, 3, 64
BLOCK_SIZES = waste.BLOCK_SIZES  # (8, 16, 32, 64, 128)
DTYPES = {"float32": mx.float32, "float16": mx.float16}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes/s NumPy reads summing a float32 array, the better of 1 and 2 threads."""
    a = np.ones(mib * 2**20 // 4, dtype=np.float32)
    best = 0.0
    for threads in (1, 2):
        parts = np.array_split(a, threads)
        with ThreadPoolExecutor(threads) as pool:
            for _ in range(repeats):
                t0 = time.perf_counter()
                list(pool.map(np.add.reduce, parts))
                best = max(best, a.nbytes / (time.perf_counter() - t0))
    return best


def block_tables(batch: int, context: int, block_size: int, seed: int) -> np.ndarray:
    """[batch, context / block_size] int32: every block of the pool, in a random order."""
    per_seq = context // block_size
    rng = np.random.default_rng(seed)
    return rng.permutation(batch * per_seq).astype(np.int32).reshape(batch, per_seq)


def paged_layout(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    """x [B, H, S, D] as a pool [num_blocks, block_size, H, D] laid out by `table`."""
    b, h, s, d = x.shape
    per_seq = table.shape[1]
    bs = s // per_seq
    blocks = x.reshape(b, h, per_seq, bs, d).transpose(0, 2, 3, 1, 4)
    pool = np.empty((b * per_seq, bs, h, d), dtype=x.dtype)
    pool[table.reshape(-1)] = blocks.reshape(b * per_seq, bs, h, d)
    return pool


def one_call(fn) -> float:
    t0 = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - t0


def timed_rounds(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Per-call seconds of each function, one call of each per round (two warm-up calls)."""
    for fn in fns.values():
        mx.eval(fn())
        mx.eval(fn())
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(one_call(fn))
    return times


def ratio(times, a: str, b: str) -> float:
    n = min(len(times[a]), len(times[b]))
    return statistics.median(x / y for x, y in zip(times[a][:n], times[b][:n], strict=True))


def bench_dtype(dtype: str, batch: int, context: int, block_size: int, rounds: int) -> dict:
    rng = np.random.default_rng(0)
    dt = DTYPES[dtype]
    shape = (batch, H_KV, context, D)
    k = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    q = mx.array(rng.standard_normal((batch, H_Q, D)).astype(np.float32)).astype(dt)
    table = block_tables(batch, context, block_size, seed=0)
    k_pool, v_pool = paged_layout(k, table), paged_layout(v, table)
    key, value = mx.array(k).astype(dt), mx.array(v).astype(dt)
    kc, vc = mx.array(k_pool).astype(dt), mx.array(v_pool).astype(dt)
    tables = mx.array(table)
    lens = mx.full((batch,), context, dtype=mx.int32)
    scale = D**-0.5
    mx.eval(q, key, value, kc, vc, tables, lens)
    del k, v, k_pool, v_pool

    fns = {
        "paged": lambda: paged_attention(q, kc, vc, tables, lens, scale, stream=mx.cpu),
        "contiguous": lambda: decode_attention(q, key, value, lens, scale, stream=mx.cpu),
        "sdpa": lambda: mx.fast.scaled_dot_product_attention(
            q[:, :, None], key, value, scale=scale, stream=mx.cpu
        ),
        "paged_mlx": lambda: paged_attention_mlx(q, kc, vc, tables, lens, scale),
    }
    # Same keys, same answer: the layouts hold the same values.
    out = {
        name: np.array(fn().astype(mx.float32)).reshape(batch, H_Q, D) for name, fn in fns.items()
    }
    diff = max(float(np.abs(out[n] - out["contiguous"]).max()) for n in out)
    # The two kernels alternate with each other only: a 100 ms MLX call in between would leave
    # the next call to find cold caches and sleeping threads.
    fast = timed_rounds({n: fns[n] for n in ("paged", "contiguous")}, rounds)
    slow = timed_rounds({n: fns[n] for n in ("sdpa", "paged_mlx")}, max(3, rounds // 3))
    kv_bytes = 2 * batch * H_KV * context * D * key.itemsize
    med = {name: statistics.median(t) for name, t in {**fast, **slow}.items()}
    return {
        "ms": {name: round(t * 1e3, 3) for name, t in med.items()},
        "paged_over_contiguous": round(ratio(fast, "paged", "contiguous"), 3),
        "paged_over_sdpa": round(med["paged"] / med["sdpa"], 3),
        "paged_over_paged_mlx": round(med["paged"] / med["paged_mlx"], 3),
        "kv_read_gbs": round(kv_bytes / med["paged"] / 1e9, 2),
        "max_abs_diff_vs_contiguous": float(f"{diff:.3g}"),
    }


def write_cost(batch: int, context: int, repeats: int = 20) -> dict:
    """reshape_and_cache of one decode step (one token per sequence) into a float32 pool the
    size of the attention benchmark's: with the caches rebound (MLX donates their memory, the
    kernel writes B rows) and with the old caches still referenced (the pool is copied)."""
    num_blocks = batch * context // 16
    kc = mx.zeros((num_blocks, 16, H_KV, D)) + 0  # + 0: real memory, not a broadcast zero
    vc = mx.zeros((num_blocks, 16, H_KV, D)) + 0
    rows = mx.ones((batch, H_KV, D))
    slots = mx.array(np.arange(batch, dtype=np.int32) * 16 * (num_blocks // batch))
    mx.eval(kc, vc, rows, slots)

    def rebound() -> float:
        nonlocal kc, vc
        t0 = time.perf_counter()
        kc, vc = reshape_and_cache(rows, rows, kc, vc, slots, stream=mx.cpu)
        mx.eval(kc, vc)
        return time.perf_counter() - t0

    def held() -> float:
        t0 = time.perf_counter()
        new_k, new_v = reshape_and_cache(rows, rows, kc, vc, slots, stream=mx.cpu)
        mx.eval(new_k, new_v)
        return time.perf_counter() - t0

    rebound(), held()
    donated = statistics.median(rebound() for _ in range(repeats))
    copied = statistics.median(held() for _ in range(max(3, repeats // 4)))
    return {
        "pool_mib_per_cache": round(kc.nbytes / 2**20, 1),
        "rebound_us": round(donated * 1e6, 1),
        "held_ms": round(copied * 1e3, 2),
    }


def block_size_study(batch: int, context: int, rounds: int, dtype: str, waste_by_bs) -> dict:
    """Kernel time for each block size (same values, re-laid out) and the workload's waste."""
    rng = np.random.default_rng(1)
    dt = DTYPES[dtype]
    shape = (batch, H_KV, context, D)
    k = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    q = mx.array(rng.standard_normal((batch, H_Q, D)).astype(np.float32)).astype(dt)
    lens = mx.full((batch,), context, dtype=mx.int32)
    fns, keep = {}, []
    for bs in BLOCK_SIZES:
        table = block_tables(batch, context, bs, seed=bs)
        k_pool, v_pool = paged_layout(k, table), paged_layout(v, table)
        kc, vc = mx.array(k_pool).astype(dt), mx.array(v_pool).astype(dt)
        tables = mx.array(table)
        mx.eval(kc, vc, tables)
        keep.append((kc, vc, tables))
        fns[bs] = lambda kc=kc, vc=vc, t=tables: paged_attention(
            q, kc, vc, t, lens, D**-0.5, stream=mx.cpu
        )
    times = timed_rounds(fns, rounds)
    return {
        bs: {"ms": round(statistics.median(times[bs]) * 1e3, 3), "waste": waste_by_bs[bs]}
        for bs in BLOCK_SIZES
    }


def workload_waste(requests: int, seed: int, max_len: int) -> tuple[float, float, dict]:
    reqs = make_workload(requests, seed, max_len=max_len)

    def lost(r: dict) -> float:
        return round(1 - r["held"] / r["allocated"], 4)

    contiguous = lost(waste.contiguous(reqs, lambda r: max_len))
    exact = lost(waste.contiguous(reqs, lambda r: r.total_len))
    return contiguous, exact, {bs: lost(waste.paged(reqs, bs, max_len)) for bs in BLOCK_SIZES}


def plot(study: dict, dtype: str, batch: int, context: int, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(study)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(sizes, [study[s]["ms"] for s in sizes], "o-")
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(sizes, [str(s) for s in sizes])
    ax1.set_xlabel("block size (tokens)")
    ax1.set_ylabel("ms per decode step")
    ax1.set_ylim(bottom=0)
    ax1.set_title(f"paged kernel, B={batch}, context {context}, {dtype}", fontsize=9)
    ax2.plot(sizes, [100 * study[s]["waste"] for s in sizes], "o-", color="C1")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(sizes, [str(s) for s in sizes])
    ax2.set_xlabel("block size (tokens)")
    ax2.set_ylabel("% of allocated slots never used")
    ax2.set_ylim(bottom=0)
    ax2.set_title("waste on the seeded workload (1000 requests)", fontsize=9)
    fig.suptitle(machine, fontsize=8)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)


# -- --device gpu: the CUDA kernel on an NVIDIA GPU ------------------------------------------------
GPU_HEADS = (32, 8, 128)  # H_q, H_kv, D: a Llama-3-8B-like layer
GPU_CONTEXTS = (1024, 4096, 16384)
GPU_BLOCK = 16
L2_FLUSH_BYTES = 256 * 2**20  # K/V copies per timing: at least this many bytes, > 5 x L2


def gpu_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        return out.splitlines()[0] if out else "unknown GPU"
    except (OSError, subprocess.SubprocessError):
        return "unknown GPU (no nvidia-smi)"


def gpu_seconds(make, calls: int, rounds: int, chain: bool = False) -> list[float]:
    """Seconds per call: `calls` calls (make(i) builds call i, lazily) evaluated together, the
    graph built before the clock starts; one figure per round. chain=True: make(i, prev) gets
    call i - 1's output (None for the first) and must use it, so the calls run one after
    another as a model's layers do. Unchained calls are independent, and MLX's CUDA graph may
    run them side by side: that measures throughput, and flatters a launch of few blocks."""

    def build():
        outs, prev = [], None
        for i in range(calls):
            prev = make(i, prev) if chain else make(i)
            outs.append(prev)
        return outs

    mx.eval(make(0, None) if chain else make(0))  # compiles the kernel on first use (NVRTC)
    out = []
    for _ in range(rounds):
        outs = build()
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(outs)
        out.append((time.perf_counter() - t0) / calls)
    return out


def gpu_bandwidth(rounds: int = 5) -> dict[str, float]:
    """Bytes/s of a sum over 1 GiB of float16 (read) and of a 1 GiB copy (read + write)."""
    x = mx.random.normal((2**29,), dtype=mx.float16)
    ys = [x + i for i in range(4)]  # 4 GiB: consecutive calls cannot hit the L2 cache
    mx.eval(ys)
    read = gpu_seconds(lambda i: mx.sum(ys[i % 4]), 8, rounds)
    copy = gpu_seconds(lambda i: ys[i % 4] * 1, 8, rounds)
    return {"sum_read": x.nbytes / min(read), "copy_read_write": 2 * x.nbytes / min(copy)}


def gpu_case(batch: int, context: int, copies: int, seed: int):
    """`copies` independent (q, contiguous K, V, pool K, V) sets of float16 data, same tables."""
    h_q, h_kv, d = GPU_HEADS
    mx.random.seed(seed)
    table = block_tables(batch, context, GPU_BLOCK, seed)
    order = mx.array(np.argsort(table.reshape(-1)).astype(np.int32))  # pool slot -> block
    per_seq = context // GPU_BLOCK
    sets = []
    for _ in range(copies):
        q = mx.random.normal((batch, h_q, d), dtype=mx.float16)
        k, v = (mx.random.normal((batch, h_kv, context, d), dtype=mx.float16) for _ in "kv")

        def pool(x):  # [B, H, S, D] -> blocks in table order -> [num_blocks, block, H, D]
            blocks = x.reshape(batch, h_kv, per_seq, GPU_BLOCK, d).transpose(0, 2, 3, 1, 4)
            return mx.contiguous(blocks.reshape(batch * per_seq, GPU_BLOCK, h_kv, d)[order])

        sets.append((q, k, v, pool(k), pool(v)))
        mx.eval(sets[-1])
    return sets, mx.array(table), mx.full((batch,), context, dtype=mx.int32)


def bench_gpu_context(batch: int, context: int, rounds: int, bandwidth: float) -> dict:
    from tiny_llm_ref.paged_attention_cuda import paged_attention_cuda

    h_q, h_kv, d = GPU_HEADS
    kv_bytes = 2 * batch * h_kv * context * d * 2
    copies = max(1, -(-L2_FLUSH_BYTES // kv_bytes))
    sets, tables, lens = gpu_case(batch, context, copies, seed=context)
    scale = d**-0.5

    # Each call's query is the previous call's output (same shape): the calls are a chain, as
    # a model's layers are, so their times add up (see gpu_seconds).
    def paged(i, prev, **kw):
        q, _, _, kc, vc = sets[i % copies]
        q = q if prev is None else prev
        if kw:
            return paged_attention_cuda(q, kc, vc, tables, lens, scale, **kw)
        return paged_attention(q, kc, vc, tables, lens, scale)  # the course's entry point

    def sdpa(i, prev):
        q, k, v, _, _ = sets[i % copies]
        q = q if prev is None else prev
        return mx.fast.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale)[:, :, 0]

    def gather(i, prev):
        q, _, _, kc, vc = sets[i % copies]
        q = q if prev is None else prev
        return paged_attention_mlx(q, kc, vc, tables, lens, scale)

    fns = {
        "paged": paged,
        "paged_one_pass": lambda i, prev: paged(i, prev, partitions=1),
        "sdpa": sdpa,
    }
    want = np.array(sdpa(0, None).astype(mx.float32))
    diff = max(
        float(np.abs(np.array(f(0, None).astype(mx.float32)) - want).max()) for f in fns.values()
    )
    calls = 16
    times = {name: [] for name in fns}
    for _ in range(rounds):  # interleaved: one batch of calls of each per round
        for name, fn in fns.items():
            times[name] += gpu_seconds(fn, calls, 1, chain=True)
    times["gather_mlx"] = gpu_seconds(gather, 4, 3, chain=True)
    unchained = {  # the same calls, independent: throughput (see gpu_seconds)
        name: round(statistics.median(gpu_seconds(lambda i, f=fn: f(i, None), calls, 3)) * 1e6, 1)
        for name, fn in fns.items()
    }
    med = {name: statistics.median(t) for name, t in times.items()}
    sweep = {}
    for parts in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        t = gpu_seconds(lambda i, prev, p=parts: paged(i, prev, partitions=p), calls, 3, True)
        sweep[parts] = round(statistics.median(t) * 1e6, 1)
    from tiny_llm_ref.paged_attention_cuda import choose_kv_heads, choose_partitions

    return {
        "us": {name: round(t * 1e6, 1) for name, t in med.items()},
        "unchained_us": unchained,
        "paged_over_sdpa": round(ratio(times, "paged", "sdpa"), 3),
        "one_pass_over_sdpa": round(ratio(times, "paged_one_pass", "sdpa"), 3),
        "kv_read_gbs": round(kv_bytes / med["paged"] / 1e9, 1),
        "sdpa_kv_read_gbs": round(kv_bytes / med["sdpa"] / 1e9, 1),
        "read_bandwidth_fraction": round(kv_bytes / med["paged"] / bandwidth, 3),
        "sdpa_bandwidth_fraction": round(kv_bytes / med["sdpa"] / bandwidth, 3),
        "partitions": choose_partitions(
            batch * (h_kv // choose_kv_heads(batch, h_kv, 1, d, 2)), context
        ),
        "partition_sweep_us": sweep,
        "kv_copies": copies,
        "max_abs_diff_vs_sdpa": float(f"{diff:.3g}"),
    }


def main_gpu(batch: int, rounds: int) -> None:
    from tiny_llm_ref.paged_attention_cuda import runs_on_cuda

    if not runs_on_cuda():
        raise SystemExit(
            f"--device gpu needs MLX with CUDA on an NVIDIA GPU (this is MLX {mx.__version__}, "
            f"default device {mx.default_device()}): pdm install -G cuda --lockfile pdm.cuda.lock"
        )
    from tiny_llm_common.machine import describe_machine

    t0 = time.perf_counter()
    h_q, h_kv, d = GPU_HEADS
    machine = f"{gpu_name()}; {describe_machine()}; MLX {mx.__version__} CUDA"
    print(
        f"decode attention on the GPU: B={batch}, H_q={h_q}, H_kv={h_kv}, D={d}, float16, "
        f"block {GPU_BLOCK}; {machine}"
    )
    bw = gpu_bandwidth()
    tiny = [mx.ones((4,)) + i for i in range(4)]
    mx.eval(tiny)
    overhead = statistics.median(
        gpu_seconds(lambda i, prev: (tiny[i % 4] if prev is None else prev) * 2, 16, 7, True)
    )
    by_context = {}
    for context in GPU_CONTEXTS:
        by_context[context] = bench_gpu_context(batch, context, rounds, max(bw.values()))
    after = gpu_bandwidth()
    bw = {k: max(v, after[k]) for k, v in bw.items()}  # the better of before and after
    bandwidth = max(bw.values())
    for r in by_context.values():
        r["read_bandwidth_fraction"] = round(r["kv_read_gbs"] * 1e9 / bandwidth, 3)
        r["sdpa_bandwidth_fraction"] = round(r["sdpa_kv_read_gbs"] * 1e9 / bandwidth, 3)

    print(
        f"\nbandwidth: sum {bw['sum_read'] / 1e9:.0f} GB/s (read), copy "
        f"{bw['copy_read_write'] / 1e9:.0f} GB/s (read + write); held to {bandwidth / 1e9:.0f}; "
        f"one tiny MLX op costs {overhead * 1e6:.1f} us per call in the same timing\n"
    )
    print(
        "| context | paged (split-K) | one pass | MLX SDPA | gather + MLX | paged / SDPA "
        "| K/V read | of bandwidth | SDPA's |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for context, r in by_context.items():
        us = r["us"]
        print(
            f"| {context} | {us['paged']:.0f} us | {us['paged_one_pass']:.0f} us "
            f"| {us['sdpa']:.0f} us | {us['gather_mlx']:.0f} us | {r['paged_over_sdpa']:.2f} "
            f"| {r['kv_read_gbs']:.0f} GB/s | {r['read_bandwidth_fraction']:.0%} "
            f"| {r['sdpa_bandwidth_fraction']:.0%} |"
        )
    print(
        "\nthe same calls independent (not chained; MLX may overlap them): "
        + "; ".join(
            f"{c}: paged {r['unchained_us']['paged']:.0f} us, one pass "
            f"{r['unchained_us']['paged_one_pass']:.0f} us, SDPA {r['unchained_us']['sdpa']:.0f} us"
            for c, r in by_context.items()
        )
    )
    print("\nsplit-K: microseconds per call by partitions (the default's in brackets)")
    for context, r in by_context.items():
        row = ", ".join(
            f"[{p}: {t}]" if p == r["partitions"] else f"{p}: {t}"
            for p, t in r["partition_sweep_us"].items()
        )
        print(f"  context {context}: {row}")
    print(f"({time.perf_counter() - t0:.1f} s)")
    head = by_context[4096] if 4096 in by_context else next(iter(by_context.values()))
    print(
        json.dumps(
            {
                "bench": "paged",
                "device": "gpu",
                "machine": machine,
                "batch": batch,
                "heads": list(GPU_HEADS),
                "dtype": "float16",
                "block_size": GPU_BLOCK,
                "paged_over_sdpa": {str(c): r["paged_over_sdpa"] for c, r in by_context.items()},
                "read_bandwidth_fraction": head["read_bandwidth_fraction"],
                "read_bandwidth_fraction_context": 4096,
                "read_bandwidth_gbs": round(bandwidth / 1e9, 1),
                "bandwidth_gbs": {k: round(v / 1e9, 1) for k, v in bw.items()},
                "tiny_op_us": round(overhead * 1e6, 1),
                "by_context": {str(c): r for c, r in by_context.items()},
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()
    if args.device == "gpu":
        main_gpu(args.batch, args.rounds)
        return
    if args.context % max(BLOCK_SIZES):
        ap.error(f"--context must be a multiple of {max(BLOCK_SIZES)}")

    t0 = time.perf_counter()
    machine = f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()}, MLX {mx.__version__} CPU"
    print(
        f"decode attention: B={args.batch}, context {args.context}, H_q={H_Q}, H_kv={H_KV}, "
        f"D={D}, block 16; {machine}; TINY_LLM_NUM_THREADS="
        f"{os.environ.get('TINY_LLM_NUM_THREADS', '(all)')}"
    )
    bandwidth = read_bandwidth()
    by_dtype = {}
    for dtype in DTYPES:
        r = bench_dtype(dtype, args.batch, args.context, 16, args.rounds)
        r["read_bandwidth_fraction"] = round(r["kv_read_gbs"] * 1e9 / bandwidth, 3)
        by_dtype[dtype] = r
    bandwidth = max(bandwidth, read_bandwidth())  # again, after: the better of the two
    for r in by_dtype.values():
        r["read_bandwidth_fraction"] = round(r["kv_read_gbs"] * 1e9 / bandwidth, 3)

    print(f"\nread bandwidth (NumPy sum, best of 1 and 2 threads): {bandwidth / 1e9:.1f} GB/s\n")
    print(
        "| dtype | paged kernel | contiguous kernel | MLX SDPA | gather + MLX | paged / contiguous "
        "| paged / SDPA | K/V read | of read bandwidth |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dtype, r in by_dtype.items():
        ms = r["ms"]
        print(
            f"| {dtype} | {ms['paged']:.2f} ms | {ms['contiguous']:.2f} ms | {ms['sdpa']:.1f} ms "
            f"| {ms['paged_mlx']:.1f} ms | {r['paged_over_contiguous']:.2f} "
            f"| {r['paged_over_sdpa']:.3f} | {r['kv_read_gbs']:.1f} GB/s "
            f"| {r['read_bandwidth_fraction']:.0%} |"
        )

    write = write_cost(args.batch, args.context)
    print(
        f"\nreshape_and_cache, {args.batch} tokens into a {write['pool_mib_per_cache']} MiB "
        f"float32 pool (per cache): {write['rebound_us']:.0f} us with the caches rebound "
        f"(written in place), {write['held_ms']:.1f} ms with the old caches still held (copied)"
    )

    contiguous_waste, exact_waste, waste_by_bs = workload_waste(args.requests, 0, 2048)
    study = block_size_study(args.batch, args.context, args.rounds, "float32", waste_by_bs)
    print(
        f"\nwaste on make_workload({args.requests}, seed=0, max_len=2048): contiguous max-length "
        f"buffers {contiguous_waste:.1%}, contiguous exact-size {exact_waste:.1%}"
    )
    print("\n| block size | kernel (float32) | slots never used |")
    print("|---:|---:|---:|")
    for bs, row in study.items():
        print(f"| {bs} | {row['ms']:.2f} ms | {row['waste']:.1%} |")
    if not args.no_plot:
        plot(study, "float32", args.batch, args.context, machine)
        print(f"\nplot: {PLOT.relative_to(ROOT)}")
    print(f"({time.perf_counter() - t0:.1f} s)")

    head = by_dtype["float32"]
    print(
        json.dumps(
            {
                "bench": "paged",
                "machine": machine,
                "batch": args.batch,
                "context": args.context,
                "heads": [H_Q, H_KV, D],
                "headline_dtype": "float32",
                "paged_over_contiguous": head["paged_over_contiguous"],
                "paged_over_sdpa": head["paged_over_sdpa"],
                "read_bandwidth_fraction": head["read_bandwidth_fraction"],
                "read_bandwidth_gbs": round(bandwidth / 1e9, 2),
                "paged_waste_block16": waste_by_bs[16],
                "contiguous_waste": contiguous_waste,
                "contiguous_exact_waste": exact_waste,
                "by_dtype": by_dtype,
                "write": write,
                "block_sizes": study,
            }
        )
    )


if __name__ == "__main__":
    main()
