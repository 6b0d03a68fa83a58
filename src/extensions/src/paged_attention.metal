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
  // TODO(Week 3 Day 2, task 5): decode attention through the block table.
  // - This group: sequence b = group.y; KV head kv_head = group.x / p.slices;
  //   query heads [h0, h0 + count) with group_size = num_heads / num_kv_heads,
  //   h0 = kv_head * group_size + (group.x % p.slices) * MAX_HEADS and
  //   count = min(MAX_HEADS, group_size - (group.x % p.slices) * MAX_HEADS).
  // - Lane `lane` owns dimensions [lane * E, lane * E + E) (E = D / 32) of
  //   every vector: load those of each query (times p.scale) into registers.
  // - SIMD-group sg takes logical blocks j = sg, sg + SIMDGROUPS, ...; the
  //   physical block is block_tables[b * max_blocks + j]; token r of it is at
  //   (block * block_size + r) * num_kv_heads * D + kv_head * D. For each key:
  //   s = simd_sum(partial dot), then the online softmax update of (m, l, acc).
  // - Merge the SIMD-groups' (m, l, acc) through threadgroup memory (rescale
  //   each by exp(m_sg - max m)), write out[b, h] = acc / l as T.
  // - A length outside [1, max_blocks * block_size] or a block id outside
  //   [0, num_blocks) cannot raise here: write NaN for the sequence instead,
  //   and never read outside the pool.
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
  // TODO(Week 3 Day 2, task 6): thread (pos.x, pos.y) copies element pos.x
  // of token pos.y's row to row slot_mapping[pos.y] of the cache; skip
  // pos.x >= row and slots outside [0, num_slots).
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
