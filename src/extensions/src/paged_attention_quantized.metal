// Week 3 Day 9: decode attention through block tables over a quantized pool,
// on the GPU. Day 2's kernel (paged_attention.metal) with one change: a lane
// does not load its E = D / 32 dimensions of a key or value row as floats but
// decodes them from codes, scale and bias, in registers.
//
//   query        [B, H_q, D]                                 T
//   *_codes      [num_blocks, block_size, H_kv, D * BITS / 8]  uchar; 4-bit:
//                element 2i in the low nibble of byte i, 2i + 1 in the high
//   *_scales     [num_blocks, block_size, H_kv, D / group_size]  half
//   *_biases     likewise; element i = code_i * scale + bias of its group
//   block_tables [B, max_blocks] int32, context_lens [B] int32
//
// One threadgroup per (sequence b, KV head, slice of at most MAX_HEADS query
// heads that read that KV head). SIMD-group sg takes logical blocks sg,
// sg + SIMDGROUPS, ...; lane i owns dimensions [i * E, i * E + E), which lie
// in one scale group (E <= 4 divides group_size), and simd_sum finishes each
// dot product. Online softmax per query head; the SIMD-groups' states are
// merged through threadgroup memory at the end.
// encode_paged_attention_quantized (paged_attention_quantized.cpp) binds the
// buffers.
#include <metal_stdlib>

#include "paged_attention_quantized_params.h"

using namespace metal;

// A lane's E elements of one row: `codes` points at the lane's first code
// byte, scale and bias are its group's.
template <int BITS, int E>
inline void dequantize_lane(
    device const uchar* codes, float scale, float bias, thread float* out) {
  // TODO(Week 3 Day 9, task 8): out[e] = code_e * scale + bias for the E
  // elements; BITS == 8: codes[e]; BITS == 4: byte codes[e / 2], element 2i
  // in the low nibble (byte & 0xF), 2i + 1 in the high one (byte >> 4).
}

template <typename T, int D, int BITS>
[[kernel]] void paged_attention_quantized(
    device const T* query [[buffer(0)]],
    device const uchar* key_codes [[buffer(1)]],
    device const half* key_scales [[buffer(2)]],
    device const half* key_biases [[buffer(3)]],
    device const uchar* value_codes [[buffer(4)]],
    device const half* value_scales [[buffer(5)]],
    device const half* value_biases [[buffer(6)]],
    device const int* block_tables [[buffer(7)]],
    device const int* context_lens [[buffer(8)]],
    device T* out [[buffer(9)]],
    constant PagedAttentionQuantizedParams& p [[buffer(10)]],
    uint3 group [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  // TODO(Week 3 Day 9, task 8): your Day 2 kernel (paged_attention.metal),
  // with the loads of a key and a value row replaced by decoding.
  // - Same threadgroup layout: b = group.y, kv_head = group.x / p.slices,
  //   query heads [h0, h0 + count), lane owns dimensions [lane * E, lane * E +
  //   E) with E = D / 32, SIMD-group sg takes logical blocks sg, sg +
  //   SIMDGROUPS, ...; the constants are in paged_attention_quantized_params.h.
  // - Token r of physical block `block`, KV head kv_head, is the unit the
  //   three arrays are laid out in: at = (block * block_size + r) *
  //   num_kv_heads + kv_head. Its codes start at at * (D * BITS / 8), this
  //   lane's at + lane * E * BITS / 8 bytes in; its scale and bias are
  //   scales[at * (D / group_size) + lane * E / group_size] (one group: E
  //   divides group_size).
  // - dequantize_lane<BITS, E>(...) gives the lane's E floats of k and of v;
  //   then the online softmax, the merge of the SIMD-groups and the NaN rule
  //   for bad lengths or block ids exactly as on Day 2.
}

// clang-format off
#define instantiate_paged_attention_quantized(type, d, bits, name)             \
  template [[host_name(name)]] [[kernel]] void                                 \
  paged_attention_quantized<type, d, bits>(                                    \
      device const type* query [[buffer(0)]],                                  \
      device const uchar* key_codes [[buffer(1)]],                             \
      device const half* key_scales [[buffer(2)]],                             \
      device const half* key_biases [[buffer(3)]],                             \
      device const uchar* value_codes [[buffer(4)]],                           \
      device const half* value_scales [[buffer(5)]],                           \
      device const half* value_biases [[buffer(6)]],                           \
      device const int* block_tables [[buffer(7)]],                            \
      device const int* context_lens [[buffer(8)]],                            \
      device type* out [[buffer(9)]],                                          \
      constant PagedAttentionQuantizedParams& p [[buffer(10)]],                \
      uint3 group [[threadgroup_position_in_grid]],                            \
      uint tid [[thread_index_in_threadgroup]],                                \
      uint sg [[simdgroup_index_in_threadgroup]],                              \
      uint lane [[thread_index_in_simdgroup]]);

// Host names as encode_paged_attention_quantized builds them.
instantiate_paged_attention_quantized(float, 64, 4, "paged_attention_quantized_float32_d64_b4")
instantiate_paged_attention_quantized(float, 64, 8, "paged_attention_quantized_float32_d64_b8")
instantiate_paged_attention_quantized(float, 128, 4, "paged_attention_quantized_float32_d128_b4")
instantiate_paged_attention_quantized(float, 128, 8, "paged_attention_quantized_float32_d128_b8")
instantiate_paged_attention_quantized(half, 64, 4, "paged_attention_quantized_float16_d64_b4")
instantiate_paged_attention_quantized(half, 64, 8, "paged_attention_quantized_float16_d64_b8")
instantiate_paged_attention_quantized(half, 128, 4, "paged_attention_quantized_float16_d128_b4")
instantiate_paged_attention_quantized(half, 128, 8, "paged_attention_quantized_float16_d128_b8")
instantiate_paged_attention_quantized(bfloat, 64, 4, "paged_attention_quantized_bfloat16_d64_b4")
instantiate_paged_attention_quantized(bfloat, 64, 8, "paged_attention_quantized_bfloat16_d64_b8")
instantiate_paged_attention_quantized(bfloat, 128, 4, "paged_attention_quantized_bfloat16_d128_b4")
instantiate_paged_attention_quantized(bfloat, 128, 8, "paged_attention_quantized_bfloat16_d128_b8")
    // clang-format on
