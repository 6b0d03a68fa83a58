"""Week 3 Day 2 (NVIDIA): the paged decode-attention kernel in CUDA, through `mx.fast.cuda_kernel`.

The same op as the CPU and Metal kernels (`paged_attention` in paged_attention.py dispatches here
when the work goes to a CUDA GPU): query [B, H_q, D] attends over each sequence's
`context_lens[b]` tokens, read through `block_tables` straight from the pool
[num_blocks, block_size, H_kv, D]. float32, float16, bfloat16; head dims 64 and 128.

MLX compiles the CUDA text at run time with NVRTC (no CUDA toolkit at install time, no C++
extension to build): `mx.fast.cuda_kernel` wraps a function body in a generated `__global__`
signature (`const T* name` per input, `T* name` per output), and `grid` counts *threads*, as in
Metal, not blocks as in `<<<blocks, threads>>>`.

Two ways to cover a sequence:
- one pass (partitions = 1): one CUDA block per (sequence, KV head, slice of its query heads)
  reads the whole context and writes the output;
- split-K (vLLM's "v2"): the context is cut into `partitions` ranges of tokens, one block per
  range writes a partial softmax state (max, sum, weighted values), and a second kernel merges
  them. Decoding few sequences gives few (sequence, KV head) pairs, far fewer than the GPU's
  132 SMs can keep busy; splitting the context is what fills the GPU.

Chapter: book/src/week3-cuda.md.
"""

from __future__ import annotations

import functools
import hashlib
import math

import mlx.core as mx
import numpy as np

KERNEL_HEAD_DIMS = (64, 128)
FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
#: Threads per block (4 warps); the CUDA text assumes this number (`PAGED_THREADS`).
THREADS = 128
#: Query heads one block serves at most (the ones that share its KV head); more are "sliced".
MAX_HEADS = 8
#: Launches aim for about this many blocks (about 2 per SM of an H100's 132): first by giving
#: each block fewer KV heads (`choose_kv_heads`), then by split-K. On an H100 (8 sequences,
#: 32 / 8 heads, D = 128) about 256 blocks of 128 threads beat both 64 longer ones (too few
#: bytes in flight) and 512 or more shorter ones (more starts, partial results and merging).
TARGET_BLOCKS = 256
#: ... without cutting the context finer than this many tokens per partition.
MIN_PARTITION = 256


# -- where the work goes (provided) -------------------------------------------------------------
@functools.cache
def cuda_available() -> bool:
    """True when this MLX is a CUDA build and sees a GPU (`pip install "mlx[cuda13]"`)."""
    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and cuda.is_available())


def runs_on_cuda(stream: mx.Stream | mx.Device | None = None) -> bool:
    """Whether work for `stream` (a stream, a device, or `mx.cpu` / `mx.gpu`; None: MLX's default
    device) runs on a CUDA GPU. The kernels in paged_attention.py dispatch here when it does."""
    if stream is None:
        stream = mx.default_device()
    if isinstance(stream, mx.Stream):
        stream = stream.device
    kind = stream.type if isinstance(stream, mx.Device) else stream
    return kind == mx.DeviceType.gpu and cuda_available()


def kv_heads_per_block(h_kv: int, head_dim: int, itemsize: int) -> int:
    """How many consecutive KV heads one block reads side by side: the most that divide H_kv and
    fit its THREADS / (head_dim * itemsize / 16) workers (a worker reads one head of one token,
    16 bytes per lane)."""
    workers = THREADS * 16 // (head_dim * itemsize)
    return max(k for k in range(1, min(h_kv, workers) + 1) if h_kv % k == 0)


