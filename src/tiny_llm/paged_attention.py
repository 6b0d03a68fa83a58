"""Week 3 Day 2: attention over a paged KV pool, first in pure MLX, then as a kernel.

Layouts (one layer's pool, shared by every sequence):
- key_cache, value_cache: [num_blocks, block_size, H_kv, D]; token t of a sequence lives in
  block `table[t // block_size]`, row `t % block_size`, i.e. flat slot `block * block_size + row`;
- block_tables: [B, max_blocks] int32, each row a sequence's blocks in logical order, padded with -1;
- context_lens: [B] int32, tokens stored per sequence; query: [B, H_q, D] (one new token each);
- slot_mapping: [T] int32, where `reshape_and_cache` writes token t (< 0: skip, e.g. padding).

Index arguments given as host data (Python lists, NumPy arrays) are checked value by value
here. Given as `mx.array`s they are not read: reading an array on the host waits for the device,
and the paged cache calls these functions in every layer of every step, with tables it built and
checked once per step. Unchecked arrays still cannot make these functions touch memory outside
the pool: block ids are clipped into range before gathering, and slots outside it are skipped.

Chapter: book/src/week3-02-paged-attention.md.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from . import paged_attention_cuda as _cuda
from .attention import scaled_dot_product_attention_grouped  # noqa: F401

FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


# -- argument checks (provided) ----------------------------------------------------------------
def _check_pool(key_cache, value_cache) -> tuple[int, int, int, int]:
    for name, a in (("key_cache", key_cache), ("value_cache", value_cache)):
        if not isinstance(a, mx.array):
            raise TypeError(f"{name} must be an mx.array, got {type(a).__name__}")
        if a.ndim != 4:
            raise ValueError(f"{name} must be [num_blocks, block_size, H_kv, D], got {a.shape}")
        if a.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {a.dtype}")
    if key_cache.shape != value_cache.shape or key_cache.dtype != value_cache.dtype:
        raise ValueError(
            f"key_cache {key_cache.shape} {key_cache.dtype} and value_cache "
            f"{value_cache.shape} {value_cache.dtype} must match"
        )
    return key_cache.shape


def _index_array(name: str, x, ndim: int) -> tuple[mx.array, np.ndarray | None]:
    """(int32 mx.array, its values on the host or None). Host data is converted and returned
    for checking; an mx.array is taken as is and not read (see the module docstring)."""
    if isinstance(x, mx.array):
        if x.dtype != mx.int32:
            raise TypeError(f"{name} must be int32, got {x.dtype}")
        host = None
    else:
        host = np.asarray(x)
        if host.size and not np.issubdtype(host.dtype, np.integer):
            raise TypeError(f"{name} must hold integers, got {host.dtype}")
        host = host.astype(np.int64)
        x = mx.array(host.astype(np.int32))
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {x.shape}")
    return x, host


def _check_tables(tables: np.ndarray, lens: np.ndarray, num_blocks: int, block_size: int):
    """Host-side value checks: every context fits its table and uses only real block ids."""
    capacity = tables.shape[1] * block_size
    for b, (row, n) in enumerate(zip(tables, lens, strict=True)):
        if not 1 <= n <= capacity:
            raise ValueError(
                f"context_lens[{b}] = {n}: must be in [1, {capacity}] (max_blocks * block_size)"
            )
        used = row[: -(-int(n) // block_size)]
        if used.min() < 0 or used.max() >= num_blocks or len(set(used.tolist())) < len(used):
            raise ValueError(
                f"block_tables[{b}] {used.tolist()} for {n} tokens: needs distinct block ids "
                f"in [0, {num_blocks})"
            )
        rest = row[len(used) :]
        if ((rest < -1) | (rest >= num_blocks)).any():
            raise ValueError(f"block_tables[{b}] pads with {rest.tolist()}: use -1 (or real ids)")


# -- task 1: gather a sequence's blocks --------------------------------------------------------
def gather_kv_batch(
    key_cache: mx.array, value_cache: mx.array, block_tables: mx.array
) -> tuple[mx.array, mx.array]:
    """Every sequence's blocks, in logical order, as contiguous keys and values.

    block_tables [B, max_blocks] -> (k, v), each [B, H_kv, max_blocks * block_size, D]. Slot s
    of row b holds that sequence's token s; slots past its context (and all of a -1 entry's
    block) hold whatever the pool has there: the caller masks them.
    """
    num_blocks, block_size, h_kv, d = _check_pool(key_cache, value_cache)
    tables, _ = _index_array("block_tables", block_tables, 2)
    # TODO(Week 3 Day 2, task 1):
    # 1. Clip the ids into [0, num_blocks) (mx.clip): -1 padding must still name a real block
    #    (its slots are masked later), and an unchecked bad id must not read outside the pool.
    # 2. Index the cache with the [B, max_blocks] ids: cache[ids] is
    #    [B, max_blocks, block_size, H_kv, D]. Merge the two middle axes into one of
    #    max_blocks * block_size slots and move the head axis before it: [B, H_kv, S, D].
    #    Make that a row-major copy (mx.contiguous): attention's matmuls on the transposed
    #    view are several times slower on a CPU.
    # 3. Do it for keys and values; return (k, v).
    raise NotImplementedError(
        "Week 3 Day 2, task 1: implement `gather_kv_batch` in src/tiny_llm/paged_attention.py"
    )


def gather_kv(
    key_cache: mx.array, value_cache: mx.array, block_table_row, length: int
) -> tuple[mx.array, mx.array]:
    """One sequence's first `length` keys and values, [H_kv, length, D] each."""
    _, block_size, _, _ = _check_pool(key_cache, value_cache)
    row, host = _index_array("block_table_row", block_table_row, 1)
    if isinstance(length, bool) or not isinstance(length, int | np.integer):
        raise TypeError(f"length must be an int, got {type(length).__name__}")
    if not 0 <= length <= row.shape[0] * block_size:
        raise ValueError(
            f"length {length} must be in [0, {row.shape[0] * block_size}] (table of "
            f"{row.shape[0]} blocks of {block_size})"
        )
    if host is not None and length:
        _check_tables(host[None], np.array([length]), key_cache.shape[0], block_size)
    k, v = gather_kv_batch(key_cache, value_cache, row[None])
    return k[0, :, :length], v[0, :, :length]


