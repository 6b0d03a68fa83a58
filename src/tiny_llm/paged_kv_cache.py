"""Week 3 Day 3: a paged KV cache that plugs into the model in place of the contiguous one.

One pool of `num_blocks` blocks serves every sequence and every layer: a block id names the
same block in each layer's key and value caches ([num_blocks, block_size, H_kv, D] each), and
one BlockManager (Day 1) hands blocks out. A forward pass is one *step*:

    cache.begin_step(seq_ids, num_new_tokens)   # host: blocks, slots, tables -- once per step
    logits = model(tokens, cache.layers())      # every layer: write K/V, attend through tables

`begin_step` does all the bookkeeping on the host, once, and turns it into a few small arrays
that every layer reuses; a layer's `attend` only adds device work to the graph (it never reads
an array on the host, which would wait for the device in each of the model's layers).

Tokens are laid out [B, L]: sequence b's `num_new_tokens[b]` new tokens come first in its row,
padding (never stored, never attended to) after them. L == 1 is a decode step: the paged
attention kernel. L > 1 (a prompt, a chunk of one, or a mixed batch) gathers the sequences'
blocks and runs grouped attention with a mask that is causal and hides other rows' padding.

Chapter: book/src/week3-03-paged-model.md.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import paged_attention as pa
from .attention import scaled_dot_product_attention_grouped  # noqa: F401
from .block_manager import BlockManager, BlockUsage, OutOfBlocksError


@dataclass
class PagedStep:
    """Everything the layers need for one forward pass, computed once by `begin_step`."""

    seq_ids: list  # the batch's sequences, in row order
    num_new: list[int]  # new tokens of each row (the rest of the row is padding)
    offsets: list[int]  # tokens each sequence had stored before this step
    length: int  # L: columns of the token array, max(num_new)
    slot_mapping: mx.array  # [B * L] int32: slot of each (row, column) token, -1 for padding
    block_tables: mx.array  # [B, max_blocks] int32, padded with -1
    context_lens: mx.array  # [B] int32: tokens stored after this step
    offset: int | mx.array  # the RoPE offset: an int for one sequence, else [B] int32
    mask: mx.array | None  # [B, 1, L, S] additive (pool dtype) when L > 1, else None
    attended: list[bool]  # per layer: has it stored this step's keys yet?


class PagedKVCache:
    """A block pool for all layers of one model, and the block tables of its sequences.

    `manager` is the pool's BlockManager (Day 1; pass one in to use a subclass, such as Day 6's
    prefix-caching manager); a scheduler may fork sequences through it (their shared blocks are
    copied on write by `begin_step`). `keys[layer]`, `values[layer]`
    are the layers' caches, [num_blocks, block_size, H_kv, D].
    """

    def __init__(
        self, model_or_args, num_blocks: int, block_size: int = 16, dtype=mx.float32, manager=None
    ):
        args = getattr(model_or_args, "args", model_or_args)
        try:
            layers, h_kv, d = args.num_hidden_layers, args.num_key_value_heads, args.head_dim
        except AttributeError:
            raise TypeError(
                f"PagedKVCache needs a Model or ModelArgs, got {type(model_or_args).__name__}"
            ) from None
        if dtype not in pa.FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        if manager is None:
            manager = BlockManager(num_blocks, block_size)  # checks the two counts
        elif (manager.num_blocks, manager.block_size) != (num_blocks, block_size):
            raise ValueError(
                f"manager has {manager.num_blocks} blocks of {manager.block_size}, "
                f"the pool {num_blocks} of {block_size}"
            )
        self.manager = manager  # a subclass may add policies (Day 6: prefix caching)
        self.max_positions = getattr(args, "max_position_embeddings", None)
        self.dtype = dtype
        shape = (num_blocks, block_size, h_kv, d)
        self.keys = [mx.zeros(shape, dtype=dtype) for _ in range(layers)]
        self.values = [mx.zeros(shape, dtype=dtype) for _ in range(layers)]
        self._layers = [PagedLayerCache(self, i) for i in range(layers)]
        self.step: PagedStep | None = None

    # -- the pool and its sequences (provided) --------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.manager.num_blocks

    @property
    def block_size(self) -> int:
        return self.manager.block_size

    @property
    def num_free_blocks(self) -> int:
        return self.manager.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.manager.num_used_blocks

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block id stands for: its keys and values in every layer."""
        return 2 * sum(k.nbytes for k in self.keys) // self.num_blocks

    @property
    def nbytes(self) -> int:
        """Bytes of the whole pool, used or not."""
        return self.bytes_per_block * self.num_blocks

    def usage(self) -> BlockUsage:
        return self.manager.usage()

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self.manager

    def seq_len(self, seq_id: Hashable) -> int:
        return self.manager.seq_len(seq_id)

    def block_table(self, seq_id: Hashable) -> list[int]:
        return self.manager.block_table(seq_id)

    def layers(self) -> list[PagedLayerCache]:
        """One cache object per layer: what `model(tokens, cache)` takes."""
        return list(self._layers)

    def free(self, seq_id: Hashable) -> None:
        """Forget a finished sequence: its blocks go back to the pool at once."""
        self.manager.free(seq_id)
        if self.step is not None and seq_id in self.step.seq_ids:
            self.step = None  # the prepared step names a sequence that is gone

    def _check_step(self, seq_ids: Sequence[Hashable], num_new_tokens: Sequence[int]):
        seq_ids, num_new = list(seq_ids), list(num_new_tokens)
        if not seq_ids or len(seq_ids) != len(num_new):
            raise ValueError(
                f"need one token count per sequence, got {len(seq_ids)} ids and {len(num_new)} counts"
            )
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"a sequence appears twice in {seq_ids}")
        for s, n in zip(seq_ids, num_new, strict=True):
            if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
                raise ValueError(f"sequence {s!r}: num_new_tokens must be an int >= 1, got {n!r}")
            end = (self.seq_len(s) if s in self else 0) + n
            if self.max_positions is not None and end > self.max_positions:
                raise ValueError(
                    f"sequence {s!r} would reach {end} tokens, past max_position_embeddings "
                    f"({self.max_positions})"
                )
        return seq_ids, [int(n) for n in num_new]

    def blocks_for_step(self, seq_ids: Sequence[Hashable], num_new_tokens: Sequence[int]) -> int:
        """Free blocks `begin_step(seq_ids, num_new_tokens)` would take (copy-on-write included)."""
        seq_ids, num_new = self._check_step(seq_ids, num_new_tokens)
        mgr, need, writers = self.manager, 0, {}
        for s, n in zip(seq_ids, num_new, strict=True):
            if s not in mgr:
                need += mgr.blocks_needed(n)
                continue
            length, table = mgr.seq_len(s), mgr.block_table(s)
            need += mgr.blocks_needed(length + n) - len(table)
            if length % self.block_size:  # writes into its partly filled last block
                writers[table[-1]] = writers.get(table[-1], 0) + 1
        # Copy-on-write: of the k holders of a shared partial block that write into it now,
        # each takes a copy until one holder is left, which writes in place.
        for block, k in writers.items():
            need += min(k, mgr.ref_count(block) - 1)
        return need

    def can_begin_step(self, seq_ids: Sequence[Hashable], num_new_tokens: Sequence[int]) -> bool:
        return self.blocks_for_step(seq_ids, num_new_tokens) <= self.num_free_blocks

    # -- task 1: one step's bookkeeping, for all layers at once ---------------------------------
    def begin_step(self, seq_ids: Sequence[Hashable], num_new_tokens: Sequence[int]) -> PagedStep:
        """Make room for `num_new_tokens[b]` more tokens of each sequence (new ids start a
        sequence) and prepare the arrays every layer of the next forward pass uses.

        Raises OutOfBlocksError, with the cache unchanged, when the pool is too small.
        """
        seq_ids, num_new = self._check_step(seq_ids, num_new_tokens)
        need = self.blocks_for_step(seq_ids, num_new)
        if need > self.num_free_blocks:
            raise OutOfBlocksError(
                f"this step needs {need} blocks, {self.num_free_blocks} of {self.num_blocks} free"
            )
        # TODO(Week 3 Day 3, task 1): everything below happens on the host, once per step.
        # 1. offsets[b] = tokens sequence b had before (self.manager.seq_len, 0 for a new id).
        # 2. Grow each sequence: manager.append(s, n) for a known id, manager.allocate(s, n)
        #    for a new one. append returns copy-on-write pairs (src, dst): copy block src to
        #    dst in every layer's keys and values (cache[dst_ids] = cache[src_ids]).
        # 3. length = max(num_new). slot_mapping: for each row, manager.slot_mapping of its new
        #    positions offsets[b] .. offsets[b] + n - 1, then -1 for its L - n padding columns;
        #    one flat int32 array of B * L slots (row-major, as k.reshape(B * L, ...) orders
        #    the tokens).
        # 4. block_tables = manager.block_table_array(seq_ids); context_lens = offsets + num_new.
        # 5. When length > 1, the mask [B, 1, L, S] (S = max_blocks * block_size) in self.dtype:
        #    0 where key slot j is visible to query (b, i) -- j <= offsets[b] + i and
        #    j < context_lens[b] -- and -inf elsewhere (build it with NumPy, then mx.array).
        #    Otherwise None.
        # 6. offset: offsets[0] (an int) for one sequence, else mx.array(offsets, int32).
        # 7. self.step = PagedStep(..., attended=[False] * number of layers); return it.
        raise NotImplementedError(
            "Week 3 Day 3, task 1: implement `PagedKVCache.begin_step` in "
            "src/tiny_llm/paged_kv_cache.py"
        )