def choose_kv_heads(batch: int, h_kv: int, slices: int, head_dim: int, itemsize: int) -> int:
    """KV heads per block for a launch: the most that divide H_kv, fit the block
    (`kv_heads_per_block`) and still leave TARGET_BLOCKS blocks of (sequence, group of KV heads,
    slice); else 1. Blocks of fewer heads cover more tokens each: splitting into them is cheaper
    than split-K, which writes a partial result per range for the merge to read back."""
    most = kv_heads_per_block(h_kv, head_dim, itemsize)
    for k in range(most, 1, -1):
        if h_kv % k == 0 and batch * (h_kv // k) * slices >= TARGET_BLOCKS:
            return k
    return 1


def choose_partitions(pairs: int, capacity: int) -> int:
    """How many ranges of tokens split-K cuts a context of up to `capacity` tokens into, when
    `pairs` blocks (sequence x group of KV heads x head slice) would each read a whole context:
    enough for about TARGET_BLOCKS blocks, each range at least MIN_PARTITION tokens. 1 means
    one pass."""
    tokens = max(MIN_PARTITION, math.ceil(capacity * pairs / TARGET_BLOCKS))
    return max(1, math.ceil(capacity / tokens))


# -- argument checks and launch parameters (provided) -------------------------------------------
def _check_args(query, key_cache, value_cache, block_tables, context_lens) -> None:
    """The C++ op's checks (paged_attention.cpp), for the CUDA path: shapes and dtypes only.
    Index *values* are checked by the caller when they are host data; the kernel turns a bad
    length or block id it meets into NaN and never reads outside the pool."""
    for name, a in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache)):
        if not isinstance(a, mx.array):
            raise TypeError(f"{name} must be an mx.array, got {type(a).__name__}")
        if a.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {a.dtype}")
    if not query.dtype == key_cache.dtype == value_cache.dtype:
        raise TypeError(
            f"query {query.dtype}, key_cache {key_cache.dtype}, value_cache "
            f"{value_cache.dtype}: they must match"
        )
    for name, a, ndim in (("block_tables", block_tables, 2), ("context_lens", context_lens, 1)):
        if not isinstance(a, mx.array) or a.dtype != mx.int32:
            raise TypeError(f"{name} must be an int32 mx.array, got {getattr(a, 'dtype', a)}")
        if a.ndim != ndim:
            raise ValueError(f"{name} must have {ndim} dimension(s), got shape {a.shape}")
    if query.ndim != 3:
        raise ValueError(f"query must be [B, H_q, D] (one token per sequence), got {query.shape}")
    if key_cache.ndim != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(
            f"key_cache {key_cache.shape} and value_cache {value_cache.shape} must both be "
            "[num_blocks, block_size, H_kv, D]"
        )
    if min(key_cache.shape) < 1:
        raise ValueError(f"the caches are empty: {key_cache.shape}")
    if key_cache.shape[0] * key_cache.shape[1] > 2**31 - 1:
        raise ValueError("more than 2^31 - 1 slots: int32 slots cannot name them")
    batch, h_q, d = query.shape
    h_kv = key_cache.shape[2]
    if key_cache.shape[3] != d:
        raise ValueError(f"query {query.shape} has head dim {d}, the cache {key_cache.shape}")
    if d not in KERNEL_HEAD_DIMS:
        raise ValueError(f"head dim {d} has no kernel (64 or 128); use paged_attention_mlx")
    if h_q < 1 or h_q % h_kv:
        raise ValueError(f"{h_q} query heads do not divide into {h_kv} KV heads")
    if block_tables.shape[0] != batch or context_lens.shape[0] != batch:
        raise ValueError(
            f"{batch} queries, but block_tables {block_tables.shape} and context_lens "
            f"{context_lens.shape}"
        )
    if block_tables.shape[1] < 1:
        raise ValueError(f"block_tables {block_tables.shape} has no columns")


@functools.lru_cache(maxsize=256)
def _params(
    num_blocks, block_size, max_blocks, h_q, h_kv, slices, part_tokens, partitions, scale, kvg
) -> mx.array:
    """The kernel's int32 parameters (the Metal kernel's PagedAttentionParams), the scale as
    its float32 bits, then log2(block_size) when it is a power of two (else -1). Cached: the
    paged cache asks for the same ones in every layer."""
    bits = int(np.float32(scale).view(np.int32))
    shift = block_size.bit_length() - 1 if block_size & (block_size - 1) == 0 else -1
    p = [num_blocks, block_size, max_blocks, h_q, h_kv, slices, part_tokens, partitions, bits, kvg]
    p.append(shift)
    return mx.array(p, dtype=mx.int32)


# -- the CUDA text --------------------------------------------------------------------------------
# Provided: helpers both kernels use. Placed before the generated kernel, at global scope.
HELPERS = r"""
#define PAGED_THREADS 128
#define PAGED_WARPS (PAGED_THREADS / 32)
#define PAGED_FULL_MASK 0xffffffffu

__device__ __forceinline__ float paged_nan() { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ float paged_neg_inf() { return __int_as_float(0xff800000); }

// 16 bytes of T from p: one vector load when the address allows it.
template <typename T>
__device__ __forceinline__ uint4 paged_load16(const T* p, bool aligned) {
  if (aligned) {
    return *reinterpret_cast<const uint4*>(p);
  }
  uint4 u;
  T* e = reinterpret_cast<T*>(&u);
#pragma unroll
  for (int i = 0; i < int(16 / sizeof(T)); ++i) {
    e[i] = p[i];
  }
  return u;
}

// Element i of 16 bytes of T, as a float.
template <typename T>
__device__ __forceinline__ float paged_elem(const uint4& u, int i) {
  return static_cast<float>(reinterpret_cast<const T*>(&u)[i]);
}
"""


