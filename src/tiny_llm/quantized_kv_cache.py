"""Week 3 Day 9 (optional): a paged KV cache stored in 8 or 4 bits.

Decode attention reads every stored key and value once per token, so the bytes a token's keys
and values take decide both how many tokens fit in the pool and how fast a decode step can be.
This module keeps Day 3's paged cache (block manager, slot mapping, block tables, one pool for
all layers) and changes only what a slot holds: each row of D numbers (one token, one KV head)
is cut into groups of `group_size` along the head dim, and each group is stored as

    codes  uint8, `bits` per element   (8-bit: one code per byte; 4-bit: two per byte, element
                                        2i in the low nibble, element 2i + 1 in the high one)
    scale  float16                      x ~= code * scale + bias     (affine, per group)
    bias   float16

so a block is three arrays ([num_blocks, block_size, H_kv, ...] each, see `QuantizedBlocks`).
New keys and values are quantized as they are written through the slot mapping; the decode
kernel reads codes and dequantizes on the fly (it never materialises a float copy of the pool),
and prefill (L > 1) gathers a sequence's blocks and dequantizes them before attention.

Why float16 scales and biases, and why rounded outwards: two float16 numbers per group cost
4 bytes (float32 would cost 8: 40 instead of 36 bytes per 32 elements at 8 bits, 24 instead of
20 at 4 bits). But a float16 bias rounded to nearest can land *above* the group's minimum (or a
scale below what the range needs), and then the extreme elements fall off the code range and
are clipped by up to |bias| * 2^-11 -- far more than a step when a group sits far from zero. So
the bias is rounded down and the scale up: the stored grid always covers [min, max] and every
element is within half a step of its value, |x - dequantize(quantize(x))| <= scale / 2.

Chapter: book/src/week3-09-quantized-cache.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from . import paged_attention as pa
from .attention import scaled_dot_product_attention_grouped  # noqa: F401 (tasks 5, 6)
from .paged_kv_cache import PagedKVCache, PagedLayerCache

BITS = (4, 8)
GROUP_SIZES = (32, 64)
SCALE_DTYPE = mx.float16  # scales and biases


# -- the layout (provided) ---------------------------------------------------------------------
def _check_format(bits, group_size, head_dim: int | None = None) -> None:
    if bits not in BITS or isinstance(bits, bool):
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    if group_size not in GROUP_SIZES or isinstance(group_size, bool):
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    if head_dim is not None and head_dim % group_size:
        raise ValueError(f"head dim {head_dim} is not a multiple of group_size {group_size}")


class QuantizedBlocks:
    """One layer's keys (or values) for the whole pool, quantized along the head dim.

    codes  [num_blocks, block_size, H_kv, D * bits // 8] uint8
    scales [num_blocks, block_size, H_kv, D // group_size] float16
    biases [num_blocks, block_size, H_kv, D // group_size] float16

    Element i of a row is `codes[i] * scales[i // group_size] + biases[i // group_size]`.
    `blocks[ids]` gives those blocks; `blocks[dst] = blocks[src]` copies blocks, codes, scales and
    biases together (what copy-on-write does). Instances are rebound, like mx.arrays, by the
    functions that write them.
    """

    def __init__(
        self, codes: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int
    ):
        _check_format(bits, group_size)
        for name, a, dtype in (
            ("codes", codes, mx.uint8),
            ("scales", scales, SCALE_DTYPE),
            ("biases", biases, SCALE_DTYPE),
        ):
            if not isinstance(a, mx.array) or a.ndim != 4 or a.dtype != dtype:
                raise TypeError(
                    f"{name} must be a 4-D {dtype} mx.array, got "
                    f"{getattr(a, 'shape', type(a).__name__)} {getattr(a, 'dtype', '')}"
                )
        head_dim = codes.shape[3] * 8 // bits
        if scales.shape != biases.shape or scales.shape != (
            *codes.shape[:3],
            head_dim // group_size,
        ):
            raise ValueError(
                f"codes {codes.shape}, scales {scales.shape} and biases {biases.shape} do not "
                f"describe one pool of {bits}-bit rows with groups of {group_size}"
            )
        self.codes, self.scales, self.biases = codes, scales, biases
        self.bits, self.group_size = bits, group_size

    @classmethod
    def zeros(
        cls,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        bits: int = 8,
        group_size: int = 32,
    ) -> QuantizedBlocks:
        """An empty pool (every element decodes to 0). Lazy: no memory until first written."""
        _check_format(bits, group_size, head_dim)
        lead = (num_blocks, block_size, num_kv_heads)
        groups = head_dim // group_size
        return cls(
            mx.zeros((*lead, head_dim * bits // 8), dtype=mx.uint8),
            mx.zeros((*lead, groups), dtype=SCALE_DTYPE),
            mx.zeros((*lead, groups), dtype=SCALE_DTYPE),
            bits,
            group_size,
        )

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The pool's logical shape, as the float pool's: (num_blocks, block_size, H_kv, D)."""
        return (*self.codes.shape[:3], self.codes.shape[3] * 8 // self.bits)

    @property
    def nbytes(self) -> int:
        """Bytes of codes, scales and biases together."""
        return self.codes.nbytes + self.scales.nbytes + self.biases.nbytes

    def arrays(self) -> tuple[mx.array, mx.array, mx.array]:
        return self.codes, self.scales, self.biases

    def __getitem__(self, blocks) -> QuantizedBlocks:
        return QuantizedBlocks(
            self.codes[blocks], self.scales[blocks], self.biases[blocks], self.bits, self.group_size
        )

    def __setitem__(self, blocks, other: QuantizedBlocks) -> None:
        if not isinstance(other, QuantizedBlocks) or (other.bits, other.group_size) != (
            self.bits,
            self.group_size,
        ):
            raise TypeError("only blocks of the same format can be copied into a QuantizedBlocks")
        self.codes[blocks] = other.codes
        self.scales[blocks] = other.scales
        self.biases[blocks] = other.biases

    def __repr__(self) -> str:
        return (
            f"QuantizedBlocks(shape={self.shape}, bits={self.bits}, group_size={self.group_size})"
        )


def _check_blocks(key_blocks, value_blocks) -> tuple[int, int, int, int]:
    for name, b in (("key_blocks", key_blocks), ("value_blocks", value_blocks)):
        if not isinstance(b, QuantizedBlocks):
            raise TypeError(f"{name} must be a QuantizedBlocks, got {type(b).__name__}")
    if key_blocks.shape != value_blocks.shape or (key_blocks.bits, key_blocks.group_size) != (
        value_blocks.bits,
        value_blocks.group_size,
    ):
        raise ValueError(f"key_blocks {key_blocks!r} and value_blocks {value_blocks!r} must match")
    return key_blocks.shape


def _check_rows(name: str, x, head_dim: int | None = None) -> None:
    if not isinstance(x, mx.array):
        raise TypeError(f"{name} must be an mx.array, got {type(x).__name__}")
    if x.dtype not in pa.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.ndim < 1 or (head_dim is not None and x.shape[-1] != head_dim):
        raise ValueError(f"{name} has shape {x.shape}: its last axis must be the head dim")


# -- task 1: quantize --------------------------------------------------------------------------
def quantize(
    x: mx.array, bits: int = 8, group_size: int = 32
) -> tuple[mx.array, mx.array, mx.array]:
    """x [..., D] (float) -> (codes [..., D * bits // 8] uint8, scales, biases
    [..., D // group_size] float16), affine per group of `group_size` along the last axis.

    For a group with minimum lo and maximum hi (in float32), levels = 2**bits - 1:
      bias  = float16(lo - (|lo| * 2**-10 + 2**-24))            rounded down, below lo
      scale = float16((hi - bias) / levels * (1 + 2**-10) + 2**-24)   rounded up, never 0
      code  = round((x - bias) / scale), in [0, levels] (clip only guards float rounding)
    4-bit codes are packed two per byte: element 2i in the low nibble, 2i + 1 in the high one.
    Values must be finite and inside float16's range.
    """
    _check_format(bits, group_size)
    _check_rows("x", x)
    d = x.shape[-1]
    if d % group_size:
        raise ValueError(f"the last axis ({d}) is not a multiple of group_size {group_size}")
    # TODO(Week 3 Day 9, task 1):
    # 1. View x as float32 groups: [..., D // group_size, group_size]; lo, hi = min, max of each.
    # 2. bias and scale exactly as the docstring says (float16, rounded outwards: first move the
    #    float32 value out by 2^-10 relative plus 2^-24, then .astype(float16)). Use the float16
    #    values (back in float32) for the codes, so the grid you store is the grid you rounded to.
    # 3. codes = round((x - bias) / scale), clipped to [0, levels], as uint8, [..., D].
    # 4. 4-bit: pack pairs, element 2i in the low nibble: codes[..., 0::2] | codes[..., 1::2] << 4.
    # 5. Return (codes, scales, biases) with scales/biases shaped [..., D // group_size].
    raise NotImplementedError(
        "Week 3 Day 9, task 1: implement `quantize` in src/tiny_llm/quantized_kv_cache.py"
    )


# -- task 2: dequantize ------------------------------------------------------------------------
def dequantize(
    codes: mx.array,
    scales: mx.array,
    biases: mx.array,
    bits: int = 8,
    group_size: int = 32,
    dtype: mx.Dtype = mx.float32,
) -> mx.array:
    """The inverse of `quantize`: [..., D] of `dtype`, element i = code_i * scale + bias of its
    group, computed in float32."""
    _check_format(bits, group_size)
    if not isinstance(codes, mx.array) or codes.dtype != mx.uint8:
        raise TypeError(f"codes must be a uint8 mx.array, got {getattr(codes, 'dtype', codes)}")
    d = codes.shape[-1] * 8 // bits
    groups = d // group_size
    lead = codes.shape[:-1]
    for name, a in (("scales", scales), ("biases", biases)):
        if not isinstance(a, mx.array) or a.shape != (*lead, groups):
            raise ValueError(
                f"{name} must be {(*lead, groups)} for codes {codes.shape}, got "
                f"{getattr(a, 'shape', type(a).__name__)}"
            )
    # TODO(Week 3 Day 9, task 2):
    # 1. 4-bit: unpack each byte into (byte & 0xF, byte >> 4), in that order, [..., D].
    # 2. In float32: view the codes as [..., groups, group_size], multiply by the group's scale,
    #    add its bias (both [..., groups]: add an axis to broadcast).
    # 3. Back to [..., D], as `dtype`.
    raise NotImplementedError(
        "Week 3 Day 9, task 2: implement `dequantize` in src/tiny_llm/quantized_kv_cache.py"
    )


# -- task 3: write new tokens through the slot mapping -----------------------------------------
def _scatter_rows(cache: mx.array, slots: mx.array, rows: mx.array) -> mx.array:
    """`cache` ([num_blocks, block_size, ...]) with rows[t] stored at flat slot slots[t]; a slot
    < 0 or past the pool is skipped. (Day 2's trick, see reshape_and_cache_mlx: two scatters
    that read nothing, so MLX writes in place when the caller rebinds.)"""
    n_slots = cache.shape[0] * cache.shape[1]
    valid = (slots >= 0) & (slots < n_slots)
    target = mx.where(valid, slots, 0)
    shape = (rows.shape[0],) + (1,) * (rows.ndim - 1)
    keep = mx.where(valid, 0, 1).astype(cache.dtype).reshape(shape)
    flat = cache.reshape(n_slots, *cache.shape[2:])
    flat = flat.at[target].multiply(mx.broadcast_to(keep, rows.shape))
    flat = flat.at[target].add(mx.where(valid.reshape(shape), rows, mx.zeros_like(rows)))
    return flat.reshape(cache.shape)


def reshape_and_cache_quantized(
    key: mx.array,
    value: mx.array,
    key_blocks: QuantizedBlocks,
    value_blocks: QuantizedBlocks,
    slot_mapping,
) -> tuple[QuantizedBlocks, QuantizedBlocks]:
    """Pools with token t's key and value ([T, H_kv, D], float) quantized and stored at slot
    `slot_mapping[t]` (< 0: skipped). Returns new QuantizedBlocks: rebind
    (`kb, vb = reshape_and_cache_quantized(k, v, kb, vb, slots)`) and MLX writes in place."""
    num_blocks, block_size, h_kv, d = _check_blocks(key_blocks, value_blocks)
    for name, a in (("key", key), ("value", value)):
        _check_rows(name, a)
        if a.ndim != 3 or a.shape[1:] != (h_kv, d):
            raise ValueError(f"{name} must be [T, {h_kv}, {d}] to fit the pool, got {a.shape}")
    slots, host = pa._index_array("slot_mapping", slot_mapping, 1)
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
        return key_blocks, value_blocks
    # TODO(Week 3 Day 9, task 3): for the keys and for the values:
    # 1. quantize the [T, H_kv, D] rows with the pool's bits and group_size: three arrays.
    # 2. store each in the matching pool array with _scatter_rows(old, slots, new) (Day 2's
    #    in-place scatter; slots < 0 are skipped).
    # 3. wrap the three new arrays in a QuantizedBlocks (same bits, group_size).
    raise NotImplementedError(
        "Week 3 Day 9, task 3: implement `reshape_and_cache_quantized` in "
        "src/tiny_llm/quantized_kv_cache.py"
    )


# -- task 4: gather a batch's blocks, dequantized ----------------------------------------------
def gather_kv_quantized(
    key_blocks: QuantizedBlocks,
    value_blocks: QuantizedBlocks,
    block_tables,
    dtype: mx.Dtype = mx.float32,
) -> tuple[mx.array, mx.array]:
    """Day 2's gather_kv_batch for a quantized pool: block_tables [B, max_blocks] ->
    (k, v) [B, H_kv, max_blocks * block_size, D] of `dtype`, each sequence's blocks in logical
    order. Only the gathered blocks are dequantized, never the whole pool. Slots past a context
    hold whatever the pool has there: the caller masks them."""
    num_blocks, block_size, h_kv, d = _check_blocks(key_blocks, value_blocks)
    tables, _ = pa._index_array("block_tables", block_tables, 2)
    # TODO(Week 3 Day 9, task 4): Day 2's gather_kv_batch, for three arrays per pool:
    # 1. Clip the ids into [0, num_blocks) (-1 padding must still name a real block).
    # 2. Index codes, scales and biases with them ([B, max_blocks, block_size, H_kv, ...]) and
    #    dequantize only those blocks to `dtype`: [B, max_blocks, block_size, H_kv, D].
    # 3. Merge the block axes into one of max_blocks * block_size slots, move the head axis
    #    before it and make a row-major copy: [B, H_kv, S, D]. Return (k, v).
    raise NotImplementedError(
        "Week 3 Day 9, task 4: implement `gather_kv_quantized` in "
        "src/tiny_llm/quantized_kv_cache.py"
    )


# -- task 5: decode attention over a quantized pool, in pure MLX -------------------------------
def _check_query(query, shape, block_tables, context_lens):
    """(tables, lens, host tables or None, host lens or None) after the checks Day 2's
    paged_attention_mlx makes."""
    num_blocks, block_size, h_kv, d = shape
    _check_rows("query", query)
    if query.ndim != 3:
        raise ValueError(f"query must be [B, H_q, D] (one token per sequence), got {query.shape}")
    batch, h_q, _ = query.shape
    if query.shape[2] != d or h_q % h_kv:
        raise ValueError(
            f"query {query.shape} does not fit the pool's H_kv={h_kv}, D={d} "
            "(H_q must be a multiple of H_kv)"
        )
    tables, host_tables = pa._index_array("block_tables", block_tables, 2)
    lens, host_lens = pa._index_array("context_lens", context_lens, 1)
    if tables.shape[0] != batch or lens.shape[0] != batch:
        raise ValueError(
            f"batch of {batch} queries, block_tables {tables.shape}, context_lens {lens.shape}"
        )
    if host_tables is not None or host_lens is not None:  # host data: check the values
        host_tables = np.array(tables) if host_tables is None else host_tables
        host_lens = np.array(lens) if host_lens is None else host_lens
        pa._check_tables(host_tables, host_lens, num_blocks, block_size)
    return tables, lens


def paged_attention_quantized_mlx(
    query: mx.array,
    key_blocks: QuantizedBlocks,
    value_blocks: QuantizedBlocks,
    block_tables,
    context_lens,
    scale: float,
) -> mx.array:
    """Day 2's paged_attention_mlx over a quantized pool: query [B, H_q, D] -> [B, H_q, D] (its
    dtype), attending over the dequantized keys and values of each sequence's context_lens[b]
    tokens. An empty context (only through an unchecked mx.array) gives zeros."""
    shape = _check_blocks(key_blocks, value_blocks)
    tables, lens = _check_query(query, shape, block_tables, context_lens)
    # TODO(Week 3 Day 9, task 5): Day 2's paged_attention_mlx over gather_kv_quantized(...,
    # query.dtype): mask the slots at or past context_lens[b] with -inf, grouped attention
    # (scaled_dot_product_attention_grouped) of query[:, :, None, :], and zeros for a row whose
    # context is empty.
    raise NotImplementedError(
        "Week 3 Day 9, task 5: implement `paged_attention_quantized_mlx` in "
        "src/tiny_llm/quantized_kv_cache.py"
    )


def _gpu_without_metal(stream) -> bool:
    """Whether `stream` (None: the default) is a GPU other than Metal (MLX's CUDA build), where
    the extension has no kernel."""
    device = mx.default_device() if stream is None else getattr(stream, "device", stream)
    kind = getattr(device, "type", device)  # a Device, or already a DeviceType (mx.cpu)
    return kind == mx.gpu and not mx.metal.is_available()


# -- the kernel (Week 3 Day 9, tasks 7-8; the wrapper is provided) -----------------------------
# src/extensions/src/paged_attention_quantized*.{h,cpp,metal}: the C++ op checks shapes and
# dtypes before building a node; index values are checked as Day 2's paged_attention does.
def paged_attention_quantized(
    query: mx.array,
    key_blocks: QuantizedBlocks,
    value_blocks: QuantizedBlocks,
    block_tables,
    context_lens,
    scale: float,
    *,
    stream: mx.Stream | mx.Device | None = None,
) -> mx.array:
    """`paged_attention_quantized_mlx` as one kernel that reads codes through the tables and
    dequantizes each row as it goes (no gathered or float copy). Head dims 64 and 128 on the CPU
    and on Metal; other head dims (the tests' tiny models) and other GPUs run
    `paged_attention_quantized_mlx`."""
    num_blocks, block_size, _, head_dim = _check_blocks(key_blocks, value_blocks)
    if head_dim not in pa.KERNEL_HEAD_DIMS or _gpu_without_metal(stream):
        args = (query, key_blocks, value_blocks, block_tables, context_lens, scale)
        if stream is None:
            return paged_attention_quantized_mlx(*args)
        with mx.stream(stream):
            return paged_attention_quantized_mlx(*args)
    tables, lens = pa._checked_tables(block_tables, context_lens, num_blocks, block_size)
    return pa._extension().paged_attention_quantized(
        query,
        *key_blocks.arrays(),
        *value_blocks.arrays(),
        tables,
        lens,
        float(scale),
        key_blocks.bits,
        key_blocks.group_size,
        stream=stream,
    )


# -- the cache ---------------------------------------------------------------------------------
class QuantizedPagedKVCache(PagedKVCache):
    """Day 3's PagedKVCache with every layer's keys and values stored in `bits` bits.

    The bookkeeping (block manager, begin_step, free, copy-on-write, usage) is the parent's:
    only the pools (`keys[layer]`, `values[layer]` are QuantizedBlocks) and the layers' `attend`
    change. `dtype` is what attention computes in (the dequantized keys and values, the mask).
    """

    def __init__(
        self,
        model_or_args,
        num_blocks: int,
        block_size: int = 16,
        bits: int = 8,
        group_size: int = 32,
        dtype=mx.float16,
        manager=None,
    ):
        super().__init__(model_or_args, num_blocks, block_size, dtype=dtype, manager=manager)
        _, _, h_kv, d = self.keys[0].shape
        _check_format(bits, group_size, d)
        self.bits, self.group_size = bits, group_size
        # The parent's float pools are lazy zeros that were never evaluated: replacing them
        # costs no memory.
        n = len(self.keys)
        self.keys = [
            QuantizedBlocks.zeros(num_blocks, block_size, h_kv, d, bits, group_size)
            for _ in range(n)
        ]
        self.values = [
            QuantizedBlocks.zeros(num_blocks, block_size, h_kv, d, bits, group_size)
            for _ in range(n)
        ]
        self._layers = [QuantizedPagedLayerCache(self, i) for i in range(n)]


class QuantizedPagedLayerCache(PagedLayerCache):
    """Layer `layer`'s view of a quantized pool."""

    # -- task 6: quantize and write, then attend over the dequantized pool ----------------------
    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        """As PagedLayerCache.attend: store k, v ([B, H_kv, L, D]) -- quantized -- in their
        slots; attend q ([B, H_q, L, D]) over every stored token of its sequence, causally
        within the new ones. Decode (L == 1) runs the kernel; L > 1 gathers and dequantizes."""
        step = self._current_step()
        self._check(step, q, k, v)
        # TODO(Week 3 Day 9, task 6): Day 3's PagedLayerCache.attend with the quantized pool:
        # 1. k, v [B, H_kv, L, D] -> one row per token, [B * L, H_kv, D] (no cast: quantize
        #    reads them as they are).
        # 2. reshape_and_cache_quantized(..., self.pool.keys[self.layer],
        #    self.pool.values[self.layer], step.slot_mapping); rebind both at once; mark
        #    step.attended[self.layer].
        # 3. L == 1: paged_attention_quantized (the kernel) on q.astype(self.pool.dtype);
        #    L > 1: gather_kv_quantized(..., self.pool.dtype) and grouped attention with
        #    step.mask. Return [B, H_q, L, D] in q's dtype.
        raise NotImplementedError(
            "Week 3 Day 9, task 6: implement `QuantizedPagedLayerCache.attend` in "
            "src/tiny_llm/quantized_kv_cache.py"
        )


# -- measuring (provided) ----------------------------------------------------------------------
def mean_nll(model, cache: PagedKVCache, tokens: Sequence[int], chunk: int = 1) -> float:
    """Mean negative log-likelihood (nats per token) of tokens[1:], each given the tokens before
    it, read through `cache` as one sequence: the first `chunk` tokens as a prompt, then
    `chunk` at a time (chunk=1: every prediction after the first comes from a decode step).
    The cache must be empty and have room for len(tokens) - 1 tokens."""
    tokens = [int(t) for t in tokens]
    if len(tokens) < 2 or chunk < 1:
        raise ValueError("need at least 2 tokens and chunk >= 1")
    seq = object()  # a sequence id nobody else uses
    total, start = 0.0, 0
    try:
        while start < len(tokens) - 1:
            piece = tokens[start : min(start + chunk, len(tokens) - 1)]
            cache.begin_step([seq], [len(piece)])
            logits = model(mx.array([piece], dtype=mx.int32), cache.layers())[0]
            logp = logits.astype(mx.float32) - mx.logsumexp(
                logits.astype(mx.float32), axis=-1, keepdims=True
            )
            targets = mx.array(tokens[start + 1 : start + 1 + len(piece)])
            total -= mx.take_along_axis(logp, targets[:, None], axis=-1).sum().item()
            start += len(piece)
    finally:
        if seq in cache:
            cache.free(seq)
    return total / (len(tokens) - 1)
