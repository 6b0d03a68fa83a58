"""How much KV-cache memory holds tokens: max-length contiguous buffers versus paged blocks.

Every request of a seeded long-tailed workload (tiny_llm_common.workload) is followed through its
life: after its prompt is stored and after each generated token, we count the KV slots that
hold a token against the slots allocated to it by each scheme:

- contiguous, max length: one buffer of `max_len` slots reserved at admission (what a static
  batcher must do when it cannot know the answer's length);
- contiguous, exact size: one buffer of prompt + output slots, as if the output length were
  known in advance (the best a contiguous allocator can do);
- paged: the reference BlockManager, growing the sequence one block at a time.

Summed over all those moments, slots-holding-a-token / slots-allocated is the utilisation (a
time average: a slot held for twice as long counts twice). Waste splits into slots reserved for
tokens the request has not produced yet and slots that never hold a token (internal
fragmentation). External fragmentation (free memory too scattered for a new contiguous buffer)
comes on top for the contiguous schemes and is not simulated; paging has none.

Run: pdm run bench-block-waste [--requests N] [--seed S] [--max-len L]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

from tiny_llm_common.workload import make_workload
from tiny_llm_ref.block_manager import BlockManager

BLOCK_SIZES = (8, 16, 32, 64, 128)


def contiguous(requests, reserve) -> dict:
    """Utilisation when each request holds `reserve(request)` slots for its whole life."""
    held = reserved = allocated = 0
    for r in requests:
        lengths = range(r.prompt_len, r.total_len + 1)  # after the prompt, after each token
        slots = reserve(r)
        held += sum(lengths)
        reserved += sum(r.total_len - n for n in lengths)
        allocated += slots * len(lengths)
    return {"held": held, "reserved": reserved, "allocated": allocated, "entries": len(requests)}


def allocated_now(mgr: BlockManager) -> int:
    return mgr.num_used_blocks * mgr.block_size


def paged(requests, block_size: int, max_len: int) -> dict:
    """The same measurement with the reference BlockManager handing out blocks on demand."""
    mgr = BlockManager(num_blocks=-(-max_len // block_size), block_size=block_size)
    held = allocated = entries = 0
    for i, r in enumerate(requests):
        mgr.allocate(i, r.prompt_len)
        held += r.prompt_len
        allocated += allocated_now(mgr)
        for n in range(r.prompt_len + 1, r.total_len + 1):
            mgr.append(i)
            held += n
            allocated += allocated_now(mgr)
        u = mgr.usage()
        assert u.stored_tokens == r.total_len and u.allocated_slots == allocated_now(mgr), u
        entries += len(mgr.block_table(i))
        mgr.free(i)
    assert mgr.num_free_blocks == mgr.num_blocks
    return {"held": held, "reserved": 0, "allocated": allocated, "entries": entries}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-len", type=int, default=2048)
    args = ap.parse_args()

    t0 = time.perf_counter()
    reqs = make_workload(args.requests, args.seed, max_len=args.max_len)
    n = len(reqs)
    mean_prompt = sum(r.prompt_len for r in reqs) / n
    mean_output = sum(r.output_len for r in reqs) / n
    print(
        f"workload: {n} requests, seed {args.seed}, max_len {args.max_len}; mean prompt "
        f"{mean_prompt:.1f}, mean output {mean_output:.1f}, longest "
        f"{max(r.total_len for r in reqs)} tokens ({platform.machine()}, {platform.system()})"
    )
    rows = {
        "contiguous, max length": contiguous(reqs, lambda r: args.max_len),
        "contiguous, exact size": contiguous(reqs, lambda r: r.total_len),
    }
    for bs in BLOCK_SIZES:
        rows[f"paged, block {bs}"] = paged(reqs, bs, args.max_len)

    print(
        "\n| scheme | tokens held | reserved for later tokens | never used "
        "| slots per token held | table entries at finish |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    results = {}
    for name, r in rows.items():
        util = r["held"] / r["allocated"]
        reserved = r["reserved"] / r["allocated"]
        never = 1.0 - util - reserved
        results[name] = {
            "utilization": round(util, 4),
            "reserved": round(reserved, 4),
            "internal_fragmentation": round(never, 4),
            "table_entries": round(r["entries"] / n, 1),
        }
        print(
            f"| {name} | {util:.1%} | {reserved:.1%} | {never:.1%} | "
            f"{r['allocated'] / r['held']:.2f} | {r['entries'] / n:.1f} |"
        )
    print(f"\n({time.perf_counter() - t0:.1f} s)")
    print(
        json.dumps(
            {
                "bench": "block_waste",
                "requests": n,
                "seed": args.seed,
                "max_len": args.max_len,
                "mean_prompt": round(mean_prompt, 1),
                "mean_output": round(mean_output, 1),
                "schemes": results,
            }
        )
    )


if __name__ == "__main__":
    main()
