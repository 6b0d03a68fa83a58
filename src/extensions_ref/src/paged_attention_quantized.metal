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
  if (BITS == 8) {
    for (int e = 0; e < E; ++e) {
      out[e] = float(codes[e]) * scale + bias;
    }
  } else {
    for (int e = 0; e < E / 2; ++e) {
      const uchar byte = codes[e];
      out[2 * e] = float(byte & 0xF) * scale + bias;
      out[2 * e + 1] = float(byte >> 4) * scale + bias;
    }
  }
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
  constexpr int SIMDGROUPS = PAGED_ATTENTION_QUANTIZED_SIMDGROUPS;
  constexpr int MAX_HEADS = PAGED_ATTENTION_QUANTIZED_MAX_HEADS;
  constexpr int E = D / 32; // dimensions per lane
  constexpr int THREADS = 32 * SIMDGROUPS;
  constexpr int CODE_BYTES = D * BITS / 8; // per (slot, KV head)

  const int b = int(group.y);
  const int kv_head = int(group.x) / p.slices;
  const int slice = int(group.x) % p.slices;
  const int group_size = p.num_heads / p.num_kv_heads;
  const int h0 = kv_head * group_size + slice * MAX_HEADS;
  const int count = min(MAX_HEADS, group_size - slice * MAX_HEADS);
  device T* out_b = out + (int64_t(b) * p.num_heads + h0) * D;
  const int groups = D / p.group_size; // scale groups per (slot, KV head)
  // Where this lane's codes and its scale group sit inside a (slot, KV head).
  const int lane_code = int(lane) * E * BITS / 8;
  const int lane_group = int(lane) * E / p.group_size;

  // A GPU kernel cannot raise: an impossible length or block id makes this
  // sequence's output NaN, and nothing outside the pool is read.
  const int len = context_lens[b];
  bool bad = len < 1 || len > p.max_blocks * p.block_size;

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
    for (int r = 0; r < rows; ++r) {
      // (slot, KV head) index: the unit codes, scales and biases are laid
      // out in.
      const int64_t at =
          (int64_t(block) * p.block_size + r) * p.num_kv_heads + kv_head;
      const int64_t sb = at * groups + lane_group;
      float k[E];
      float v[E];
      dequantize_lane<BITS, E>(
          key_codes + at * CODE_BYTES + lane_code,
          float(key_scales[sb]),
          float(key_biases[sb]),
          k);
      dequantize_lane<BITS, E>(
          value_codes + at * CODE_BYTES + lane_code,
          float(value_scales[sb]),
          float(value_biases[sb]),
          v);
      for (int h = 0; h < MAX_HEADS; ++h) {
        if (h >= count) {
          break; // the same for every lane: simd_sum stays uniform
        }
        float s = 0.0f;
        for (int e = 0; e < E; ++e) {
          s += q[h][e] * k[e];
        }
        s = simd_sum(s);
        if (s > m[h]) { // a new maximum: rescale what was summed so far
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
