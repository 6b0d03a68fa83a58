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

_ATTENTION = r"""
// paged_attend<T, D, HEADS, SPLIT>: one block of PAGED_THREADS threads = (partition p =
// blockIdx.x, sequence b = blockIdx.y, group of KV heads and slice of their query heads =
// blockIdx.z).
//
// In the pool, token t's keys for all KV heads are one row of H_kv * D numbers. LANES lanes read
// one head's D numbers with one 16-byte load each (lane `sub` holds elements [sub * VEC,
// sub * VEC + VEC)); such a team of lanes is a "worker". The block's workers cover `kvg`
// consecutive KV heads side by side, so together they read whole stretches of rows as they lie
// in memory, and one block serves several KV heads of a sequence. Each worker keeps an online
// softmax per query head of its KV head (max m, sum l, weighted sum of values acc) over its
// tokens; at the end the workers of a head merge through shared memory.
// Scores are kept in base 2 (q is scaled by scale * log2(e)): exp2f is one instruction.
//
// params: num_blocks, block_size, max_blocks, H_q, H_kv, slices, part_tokens, partitions,
// scale (float bits), kvg (KV heads per block), log2(block_size) or -1.
template <typename T, int D, int HEADS, bool SPLIT>
__device__ __forceinline__ void paged_attend(
    const T* __restrict__ query,
    const T* __restrict__ key_cache,
    const T* __restrict__ value_cache,
    const int* __restrict__ block_tables,
    const int* __restrict__ context_lens,
    const int* __restrict__ params,
    T* __restrict__ out,            // one pass: [B, H_q, D]
    float* __restrict__ max_logits, // split: [B, H_q, partitions]
    float* __restrict__ exp_sums,   // split: [B, H_q, partitions]
    float* __restrict__ partial) {  // split: [B, H_q, partitions, D]
  constexpr int VEC = 16 / sizeof(T);             // elements per 16-byte load
  constexpr int LANES = D / VEC;                  // lanes per worker (one head of one token)
  constexpr int WORKERS = PAGED_THREADS / LANES;  // workers per block
  // Tokens per worker in flight at once: the more bytes each warp has in flight, the closer
  // to the memory's bandwidth (8 beat 4 on an H100 when this kernel was tuned); the state of 8
  // query heads leaves registers for 4.
  constexpr int UNROLL = HEADS <= 4 ? 8 : 4;

  const int num_blocks = params[0];
  const int block_size = params[1];
  const int max_blocks = params[2];
  const int num_heads = params[3];
  const int num_kv_heads = params[4];
  const int slices = params[5];
  const int part_tokens = params[6];
  const int partitions = params[7];
  const float scale = __int_as_float(params[8]);
  const int kvg = params[9];
  const int bs_shift = params[10];  // log2(block_size), or -1
  const int tpw = WORKERS / kvg;  // tokens the block reads side by side

  const int p = blockIdx.x;
  const int b = blockIdx.y;
  const int slice = blockIdx.z % slices;
  const int group = num_heads / num_kv_heads;
  const int count = min(HEADS, group - slice * HEADS);  // query heads per KV head here

  const int worker = threadIdx.x / LANES;
  const int sub = threadIdx.x % LANES;
  const int head_slot = worker % kvg;
  const int tok_slot = worker / kvg;
  const bool active = tok_slot < tpw;  // workers past kvg * tpw only help with shuffles
  const int kv_head = (blockIdx.z / slices) * kvg + head_slot;
  const int h0 = kv_head * group + slice * HEADS;

  // A kernel cannot raise: a length or block id the host could not check makes this
  // sequence's output NaN, and no address outside the pool is formed.
  const int len = context_lens[b];
  bool bad = len < 1 || (long long)len > (long long)max_blocks * block_size;
  const int start = p * part_tokens;
  if (!bad && start >= len) {
    return;  // the whole block: a partition past this sequence's end (the merge skips it)
  }
  const int end = bad ? start : min(len, start + part_tokens);

  // This lane's slice of each of its KV head's query heads, scaled once (base 2: see above).
  const float q_scale = scale * 1.4426950408889634f;
  float q[HEADS][VEC];
  const T* q_b = query + ((long long)b * num_heads + h0) * D + sub * VEC;
#pragma unroll
  for (int h = 0; h < HEADS; ++h) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      q[h][e] = h < count ? static_cast<float>(q_b[h * D + e]) * q_scale : 0.0f;
    }
  }
  float m[HEADS], l[HEADS], acc[HEADS][VEC];
#pragma unroll
  for (int h = 0; h < HEADS; ++h) {
    m[h] = paged_neg_inf();
    l[h] = 0.0f;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      acc[h][e] = 0.0f;
    }
  }

  const int* table = block_tables + (long long)b * max_blocks;
  const long long row = (long long)num_kv_heads * D;  // elements from one token to the next
  const T* k_base = key_cache + kv_head * D + sub * VEC;
  const T* v_base = value_cache + kv_head * D + sub * VEC;
  const bool aligned =
      ((reinterpret_cast<unsigned long long>(key_cache) |
        reinterpret_cast<unsigned long long>(value_cache)) & 15ull) == 0;

  // The loop bounds are the same for the whole block: every lane reaches every shuffle.
  for (int base = start; base < end; base += tpw * UNROLL) {
    uint4 kr[UNROLL], vr[UNROLL];
    bool ok[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int t = base + u * tpw + tok_slot;
      ok[u] = active && t < end;
      kr[u] = make_uint4(0u, 0u, 0u, 0u);
      vr[u] = kr[u];
      if (ok[u]) {
        // Token -> (logical block, row): a shift and a mask for a power-of-two block size (the
        // kernel is short of instruction issue, not only of bandwidth), else a division.
        int lb, r;
        if (bs_shift >= 0) {
          lb = t >> bs_shift;
          r = t & (block_size - 1);
        } else {
          lb = t / block_size;
          r = t - lb * block_size;
        }
        const int block = table[lb];  // logical block -> physical block
        if (block < 0 || block >= num_blocks) {
          bad = true;
          ok[u] = false;
        } else {
          const long long at = ((long long)block * block_size + r) * row;
          kr[u] = paged_load16(k_base + at, aligned);
          vr[u] = paged_load16(v_base + at, aligned);
        }
      }
    }
    // Scores: each lane's part of q . k, summed over the LANES lanes of its worker.
    float s[HEADS][UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      float k[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        k[e] = paged_elem<T>(kr[u], e);
      }
#pragma unroll
      for (int h = 0; h < HEADS; ++h) {
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          dot += q[h][e] * k[e];
        }
        s[h][u] = dot;
      }
    }
#pragma unroll
    for (int h = 0; h < HEADS; ++h) {
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
        for (int o = LANES / 2; o > 0; o /= 2) {
          s[h][u] += __shfl_xor_sync(PAGED_FULL_MASK, s[h][u], o);
        }
      }
    }
    // Online softmax: rescale what was summed so far to the new maximum, add the new tokens.
#pragma unroll
    for (int h = 0; h < HEADS; ++h) {
      float new_m = m[h];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        new_m = ok[u] ? fmaxf(new_m, s[h][u]) : new_m;
      }
      const float c = new_m == paged_neg_inf() ? 0.0f : exp2f(m[h] - new_m);
      float sum = 0.0f;
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        s[h][u] = ok[u] ? exp2f(s[h][u] - new_m) : 0.0f;  // now the weight of token u
        sum += s[h][u];
      }
      l[h] = l[h] * c + sum;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        acc[h][e] *= c;
      }
      m[h] = new_m;
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float v = paged_elem<T>(vr[u], e);
#pragma unroll
        for (int h = 0; h < HEADS; ++h) {
          acc[h][e] += s[h][u] * v;
        }
      }
    }
  }

  // Merge the workers that share a KV head (tok_slot 0 .. tpw - 1) through shared memory.
  __shared__ float sm_m[WORKERS][HEADS];
  __shared__ float sm_l[WORKERS][HEADS];
  __shared__ float sm_acc[WORKERS][HEADS][D];
#pragma unroll
  for (int h = 0; h < HEADS; ++h) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      sm_acc[worker][h][sub * VEC + e] = acc[h][e];
    }
    if (sub == 0) {
      sm_m[worker][h] = m[h];
      sm_l[worker][h] = l[h];
    }
  }
  const bool any_bad = __syncthreads_or(bad) != 0;  // also the barrier for the writes above
  for (int i = threadIdx.x; i < kvg * count * D; i += PAGED_THREADS) {
    const int slot = i / (count * D);  // which KV head of the block
    const int h = (i / D) % count;
    const int d = i % D;
    float big_m = paged_neg_inf();
    for (int j = 0; j < tpw; ++j) {
      big_m = fmaxf(big_m, sm_m[j * kvg + slot][h]);
    }
    float big_l = 0.0f;
    float o = 0.0f;
    for (int j = 0; j < tpw; ++j) {
      const int w = j * kvg + slot;
      const float c = sm_m[w][h] == paged_neg_inf() ? 0.0f : exp2f(sm_m[w][h] - big_m);
      big_l += sm_l[w][h] * c;
      o += sm_acc[w][h][d] * c;
    }
    const int head_of_slot = ((blockIdx.z / slices) * kvg + slot) * group + slice * HEADS + h;
    const long long head = (long long)b * num_heads + head_of_slot;
    if constexpr (SPLIT) {
      const long long at = head * partitions + p;
      partial[at * D + d] = o;  // relative to this partition's own maximum
      if (d == 0) {
        max_logits[at] = any_bad ? paged_nan() : big_m;  // base 2
        exp_sums[at] = big_l;
      }
    } else {
      out[head * D + d] = any_bad ? T(paged_nan()) : T(o / big_l);
    }
  }
}
"""

