// Week 2 Day 5, task 3: single-query (decode) attention over a contiguous KV
// cache on the GPU. The design below is the reference's; the chapter walks
// through it.
//
//   query [B, H_q, D], key/value [B, H_kv, S, D], lengths [B] int32
//   out[b, h] = softmax over t < lengths[b] of scale * q[b, h] . key[b, kv, t],
//               applied to value[b, kv, t], with kv = h / (H_q / H_kv)
//
// One threadgroup per (sequence b, KV head, slice of at most MAX_HEADS of the
// query heads that read that KV head), so every K/V row is read once for the
// whole query group. Its SIMDGROUPS SIMD-groups take the keys in turn
// (t = sg, sg + SIMDGROUPS, ...); inside a SIMD-group lane i holds dimensions
// [i * E, i * E + E) of every vector (E = D / 32), so one row is read by 32
// lanes side by side and simd_sum finishes each dot product. Each SIMD-group
// keeps an online softmax per query head (running max m, running sum l,
// running weighted sum of values acc), and the SIMD-groups' partial results
// are merged through threadgroup memory at the end.
// encode_decode_attention (decode_attention.cpp) binds the buffers.
#include <metal_stdlib>

#include "decode_attention_params.h"

using namespace metal;

template <typename T, int D>
[[kernel]] void decode_attention(
    device const T* query [[buffer(0)]],
    device const T* key [[buffer(1)]],
    device const T* value [[buffer(2)]],
    device const int* lengths [[buffer(3)]],
    device T* out [[buffer(4)]],
    constant DecodeAttentionParams& p [[buffer(5)]],
    uint3 group [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  // TODO(Week 2 Day 5, task 3):
  // - this threadgroup: sequence b = group.y; KV head = group.x / p.slices;
  //   its query heads start at kv_head * G + (group.x % p.slices) * MAX_HEADS
  //   (G = p.num_heads / p.num_kv_heads), at most MAX_HEADS of them;
  // - lengths[b * p.lengths_stride] outside [0, p.max_len]: write NaN to this
  //   group's outputs and return (a kernel cannot raise);
  // - each lane keeps E = D / 32 dimensions of every query (times p.scale)
  //   and of every running sum; SIMD-group sg takes keys sg, sg + SIMDGROUPS,
  //   ...; simd_sum finishes each dot product; keep m, l, acc per query head
  //   and rescale them whenever the maximum grows (online softmax);
  // - merge the SIMD-groups through threadgroup memory (rescale each to the
  //   largest maximum) and write out[b, h, :] as T; length 0 gives zeros.
  // Every address comes from the strides in p (elements, any sign).
  // DECODE_ATTENTION_SIMDGROUPS and DECODE_ATTENTION_MAX_HEADS are in
  // decode_attention_params.h.
}

// clang-format off
#define instantiate_decode_attention(type, host_name_, d)                   \
  template [[host_name(host_name_)]] [[kernel]] void                        \
  decode_attention<type, d>(                                                \
      device const type* query [[buffer(0)]],                               \
      device const type* key [[buffer(1)]],                                 \
      device const type* value [[buffer(2)]],                               \
      device const int* lengths [[buffer(3)]],                              \
      device type* out [[buffer(4)]],                                       \
      constant DecodeAttentionParams& p [[buffer(5)]],                      \
      uint3 group [[threadgroup_position_in_grid]],                         \
      uint tid [[thread_index_in_threadgroup]],                             \
      uint sg [[simdgroup_index_in_threadgroup]],                           \
      uint lane [[thread_index_in_simdgroup]]);

// Host names: decode_attention_<dtype>_d<D>, as encode_decode_attention builds them.
instantiate_decode_attention(float, "decode_attention_float32_d64", 64)
instantiate_decode_attention(float, "decode_attention_float32_d128", 128)
instantiate_decode_attention(half, "decode_attention_float16_d64", 64)
instantiate_decode_attention(half, "decode_attention_float16_d128", 128)
instantiate_decode_attention(bfloat, "decode_attention_bfloat16_d64", 64)
instantiate_decode_attention(bfloat, "decode_attention_bfloat16_d128", 128)
// clang-format on
