// Week 3 Day 2: decode attention through block tables on the GPU, and the
// write of new keys/values into their slots.
//
//   query        [B, H_q, D]
//   key_cache    [num_blocks, block_size, H_kv, D]   (value_cache likewise)
//   block_tables [B, max_blocks] int32, context_lens [B] int32
//   out[b, h] = softmax(scale * q[b, h] . k_t) applied to v_t, over the
//               context_lens[b] tokens t of sequence b: token t is row
//               t % block_size of block block_tables[b, t / block_size],
//               KV head h / (H_q / H_kv).
//
// One threadgroup per (sequence b, KV head, slice of at most MAX_HEADS of the
// query heads that read that KV head): each K/V row is read once for the
// whole group, straight from the pool through the table (no gathered copy).
// The SIMD-groups take the sequence's blocks in turn (block j goes to
// SIMD-group j % SIMDGROUPS); inside a SIMD-group lane i holds dimensions
// [i * E, i * E + E) of every vector (E = D / 32), so a row is read by 32
// lanes side by side and simd_sum finishes each dot product. Each SIMD-group
// keeps an online softmax per query head (running max m, running sum l,
// running weighted sum of values acc); the SIMD-groups' states are merged
// through threadgroup memory at the end.
// encode_paged_attention (paged_attention.cpp) binds the buffers.
#include <metal_stdlib>

#include "paged_attention_params.h"

using namespace metal;

