"""Why the paged cache does its bookkeeping once per step: decode speed of the reference with
the contiguous cache, the paged cache, and two paged variants that do work in every layer.

All four decode the same prompt greedily with the same pipelined loop (the next step is queued
with mx.async_eval before the current token is read, as `generate_with_cache` does):
- contiguous: Week 2's KVCache, one per layer;
- paged: PagedKVCache (Week 3 Day 3): `begin_step` computes blocks, slot mapping, block tables
  and context lengths once on the host; the layers only add device work to the graph;
- paged, tables per layer: the same, but every layer rebuilds the step's block table, slot
  mapping and context lengths from the block manager (what a cache without a step does);
- paged, host read per layer: every layer reads an array of this step back to the host
  (`.tolist()` of its new keys), as a per-layer check would; each read waits for the device
  to finish everything queued so far, so the pipeline stalls once per layer.
Decode time per token excludes the prefill; the modes alternate for --rounds rounds and each
figure is the median. Next to it, the CPU time Python spends building one decode step (the
bookkeeping plus the model's lazy graph), measured with this thread's CPU clock so that other
jobs on a shared machine do not inflate it. The host time of one `begin_step` is measured on its own. The paged modes
call whatever `paged_attention.py` provides (the kernels once Day 2 is done); `--mlx` swaps in
the pure-MLX `paged_attention_mlx` / `reshape_and_cache_mlx` instead.

Ends with one JSON line of the figures.
`--model random` decodes a random Llama with SmolLM2's 30 layers and head dim 64 but hidden
size 128 (2 query heads, 1 KV head) instead: a step that takes a few milliseconds on a CPU, so
that fixed per-step costs show as they would next to a fast device's short steps.

Run: python benches/bench_paged_step.py [--model smollm2|random] [--max-tokens 32] [--rounds 3]
     [--mlx]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import mlx.core as mx

from tiny_llm_common.checkpoints import random_checkpoint
from tiny_llm_common.models import load_model
from tiny_llm_ref import paged_attention as pa
from tiny_llm_ref.kv_cache import make_cache
from tiny_llm_ref.model import Model
from tiny_llm_ref.paged_kv_cache import PagedKVCache, PagedLayerCache

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


class TablesPerLayer(PagedLayerCache):
    def attend(self, q, k, v, scale):
        step, mgr = self.pool.step, self.pool.manager
        step.block_tables = mgr.block_table_array(step.seq_ids)
        slots = []
        for s, n in zip(step.seq_ids, step.num_new, strict=True):
            end = mgr.seq_len(s)
            slots += mgr.slot_mapping(s, range(end - n, end)) + [-1] * (step.length - n)
        step.slot_mapping = mx.array(slots, dtype=mx.int32)
        step.context_lens = mx.array([mgr.seq_len(s) for s in step.seq_ids], dtype=mx.int32)
        return super().attend(q, k, v, scale)


class HostReadPerLayer(PagedLayerCache):
    def attend(self, q, k, v, scale):
        k.tolist()  # any per-layer host read of this step's data: waits for the device
        return super().attend(q, k, v, scale)


def make_modes(model, num_blocks: int, block_size: int):
    def contiguous():
        cache = make_cache(model)
        return lambda n: cache

    def paged(layer_cls=None):
        def factory():
            cache = PagedKVCache(model, num_blocks, block_size)
            n_layers = len(cache.layers())
            layers = (
                cache.layers()
                if layer_cls is None
                else [layer_cls(cache, i) for i in range(n_layers)]
            )

            def prepare(n):
                cache.begin_step(["s"], [n])
                return layers

            return prepare

        return factory

    return {
        "contiguous": contiguous,
        "paged": paged(),
        "paged, tables per layer": paged(TablesPerLayer),
        "paged, host read per layer": paged(HostReadPerLayer),
    }


def decode(model, factory, prompt: list[int], n: int) -> tuple[float, float]:
    """(wall seconds per decoded token, median CPU seconds of Python per step spent building
    the step: bookkeeping plus the model's graph, up to mx.async_eval). The second figure is
    this thread's CPU time, so other processes on the machine do not inflate it."""
    prepare = factory()
    logits = model(mx.array([prompt], dtype=mx.int32), prepare(len(prompt)))
    token = mx.argmax(logits[:, -1], axis=-1)
    mx.async_eval(token)
    start, build = None, []
    for i in range(n):
        if i < n - 1:  # queue the next step before reading this token
            t0 = time.thread_time()
            nxt = mx.argmax(model(token[:, None], prepare(1))[:, -1], axis=-1)
            build.append(time.thread_time() - t0)
            mx.async_eval(nxt)
        token.item()
        if i == 0:
            start = time.perf_counter()
        if i < n - 1:
            token = nxt
    return (time.perf_counter() - start) / (n - 1), statistics.median(build)


def begin_step_us(model, prompt_len: int, block_size: int, reps: int = 200) -> float:
    """Median CPU microseconds of one decode step's `begin_step` (this thread's clock)."""
    cache = PagedKVCache(model, -(-(prompt_len + reps) // block_size), block_size)
    cache.begin_step(["s"], [prompt_len])
    times = []
    for _ in range(reps):
        start = time.thread_time()
        cache.begin_step(["s"], [1])
        times.append(time.thread_time() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--mlx", action="store_true", help="pure-MLX paged attention and writes")
    args = p.parse_args()
    if args.mlx:
        pa.paged_attention, pa.reshape_and_cache = pa.paged_attention_mlx, pa.reshape_and_cache_mlx
    kind = "pure MLX" if pa.paged_attention is pa.paged_attention_mlx else "kernel"
    if args.model == "random":
        model_args, weights = random_checkpoint(
            "llama",
            seed=4,
            num_hidden_layers=30,
            hidden_size=128,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=64,
            vocab_size=512,
        )
        prompt = list(range(3, 19))  # 16 tokens, as SmolLM2's prompt
    else:
        loaded = load_model(args.model, verbose=False)
        model_args, weights = loaded.args, loaded.weights
        prompt = loaded.tokenizer.encode(PROMPT)
    model = Model(model_args, weights)
    num_blocks = -(-(len(prompt) + args.max_tokens) // args.block_size)
    modes = make_modes(model, num_blocks, args.block_size)
    decode(model, modes["paged"], prompt, 4)  # warm up
    times: dict[str, list[float]] = {name: [] for name in modes}
    builds: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, factory in modes.items():
            wall, build = decode(model, factory, prompt, args.max_tokens)
            times[name].append(wall)
            builds[name].append(build)
    host_us = begin_step_us(model, len(prompt), args.block_size)
    layers = model_args.num_hidden_layers
    print(
        f"{args.model}: {layers} layers, prompt {len(prompt)} tokens, {args.max_tokens} decoded, "
        f"block size {args.block_size}, {kind} paged attention; "
        f"MLX {mx.__version__} on {mx.default_device()}, {platform.system()}"
    )
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    host = {name: statistics.median(t) * 1e6 for name, t in builds.items()}
    print(f"  {'':<28} {'decode':>13} {'':>14} {'Python CPU to build a step':>28}")
    for name, value in ms.items():
        print(
            f"  {name:<28} {value:7.2f} ms/token ({value / ms['paged']:.2f}x paged) "
            f"{host[name]:8.0f} us ({host[name] / host['paged']:.2f}x paged)"
        )
    print(
        f"  begin_step on the host: {host_us:.0f} us per step ({layers}x that: {layers * host_us:.0f} us)"
    )
    print(
        json.dumps(
            {
                "bench": "paged_step",
                "model": args.model,
                "layers": layers,
                "ms_per_token": {k: round(v, 2) for k, v in ms.items()},
                "build_us_per_step": {k: round(v, 1) for k, v in host.items()},
                "begin_step_us": round(host_us, 1),
                "paged_attention": kind,
            }
        )
    )


if __name__ == "__main__":
    main()