_REDUCE = r"""
// paged_reduce<T, D>: merge the partitions of split-K. One block of D threads per
// (query head h = blockIdx.y, sequence b = blockIdx.z); thread d writes out[b, h, d].
template <typename T, int D>
__device__ __forceinline__ void paged_reduce(
    const float* __restrict__ max_logits,
    const float* __restrict__ exp_sums,
    const float* __restrict__ partial,
    const int* __restrict__ context_lens,
    const int* __restrict__ params,
    T* __restrict__ out) {
  const int block_size = params[1];
  const int max_blocks = params[2];
  const int num_heads = params[3];
  const int part_tokens = params[6];
  const int partitions = params[7];
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int d = threadIdx.x;
  const long long head = (long long)b * num_heads + h;
  T* o = out + head * D + d;

  const int len = context_lens[b];
  if (len < 1 || (long long)len > (long long)max_blocks * block_size) {
    *o = T(paged_nan());
    return;
  }
  // Only the partitions that hold tokens of this sequence were written.
  const int used = min(partitions, (len + part_tokens - 1) / part_tokens);
  const float* m = max_logits + head * partitions;
  const float* l = exp_sums + head * partitions;
  float big_m = paged_neg_inf();
  bool bad = false;
  for (int p = 0; p < used; ++p) {
    bad = bad || m[p] != m[p];  // NaN: that partition met a bad block id
    big_m = fmaxf(big_m, m[p]);
  }
  if (bad) {
    *o = T(paged_nan());
    return;
  }
  float big_l = 0.0f;
  float acc = 0.0f;
  for (int p = 0; p < used; ++p) {
    const float c = exp2f(m[p] - big_m);  // the maxima are in base 2
    big_l += l[p] * c;
    acc += partial[(head * partitions + p) * D + d] * c;
  }
  *o = T(acc / big_l);
}
"""