template <typename T, int D>
[[kernel]] void paged_attention(
    device const T* query [[buffer(0)]],
    device const T* key_cache [[buffer(1)]],
    device const T* value_cache [[buffer(2)]],
    device const int* block_tables [[buffer(3)]],
    device const int* context_lens [[buffer(4)]],
    device T* out [[buffer(5)]],
    constant PagedAttentionParams& p [[buffer(6)]],
    uint3 group [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr int SIMDGROUPS = PAGED_ATTENTION_SIMDGROUPS;
  constexpr int MAX_HEADS = PAGED_ATTENTION_MAX_HEADS;
  constexpr int E = D / 32; // dimensions per lane
  constexpr int THREADS = 32 * SIMDGROUPS;

  // Which sequence, KV head and query heads [h0, h0 + count) this group has.
  const int b = int(group.y);
  const int kv_head = int(group.x) / p.slices;
  const int slice = int(group.x) % p.slices;
  const int group_size = p.num_heads / p.num_kv_heads;
  const int h0 = kv_head * group_size + slice * MAX_HEADS;
  const int count = min(MAX_HEADS, group_size - slice * MAX_HEADS);
  device T* out_b = out + (int64_t(b) * p.num_heads + h0) * D;
  const int64_t row = int64_t(p.num_kv_heads) * D; // elements between tokens

  // A GPU kernel cannot raise. A length or block id the host could not check
  // makes this sequence's output NaN, and nothing outside the pool is read.
  const int len = context_lens[b];
  bool bad = len < 1 || len > p.max_blocks * p.block_size;

  // This lane's slice of each query vector, scaled once here.
  float q[MAX_HEADS][E];
  float acc[MAX_HEADS][E];
  float m[MAX_HEADS];
  float l[MAX_HEADS];
  device const T* q_b = query + (int64_t(b) * p.num_heads + h0) * D + lane * E;
  for (int h = 0; h < MAX_HEADS; ++h) {
    for (int e = 0; e < E; ++e) {
      q[h][e] = h < count ? float(q_b[h * D + e]) * p.scale : 0.0f;
      acc[h][e] = 0.0f;
    }
    m[h] = -INFINITY;
    l[h] = 0.0f;
  }

  device const int* table = block_tables + int64_t(b) * p.max_blocks;
  const int blocks = bad ? 0 : (len + p.block_size - 1) / p.block_size;
  for (int j = int(sg); j < blocks; j += SIMDGROUPS) {
    const int block = table[j]; // logical block j -> physical block
    if (block < 0 || block >= p.num_blocks) {
      bad = true;
      break;
    }
    const int rows = min(p.block_size, len - j * p.block_size);
    const int64_t start =
        int64_t(block) * p.block_size * row + kv_head * D + lane * E;
    for (int r = 0; r < rows; ++r) {
      float k[E];
      float v[E];
      for (int e = 0; e < E; ++e) {
        k[e] = float(key_cache[start + r * row + e]);
        v[e] = float(value_cache[start + r * row + e]);
      }
      for (int h = 0; h < MAX_HEADS; ++h) {
        if (h >= count) {
          break; // the same for every lane: simd_sum stays uniform
        }
        float s = 0.0f;
        for (int e = 0; e < E; ++e) {
          s += q[h][e] * k[e];
        }
        s = simd_sum(s);
        // One exp per key: either the key sets a new maximum (rescale what
        // was summed so far) or it is weighted against the old one.
        if (s > m[h]) {
          const float c = exp(m[h] - s);
          l[h] = l[h] * c + 1.0f;
          for (int e = 0; e < E; ++e) {
            acc[h][e] = acc[h][e] * c + v[e];
          }
          m[h] = s;
        } else {
          const float w = exp(s - m[h]);
          l[h] += w;
          for (int e = 0; e < E; ++e) {
            acc[h][e] += w * v[e];
          }
        }
      }
    }
  }

  // Merge the SIMD-groups: rescale each one's state to the largest max.
  threadgroup float sg_m[SIMDGROUPS][MAX_HEADS];
  threadgroup float sg_l[SIMDGROUPS][MAX_HEADS];
  threadgroup float sg_acc[SIMDGROUPS][D];
  threadgroup int sg_bad[SIMDGROUPS];
  if (lane == 0) {
    for (int h = 0; h < MAX_HEADS; ++h) {
      sg_m[sg][h] = m[h];
      sg_l[sg][h] = l[h];
    }
    sg_bad[sg] = bad ? 1 : 0;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  bool any_bad = false;
  for (int i = 0; i < SIMDGROUPS; ++i) {
    any_bad = any_bad || sg_bad[i] != 0;
  }
  for (int h = 0; h < count; ++h) {
    float big_m = -INFINITY;
    for (int i = 0; i < SIMDGROUPS; ++i) {
      big_m = max(big_m, sg_m[i][h]);
    }
    float big_l = 0.0f;
    for (int i = 0; i < SIMDGROUPS; ++i) {
      big_l += sg_l[i][h] * exp(sg_m[i][h] - big_m);
    }
    // A SIMD-group that saw no key has m = -inf and contributes 0.
    const float mine = exp(m[h] - big_m);
    for (int e = 0; e < E; ++e) {
      sg_acc[sg][lane * E + e] = acc[h][e] * mine;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int d = int(tid); d < D; d += THREADS) {
      float o = 0.0f;
      for (int i = 0; i < SIMDGROUPS; ++i) {
        o += sg_acc[i][d];
      }
      out_b[h * D + d] = any_bad ? T(NAN) : T(o / big_l);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}

// Copies a cache of any layout (4-D, strides in elements) into the
// row-major output, one thread per element; used when the output cannot take
// over the input's buffer.
template <typename T>
[[kernel]] void paged_cache_copy(
    device const T* src [[buffer(0)]],
    device T* dst [[buffer(1)]],
    constant uint& n [[buffer(2)]],
    constant int* shape [[buffer(3)]],
    constant int64_t* strides [[buffer(4)]],
    uint i [[thread_position_in_grid]]) {
  if (i >= n) {
    return;
  }
  int64_t offset = 0;
  uint rest = i;
  for (int axis = 3; axis >= 0; --axis) {
    const uint extent = uint(shape[axis]);
    offset += int64_t(rest % extent) * strides[axis];
    rest /= extent;
  }
  dst[i] = src[offset];
}

// Token t's row ([T, H_kv, D], row = H_kv * D elements) goes to slot
// slot_mapping[t] of the cache; a slot < 0 (padding) or past the pool is
// skipped. One thread per (element of a row, token). reshape_and_cache runs it
// once for the key cache and once for the value cache.
template <typename T>
[[kernel]] void reshape_and_cache(
    device const T* rows [[buffer(0)]],
    device const int* slot_mapping [[buffer(1)]],
    device T* cache [[buffer(2)]],
    constant int& row [[buffer(3)]],
    constant int& num_slots [[buffer(4)]],
    uint2 pos [[thread_position_in_grid]]) {
  const int slot = slot_mapping[pos.y];
  if (int(pos.x) >= row || slot < 0 || slot >= num_slots) {
    return;
  }
  cache[int64_t(slot) * row + pos.x] = rows[int64_t(pos.y) * row + pos.x];
}

// clang-format off
#define instantiate_paged_attention(type, d, name)                             \
  template [[host_name(name)]] [[kernel]] void                                 \
  paged_attention<type, d>(                                                    \
      device const type* query [[buffer(0)]],                                  \
      device const type* key_cache [[buffer(1)]],                              \
      device const type* value_cache [[buffer(2)]],                            \
      device const int* block_tables [[buffer(3)]],                            \
      device const int* context_lens [[buffer(4)]],                            \
      device type* out [[buffer(5)]],                                          \
      constant PagedAttentionParams& p [[buffer(6)]],                          \
      uint3 group [[threadgroup_position_in_grid]],                            \
      uint tid [[thread_index_in_threadgroup]],                                \
      uint sg [[simdgroup_index_in_threadgroup]],                              \
      uint lane [[thread_index_in_simdgroup]]);

#define instantiate_cache_write(type, copy_name, write_name)                   \
  template [[host_name(copy_name)]] [[kernel]] void                            \
  paged_cache_copy<type>(                                                      \
      device const type* src [[buffer(0)]],                                    \
      device type* dst [[buffer(1)]],                                          \
      constant uint& n [[buffer(2)]],                                          \
      constant int* shape [[buffer(3)]],                                       \
      constant int64_t* strides [[buffer(4)]],                                 \
      uint i [[thread_position_in_grid]]);                                     \
  template [[host_name(write_name)]] [[kernel]] void                           \
  reshape_and_cache<type>(                                                     \
      device const type* rows [[buffer(0)]],                                   \
      device const int* slot_mapping [[buffer(1)]],                            \
      device type* cache [[buffer(2)]],                                        \
      constant int& row [[buffer(3)]],                                         \
      constant int& num_slots [[buffer(4)]],                                   \
      uint2 pos [[thread_position_in_grid]]);

// Host names as encode_paged_attention / encode_reshape_and_cache build them.
instantiate_paged_attention(float, 64, "paged_attention_float32_d64")
instantiate_paged_attention(float, 128, "paged_attention_float32_d128")
instantiate_paged_attention(half, 64, "paged_attention_float16_d64")
instantiate_paged_attention(half, 128, "paged_attention_float16_d128")
instantiate_paged_attention(bfloat, 64, "paged_attention_bfloat16_d64")
instantiate_paged_attention(bfloat, 128, "paged_attention_bfloat16_d128")
instantiate_cache_write(float, "paged_cache_copy_float32", "reshape_and_cache_float32")
instantiate_cache_write(half, "paged_cache_copy_float16", "reshape_and_cache_float16")
instantiate_cache_write(bfloat, "paged_cache_copy_bfloat16", "reshape_and_cache_bfloat16")
// clang-format on