# -- task 1: the attention kernel ------------------------------------------------------------------
def attention_source() -> str:
    """CUDA text defining `paged_attend<T, D, HEADS, SPLIT>(...)`, the device function the two
    attention kernels call (see `_kernels`); placed after HELPERS."""
    # TODO(Week 3 Day 2 (NVIDIA), task 1): return the CUDA text of
    #   template <typename T, int D, int HEADS, bool SPLIT>
    #   __device__ __forceinline__ void paged_attend(
    #       const T* query, const T* key_cache, const T* value_cache, const int* block_tables,
    #       const int* context_lens, const int* params,
    #       T* out, float* max_logits, float* exp_sums, float* partial)
    # (the bodies in `_kernels` call it; book/src/week3-cuda.md walks through the reference).
    # One block of PAGED_THREADS threads = (partition p = blockIdx.x, sequence b = blockIdx.y,
    # group of kvg KV heads x slice of their query heads = blockIdx.z; slice = blockIdx.z %
    # slices). params = num_blocks, block_size, max_blocks, H_q, H_kv, slices, part_tokens,
    # partitions, the scale's float bits (__int_as_float), kvg.
    # 1. Lanes: VEC = 16 / sizeof(T) elements per 16-byte load (paged_load16), LANES = D / VEC
    #    lanes read one head of one token: a "worker". Worker w reads KV head (group's first) +
    #    w % kvg, token slot w / kvg; tpw = WORKERS / kvg token slots (workers past kvg * tpw
    #    idle), so the block reads whole stretches of each row [H_kv, D] as they lie in memory.
    # 2. len = context_lens[b]; outside [1, max_blocks * block_size] is "bad" (NaN output, no
    #    reads). Partition p covers tokens [p * part_tokens, ...) up to len; a block whose
    #    partition starts past len returns at once (SPLIT only; the merge skips it).
    # 3. q: this lane's VEC elements of each of its KV head's `count` query heads, times scale.
    # 4. Loop over the partition with bounds that are the same for the whole block (so every
    #    lane reaches every __shfl_xor_sync): token t -> block_tables[b, t / block_size], row
    #    t % block_size; a block id outside [0, num_blocks) is bad and is not read. Load a few
    #    tokens' K and V (16 bytes each) before using any: memory latency is what you hide.
    # 5. Score = lane's part of q . k, summed over the worker's LANES lanes with
    #    __shfl_xor_sync(0xffffffff, s, o), o = LANES / 2 ... 1 (Metal: simd_sum). Keeping the
    #    scores in base 2 (q times scale * log2(e), then exp2f) saves instructions; the merge
    #    (task 3) must then use exp2f too.
    # 6. Online softmax per head: m (max), l (sum of exp), acc[VEC] (weighted sum of v);
    #    a new max rescales l and acc by exp(m_old - m_new).
    # 7. Merge the workers of each KV head through __shared__ arrays; __syncthreads_or(bad) is
    #    the barrier and tells whether any lane met a bad block id.
    # 8. SPLIT: write max_logits/exp_sums [B, H_q, partitions] and the unnormalised partial
    #    [B, H_q, partitions, D] of slot (b * H_q + head) * partitions + p. Else out = acc / l.
    raise NotImplementedError(
        "Week 3 Day 2 (NVIDIA), task 1: implement `attention_source` in "
        "src/tiny_llm/paged_attention_cuda.py"
    )


# -- task 3: merging the partitions ---------------------------------------------------------------
def reduce_source() -> str:
    """CUDA text defining `paged_reduce<T, D>(...)`, the split-K merge; placed after HELPERS."""
    # TODO(Week 3 Day 2 (NVIDIA), task 3): return the CUDA text of
    #   template <typename T, int D>
    #   __device__ __forceinline__ void paged_reduce(
    #       const float* max_logits, const float* exp_sums, const float* partial,
    #       const int* context_lens, const int* params, T* out)
    # One block of D threads per (query head h = blockIdx.y, sequence b = blockIdx.z); thread
    # d writes out[b, h, d]. Only the ceil(len / part_tokens) partitions that hold tokens were
    # written: M = their largest max, weight each by exp(m_p - M), out = sum(weight * partial)
    # / sum(weight * exp_sum). A bad length, or a NaN max (a bad block id), gives NaN.
    raise NotImplementedError(
        "Week 3 Day 2 (NVIDIA), task 3: implement `reduce_source` in "
        "src/tiny_llm/paged_attention_cuda.py"
    )