# -- task 2: decode attention through the block tables -----------------------------------------
def paged_attention_mlx(
    query: mx.array,
    key_cache: mx.array,
    value_cache: mx.array,
    block_tables,
    context_lens,
    scale: float,
) -> mx.array:
    """Attention of each sequence's one new query over its `context_lens[b]` stored tokens.

    query [B, H_q, D] -> [B, H_q, D]. Query head h reads KV head h // (H_q / H_kv). A sequence
    with an empty context (only possible through an unchecked mx.array) gets zeros.
    """
    num_blocks, block_size, h_kv, d = _check_pool(key_cache, value_cache)
    if not isinstance(query, mx.array):
        raise TypeError(f"query must be an mx.array, got {type(query).__name__}")
    if query.ndim != 3:
        raise ValueError(f"query must be [B, H_q, D] (one token per sequence), got {query.shape}")
    if query.dtype != key_cache.dtype:
        raise TypeError(f"query is {query.dtype}, the cache {key_cache.dtype}: they must match")
    batch, h_q, _ = query.shape
    if query.shape[2] != d or h_q % h_kv:
        raise ValueError(
            f"query {query.shape} does not fit the cache's H_kv={h_kv}, D={d} "
            "(H_q must be a multiple of H_kv)"
        )
    tables, host_tables = _index_array("block_tables", block_tables, 2)
    lens, host_lens = _index_array("context_lens", context_lens, 1)
    if tables.shape[0] != batch or lens.shape[0] != batch:
        raise ValueError(
            f"batch of {batch} queries, block_tables {tables.shape}, context_lens {lens.shape}"
        )
    if host_tables is not None or host_lens is not None:  # host data: check the values
        host_tables = np.array(tables) if host_tables is None else host_tables
        host_lens = np.array(lens) if host_lens is None else host_lens
        _check_tables(host_tables, host_lens, num_blocks, block_size)

    # TODO(Week 3 Day 2, task 2):
    # 1. k, v = gather_kv_batch(key_cache, value_cache, tables): [B, H_kv, S, D].
    # 2. Slot s of row b is visible when s < lens[b]. Build an additive mask [B, 1, 1, S]
    #    holding 0 there and -inf elsewhere, in query.dtype (a float32 mask would promote
    #    float16 scores to float32).
    # 3. Your Week 1 scaled_dot_product_attention_grouped on query[:, :, None, :] (one query
    #    position) with that mask, then drop the length axis: [B, H_q, D].
    # 4. A row with lens[b] == 0 sees nothing and softmaxes to NaN: return zeros there
    #    (mx.where on lens > 0).
    raise NotImplementedError(
        "Week 3 Day 2, task 2: implement `paged_attention_mlx` in src/tiny_llm/paged_attention.py"
    )


