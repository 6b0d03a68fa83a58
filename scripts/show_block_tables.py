"""Print the block tables of live requests after every step of a real paged decode.

SmolLM2 (the course's default model) runs greedy decoding through the reference PagedKVCache
with a deliberately small pool (8 blocks of 4 tokens). Request A starts alone; B joins at step 3
(its prompt is prefilled in the same forward pass as A's decode step); A stops after 8 tokens
and its blocks go back to the end of the free list; C joins at step 9; later B and C grow into
A's old blocks. After each step, one line: the tokens each request fed, a map of the pool (one
character per block: the request holding it, or '.' when free) and each live request's block
table with its length.

Run: python scripts/show_block_tables.py [--model smollm2] [--steps 18]
(the picture in book/src/week3-03-paged-model.md comes from this script).
"""

from __future__ import annotations

import argparse

import mlx.core as mx

from tiny_llm_common.models import load_model
from tiny_llm_ref.model import Model
from tiny_llm_ref.paged_kv_cache import PagedKVCache

REQUESTS = {  # name: (step it arrives, prompt, tokens to generate)
    "A": (0, "The three primary colours are", 8),
    "B": (3, "Paris is", 99),
    "C": (9, "Once upon a time", 99),
}


def pool_map(cache: PagedKVCache, live: dict) -> str:
    cells = ["."] * cache.num_blocks
    for name in live:
        for block in cache.block_table(name):
            cells[block] = name
    return "".join(cells)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--block-size", type=int, default=4)
    args = p.parse_args()
    loaded = load_model(args.model, verbose=False)
    tok = loaded.tokenizer
    model = Model(loaded.args, loaded.weights)
    cache = PagedKVCache(model, num_blocks=args.blocks, block_size=args.block_size)
    live: dict[str, dict] = {}  # name -> {"pending": tokens to feed, "out": generated}
    done: dict[str, list[int]] = {}
    a = loaded.args
    print(
        f"pool: {cache.num_blocks} blocks of {cache.block_size} tokens; greedy {args.model}; "
        f"one block id = {cache.bytes_per_block} bytes (keys and values, {a.num_hidden_layers} "
        f"layers x {a.num_key_value_heads} KV heads x head dim {a.head_dim}, {cache.dtype})"
    )
    print(f"step  {'fed':<12} {'pool':<{cache.num_blocks}}  block tables (tokens stored)")
    for step in range(args.steps):
        for name, (arrives, prompt, _) in REQUESTS.items():
            if arrives == step:
                live[name] = {"pending": tok.encode(prompt), "out": []}
        names = list(live)
        rows = [live[n]["pending"] for n in names]
        ran = " ".join(f"{n}+{len(r)}" for n, r in zip(names, rows, strict=True))
        cache.begin_step(names, [len(r) for r in rows])
        width = max(map(len, rows))
        tokens = mx.array([r + [0] * (width - len(r)) for r in rows], dtype=mx.int32)
        logits = model(tokens, cache.layers())
        nxt = mx.argmax(mx.stack([logits[b, len(r) - 1] for b, r in enumerate(rows)]), -1)
        tables = "  ".join(
            f"{n}[{' '.join(map(str, cache.block_table(n)))}]({cache.seq_len(n)})" for n in names
        )
        print(f"{step:4d}  {ran:<12} {pool_map(cache, live)}  {tables}")
        for b, name in enumerate(names):
            t = int(nxt[b].item())
            live[name]["out"].append(t)
            live[name]["pending"] = [t]
            if len(live[name]["out"]) == REQUESTS[name][2]:
                done[name] = live.pop(name)["out"]
                cache.free(name)
                print(f"{'':18}{pool_map(cache, live)}  {name} finished and freed")
    print()
    for name, (_, prompt, _) in REQUESTS.items():
        out = done.get(name) or live.get(name, {}).get("out", [])
        print(f"{name}: {prompt!r} -> {tok.decode(out)!r}")


if __name__ == "__main__":
    main()