class PagedLayerCache:
    """Layer `layer`'s view of the pool; what the model's attention talks to."""

    def __init__(self, pool: PagedKVCache, layer: int):
        self.pool = pool
        self.layer = layer

    @property
    def offset(self) -> int | mx.array:
        """Tokens stored before this step: an int for one sequence, else [B] int32."""
        return self._current_step().offset

    def _current_step(self) -> PagedStep:
        step = self.pool.step
        if step is None:
            raise RuntimeError("no step prepared: call cache.begin_step(...) before model(...)")
        return step

    def _check(self, step: PagedStep, q: mx.array, k: mx.array, v: mx.array) -> None:
        if step.attended[self.layer]:
            raise RuntimeError(
                f"layer {self.layer} already stored this step's keys: call begin_step(...) "
                "before each forward pass"
            )
        _, _, h_kv, d = self.pool.keys[self.layer].shape
        shape = (len(step.seq_ids), h_kv, step.length, d)
        if k.shape != shape or v.shape != shape:
            raise ValueError(f"keys {k.shape} / values {v.shape}: this step expects {shape}")
        if q.ndim != 4 or q.shape[0] != shape[0] or q.shape[2:] != shape[2:] or q.shape[1] % h_kv:
            raise ValueError(f"queries {q.shape} do not fit keys {k.shape}")

    # -- task 2: write, then attend through the block tables ------------------------------------
    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        """Store k, v ([B, H_kv, L, D]) in their slots; attend q ([B, H_q, L, D]) over every
        stored token of its sequence, causally within the new ones."""
        step = self._current_step()
        self._check(step, q, k, v)
        # TODO(Week 3 Day 3, task 2): pool = self.pool, this layer is self.layer.
        # 1. Turn k and v into one row per token, [B * L, H_kv, D] (transpose to
        #    [B, L, H, D], reshape), cast to pool.dtype.
        # 2. pool.keys[layer], pool.values[layer] = pa.reshape_and_cache(...) with
        #    step.slot_mapping. Rebind at once, so that MLX can write in place. Then mark
        #    step.attended[layer] = True.
        # 3. q in pool.dtype. L == 1: pa.paged_attention(q[:, :, 0, :], keys, values,
        #    step.block_tables, step.context_lens, scale), with the length axis put back.
        #    L > 1: pa.gather_kv_batch(keys, values, step.block_tables) and your Week 1
        #    scaled_dot_product_attention_grouped with step.mask.
        # 4. Return the result in q.dtype. Read no array on the host here: this runs in every
        #    layer of every step.
        raise NotImplementedError(
            "Week 3 Day 3, task 2: implement `PagedLayerCache.attend` in "
            "src/tiny_llm/paged_kv_cache.py"
        )