# -- the kernels (provided) -----------------------------------------------------------------------
_ONE_PASS_BODY = (
    "paged_attend<T, D, HEADS, false>(query, key_cache, value_cache, block_tables, "
    "context_lens, params, out, nullptr, nullptr, nullptr);"
)
_SPLIT_BODY = (
    "paged_attend<T, D, HEADS, true>(query, key_cache, value_cache, block_tables, "
    "context_lens, params, nullptr, max_logits, exp_sums, partial);"
)
_REDUCE_BODY = "paged_reduce<T, D>(max_logits, exp_sums, partial, context_lens, params, out);"
_ATTENTION_INPUTS = ["query", "key_cache", "value_cache", "block_tables", "context_lens", "params"]


@functools.cache
def _kernels():
    """(one pass, split, reduce) kernel objects. Each name carries a hash of its text: MLX keeps
    compiled kernels on disk by name (under /tmp/mlx), so an edited text gets a new name rather
    than an old binary."""

    def kernel(name, header, body, inputs, outputs):
        digest = hashlib.sha1((header + body).encode()).hexdigest()[:10]
        return mx.fast.cuda_kernel(
            name=f"{name}_{digest}",
            input_names=inputs,
            output_names=outputs,
            source=body,
            header=header,
        )

    attention = HELPERS + attention_source()
    return (
        kernel("paged_attention", attention, _ONE_PASS_BODY, _ATTENTION_INPUTS, ["out"]),
        kernel(
            "paged_attention_split",
            attention,
            _SPLIT_BODY,
            _ATTENTION_INPUTS,
            ["max_logits", "exp_sums", "partial"],
        ),
        kernel(
            "paged_attention_reduce",
            HELPERS + reduce_source(),
            _REDUCE_BODY,
            ["max_logits", "exp_sums", "partial", "context_lens", "params"],
            ["out"],
        ),
    )


# -- task 2: the launch ---------------------------------------------------------------------------
def paged_attention_cuda(
    query: mx.array,
    key_cache: mx.array,
    value_cache: mx.array,
    block_tables: mx.array,
    context_lens: mx.array,
    scale: float,
    *,
    partitions: int | None = None,
    stream: mx.Stream | mx.Device | None = None,
) -> mx.array:
    """Paged decode attention on a CUDA GPU: query [B, H_q, D] -> [B, H_q, D].

    `block_tables` [B, max_blocks] and `context_lens` [B] are int32 mx.arrays whose values the
    caller has checked (or not: a bad length or block id gives NaN for that sequence).
    `partitions`: None picks with `choose_partitions`; 1 runs the one-pass kernel; n > 1 cuts
    each context into n ranges of ceil(max_blocks * block_size / n) tokens (split-K).
    """
    _check_args(query, key_cache, value_cache, block_tables, context_lens)
    if partitions is not None and (isinstance(partitions, bool) or not isinstance(partitions, int)):
        raise TypeError(f"partitions must be an int or None, got {type(partitions).__name__}")
    if partitions is not None and partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    # TODO(Week 3 Day 2 (NVIDIA), task 2): launch the kernels of `_kernels()`.
    # 1. heads = min(H_q / H_kv, MAX_HEADS) query heads of each KV head per block, slices =
    #    ceil(group / heads), kvg = choose_kv_heads(B, H_kv, slices, D, query.dtype.size),
    #    capacity = max_blocks * block_size. partitions None: choose_partitions(B * (H_kv / kvg) * slices,
    #    capacity). part_tokens = ceil(capacity / partitions), then recompute partitions =
    #    ceil(capacity / part_tokens) (no partition may start past the capacity).
    # 2. params = _params(num_blocks, block_size, max_blocks, H_q, H_kv, slices, part_tokens,
    #    partitions, float(scale), kvg); inputs = [query, key_cache, value_cache, block_tables,
    #    context_lens, params]; template = [("T", dtype), ("D", D), ("HEADS", heads)].
    # 3. grid counts threads (as in Metal): (THREADS * partitions, B, (H_kv / kvg) * slices),
    #    threadgroup (THREADS, 1, 1). One pass: one output like the query. Split: outputs
    #    max_logits, exp_sums [B, H_q, partitions] and partial [B, H_q, partitions, D], all
    #    float32, then the reduce kernel with grid (D, H_q, B), threadgroup (D, 1, 1),
    #    template [("T", dtype), ("D", D)]. Pass stream=stream to every call.
    raise NotImplementedError(
        "Week 3 Day 2 (NVIDIA), task 2: implement `paged_attention_cuda` in "
        "src/tiny_llm/paged_attention_cuda.py"
    )