# -- task 1: the attention kernel ------------------------------------------------------------------
def attention_source() -> str:
    """CUDA text defining `paged_attend<T, D, HEADS, SPLIT>(...)`, the device function the two
    attention kernels call (see `_kernels`); placed after HELPERS."""
    return _ATTENTION


# -- task 3: merging the partitions ---------------------------------------------------------------
def reduce_source() -> str:
    """CUDA text defining `paged_reduce<T, D>(...)`, the split-K merge; placed after HELPERS."""
    return _REDUCE


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
    batch, h_q, d = query.shape
    num_blocks, block_size, h_kv, _ = key_cache.shape
    group = h_q // h_kv
    heads = min(group, MAX_HEADS)  # query heads of each KV head per block
    slices = -(-group // heads)
    kvg = choose_kv_heads(batch, h_kv, slices, d, query.dtype.size)
    capacity = block_tables.shape[1] * block_size
    if partitions is None:
        partitions = choose_partitions(batch * (h_kv // kvg) * slices, capacity)
    part_tokens = -(-capacity // partitions)
    partitions = -(-capacity // part_tokens)  # no partition that starts past the capacity
    params = _params(
        num_blocks,
        block_size,
        block_tables.shape[1],
        h_q,
        h_kv,
        slices,
        part_tokens,
        partitions,
        float(scale),
        kvg,
    )
    one_pass, split, reduce = _kernels()
    inputs = [query, key_cache, value_cache, block_tables, context_lens, params]
    template = [("T", query.dtype), ("D", d), ("HEADS", heads)]
    # grid counts threads: blocks are (partition, sequence, group of KV heads x slice).
    grid = (THREADS * partitions, batch, (h_kv // kvg) * slices)
    if partitions == 1:
        return one_pass(
            inputs=inputs,
            template=template,
            grid=grid,
            threadgroup=(THREADS, 1, 1),
            output_shapes=[query.shape],
            output_dtypes=[query.dtype],
            stream=stream,
        )[0]
    max_logits, exp_sums, partial = split(
        inputs=inputs,
        template=template,
        grid=grid,
        threadgroup=(THREADS, 1, 1),
        output_shapes=[
            (batch, h_q, partitions),
            (batch, h_q, partitions),
            (batch, h_q, partitions, d),
        ],
        output_dtypes=[mx.float32] * 3,
        stream=stream,
    )
    return reduce(
        inputs=[max_logits, exp_sums, partial, context_lens, params],
        template=[("T", query.dtype), ("D", d)],
        grid=(d, h_q, batch),
        threadgroup=(d, 1, 1),
        output_shapes=[query.shape],
        output_dtypes=[query.dtype],
        stream=stream,
    )[0]
