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
figure is the median. The host time of one `begin_step` is measured on its own.

Ends with one JSON line of the figures.
Run: python benches/bench_paged_step.py [--model smollm2] [--max-tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import mlx.core as mx

from tiny_llm_common.models import load_model
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


def decode_seconds_per_token(model, factory, prompt: list[int], n: int) -> float:
    prepare = factory()
    logits = model(mx.array([prompt], dtype=mx.int32), prepare(len(prompt)))
    token = mx.argmax(logits[:, -1], axis=-1)
    mx.async_eval(token)
    start = None
    for i in range(n):
        if i < n - 1:  # queue the next step before reading this token
            nxt = mx.argmax(model(token[:, None], prepare(1))[:, -1], axis=-1)
            mx.async_eval(nxt)
        token.item()
        if i == 0:
            start = time.perf_counter()
        if i < n - 1:
            token = nxt
    return (time.perf_counter() - start) / (n - 1)


def begin_step_us(model, prompt_len: int, block_size: int, reps: int = 200) -> float:
    cache = PagedKVCache(model, -(-(prompt_len + reps) // block_size), block_size)
    cache.begin_step(["s"], [prompt_len])
    start = time.perf_counter()
    for _ in range(reps):
        cache.begin_step(["s"], [1])
    return (time.perf_counter() - start) / reps * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--block-size", type=int, default=16)
    args = p.parse_args()
    loaded = load_model(args.model, verbose=False)
    model = Model(loaded.args, loaded.weights)
    prompt = loaded.tokenizer.encode(PROMPT)
    num_blocks = -(-(len(prompt) + args.max_tokens) // args.block_size)
    modes = make_modes(model, num_blocks, args.block_size)
    decode_seconds_per_token(model, modes["paged"], prompt, 4)  # warm up
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, factory in modes.items():
            times[name].append(decode_seconds_per_token(model, factory, prompt, args.max_tokens))
    host_us = begin_step_us(model, len(prompt), args.block_size)
    layers = loaded.args.num_hidden_layers
    print(
        f"{args.model}: {layers} layers, prompt {len(prompt)} tokens, {args.max_tokens} decoded, "
        f"block size {args.block_size}; MLX {mx.__version__} on {mx.default_device()}, "
        f"{platform.system()}"
    )
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    for name, value in ms.items():
        print(f"  {name:<28} {value:7.2f} ms/token  ({value / ms['paged']:.2f}x paged)")
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
                "begin_step_us": round(host_us, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