# -- task 3: write new tokens into their slots -------------------------------------------------
def reshape_and_cache_mlx(
    key: mx.array,
    value: mx.array,
    key_cache: mx.array,
    value_cache: mx.array,
    slot_mapping,
) -> tuple[mx.array, mx.array]:
    """Caches with token t's key and value ([T, H_kv, D]) written to slot `slot_mapping[t]`.

    MLX arrays are immutable: this returns the new caches (rebind: `kc, vc = ...(kc, vc)`). When
    the caller holds no other reference to the old ones, MLX writes in place instead of copying.
    """
    num_blocks, block_size, h_kv, d = _check_pool(key_cache, value_cache)
    for name, a in (("key", key), ("value", value)):
        if not isinstance(a, mx.array) or a.ndim != 3 or a.shape[1:] != (h_kv, d):
            raise ValueError(
                f"{name} must be an mx.array [T, {h_kv}, {d}] to fit the cache, "
                f"got {getattr(a, 'shape', type(a).__name__)}"
            )
        if a.dtype != key_cache.dtype:
            raise TypeError(f"{name} is {a.dtype}, the cache {key_cache.dtype}: they must match")
    slots, host = _index_array("slot_mapping", slot_mapping, 1)
    if key.shape[0] != value.shape[0] or slots.shape[0] != key.shape[0]:
        raise ValueError(
            f"key {key.shape}, value {value.shape} and slot_mapping {slots.shape} "
            "must have the same number of tokens"
        )
    n_slots = num_blocks * block_size
    if host is not None:
        if host.size and host.max() >= n_slots:
            raise ValueError(f"slot {host.max()} is outside the pool's {n_slots} slots")
        written = host[host >= 0]
        if len(np.unique(written)) < len(written):
            raise ValueError(f"slot_mapping writes one slot twice: {host.tolist()}")
    if key.shape[0] == 0:
        return key_cache, value_cache
    # TODO(Week 3 Day 2, task 3):
    # 1. View each cache as [num_blocks * block_size, H_kv, D] (reshape): a slot number then
    #    indexes one row. Scatter the tokens' rows into it and reshape back.
    # 2. Slots outside [0, n_slots) must be skipped, but MLX's scatter has no "skip" (it wraps
    #    -1 to the last row), and reading the pool here would stop MLX from writing in place.
    #    Write as old * 0 + new with two scatters that read nothing:
    #    valid = (slots >= 0) & (slots < n_slots); target = slot, or 0 where not valid;
    #    flat = flat.at[target].multiply(0 where valid, 1 where not)   (broadcast to x's shape)
    #    flat = flat.at[target].add(x where valid, 0 where not)
    #    A skipped token multiplies slot 0 by 1 and adds 0: nothing changes.
    # 3. Return (new key cache, new value cache).
    raise NotImplementedError(
        "Week 3 Day 2, task 3: implement `reshape_and_cache_mlx` in src/tiny_llm/paged_attention.py"
    )


# -- the kernels (Week 3 Day 2, tasks 4-6; the wrappers are provided) --------------------------
# The extension's ops (src/extensions/src/paged_attention*.cpp/.metal). They check shapes and
# dtypes in C++ before building a node. Index values: host data is checked here, as above; an
# mx.array that is already computed is checked by the C++ op at once (reading it waits for
# nothing); one still being computed is checked by the CPU kernel before it reads the pool
# (a RuntimeError from mx.eval), and on the GPU a bad id or length gives NaN, never a read
# outside the pool. The paged cache calls these two names in every layer.
KERNEL_HEAD_DIMS = (64, 128)


def _extension():
    from .kernels import extension

    return extension()._ext


def _checked_tables(block_tables, context_lens, num_blocks: int, block_size: int):
    """(block_tables, context_lens) as int32 mx.arrays; host data checked value by value."""
    tables, host_tables = _index_array("block_tables", block_tables, 2)
    lens, host_lens = _index_array("context_lens", context_lens, 1)
    if host_tables is not None or host_lens is not None:
        host_tables = np.array(tables) if host_tables is None else host_tables
        host_lens = np.array(lens) if host_lens is None else host_lens
        if host_tables.shape[0] != host_lens.shape[0]:
            raise ValueError(
                f"block_tables {host_tables.shape} and context_lens {host_lens.shape} "
                "must have one row per sequence"
            )
        _check_tables(host_tables, host_lens, num_blocks, block_size)
    return tables, lens


def paged_attention(
    query: mx.array,
    key_cache: mx.array,
    value_cache: mx.array,
    block_tables,
    context_lens,
    scale: float,
    *,
    stream: mx.Stream | mx.Device | None = None,
) -> mx.array:
    """`paged_attention_mlx` as one kernel that reads K/V through the tables (no gather).

    float32, float16, bfloat16. Every context must be in [1, max_blocks * block_size] and use
    block ids in [0, num_blocks). The kernel is built for head dims 64 and 128 (the course's
    models); other head dims (the tests' tiny models) run `paged_attention_mlx`. On an NVIDIA GPU
    (a CUDA build of MLX) the CUDA kernel of paged_attention_cuda.py runs instead of the
    extension's.
    """
    num_blocks, block_size, _, head_dim = _check_pool(key_cache, value_cache)
    if head_dim not in KERNEL_HEAD_DIMS:
        args = (query, key_cache, value_cache, block_tables, context_lens, scale)
        if stream is None:
            return paged_attention_mlx(*args)
        with mx.stream(stream):
            return paged_attention_mlx(*args)
    tables, lens = _checked_tables(block_tables, context_lens, num_blocks, block_size)
    if _cuda.runs_on_cuda(stream):  # an NVIDIA GPU: paged_attention_cuda.py, not the extension
        return _cuda.paged_attention_cuda(
            query, key_cache, value_cache, tables, lens, float(scale), stream=stream
        )
    return _extension().paged_attention(
        query, key_cache, value_cache, tables, lens, float(scale), stream=stream
    )


def reshape_and_cache(
    key: mx.array,
    value: mx.array,
    key_cache: mx.array,
    value_cache: mx.array,
    slot_mapping,
    *,
    stream: mx.Stream | mx.Device | None = None,
) -> tuple[mx.array, mx.array]:
    """`reshape_and_cache_mlx` as one kernel. The new caches take over the old ones' memory
    when nothing else references them (rebind: `kc, vc = reshape_and_cache(k, v, kc, vc, s)`),
    so storing T tokens costs T rows, not a copy of the pool. Slots must be < the pool's
    slot count and distinct; negative slots are skipped."""
    _check_pool(key_cache, value_cache)
    if _cuda.runs_on_cuda(stream):
        # A custom CUDA kernel's outputs are new buffers: writing T rows would copy the pool.
        # MLX's own scatter takes the pool's buffer over, so the pure-MLX write runs in place.
        args = (key, value, key_cache, value_cache, slot_mapping)
        if stream is None:
            return reshape_and_cache_mlx(*args)
        with mx.stream(stream):
            return reshape_and_cache_mlx(*args)
    slots, _ = _index_array("slot_mapping", slot_mapping, 1)  # host values: checked in C++
    new_key_cache, new_value_cache = _extension().reshape_and_cache(
        key, value, key_cache, value_cache, slots, stream=stream
    )
    return new_key_cache, new_value_cache
