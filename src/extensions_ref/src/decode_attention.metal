// Week 2 Day 5, task 3: single-query (decode) attention over a contiguous KV
// cache on the GPU.
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
  constexpr int SIMDGROUPS = DECODE_ATTENTION_SIMDGROUPS;
  constexpr int MAX_HEADS = DECODE_ATTENTION_MAX_HEADS;
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

  // A GPU kernel cannot raise: a length outside [0, S] makes this sequence's
  // output NaN, and no key is read.
  const int len = lengths[b * p.lengths_stride];
  if (len < 0 || len > p.max_len) {
    for (int i = int(tid); i < count * D; i += THREADS) {
      out_b[i] = T(NAN);
    }
    return;
  }

  // This lane's slice of each query vector, scaled once here. (The row index
  // is clamped so that no address past the last head is even formed.)
  float q[MAX_HEADS][E];
  for (int g = 0; g < MAX_HEADS; ++g) {
    device const T* q_row = query + b * p.q_strides[0] +
                            min(h0 + g, p.num_heads - 1) * p.q_strides[1];
    for (int e = 0; e < E; ++e) {
      const int d = int(lane) * E + e;
      q[g][e] = g < count ? p.scale * float(q_row[d * p.q_strides[2]]) : 0.0f;
    }
  }

  // Online softmax state for this SIMD-group's keys. m starts below any real
  // score but not at -inf, nor so low that m - score overflows to -inf:
  // Metal compiles with fast math, where infinities are not guaranteed to
  // behave. exp(-1e30 - score) is simply 0.
  float m[MAX_HEADS];
  float l[MAX_HEADS];
  float acc[MAX_HEADS][E];
  for (int g = 0; g < MAX_HEADS; ++g) {
    m[g] = -1e30f;
    l[g] = 0.0f;
    for (int e = 0; e < E; ++e) {
      acc[g][e] = 0.0f;
    }
  }

  device const T* k_seq = key + b * p.k_strides[0] + kv_head * p.k_strides[1];
  device const T* v_seq = value + b * p.v_strides[0] + kv_head * p.v_strides[1];
  for (int t = int(sg); t < len; t += SIMDGROUPS) {
    device const T* k_row = k_seq + t * p.k_strides[2];
    device const T* v_row = v_seq + t * p.v_strides[2];
    float k[E];
    float v[E];
    for (int e = 0; e < E; ++e) {
      const int d = int(lane) * E + e;
      k[e] = float(k_row[d * p.k_strides[3]]);
      v[e] = float(v_row[d * p.v_strides[3]]);
    }
    for (int g = 0; g < MAX_HEADS; ++g) {
      if (g >= count) {
        break; // the same for every lane: simd_sum stays uniform
      }
      float partial = 0.0f;
      for (int e = 0; e < E; ++e) {
        partial += q[g][e] * k[e];
      }
      const float s = simd_sum(partial); // the whole dot product, every lane
      // Rescale what was summed under the old maximum to the new one.
      const float m_new = max(m[g], s);
      const float correction = exp(m[g] - m_new);
      const float w = exp(s - m_new);
      l[g] = l[g] * correction + w;
      for (int e = 0; e < E; ++e) {
        acc[g][e] = acc[g][e] * correction + w * v[e];
      }
      m[g] = m_new;
    }
  }

  // Merge the SIMD-groups: rescale each partial result to the largest of
  // their maxima, add, divide by the rescaled sum. A SIMD-group that saw no
  // key (l == 0) contributes nothing; a sequence with no keys gets zeros.
  threadgroup float tg_m[SIMDGROUPS][MAX_HEADS];
  threadgroup float tg_l[SIMDGROUPS][MAX_HEADS];
  threadgroup float tg_acc[SIMDGROUPS][D];
  if (lane == 0) {
    for (int g = 0; g < MAX_HEADS; ++g) {
      tg_m[sg][g] = m[g];
      tg_l[sg][g] = l[g];
    }
  }
  for (int g = 0; g < MAX_HEADS; ++g) {
    if (g >= count) {
      break;
    }
    for (int e = 0; e < E; ++e) {
      tg_acc[sg][int(lane) * E + e] = acc[g][e];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (int(tid) < D) {
      float big_m = -numeric_limits<float>::max();
      for (int i = 0; i < SIMDGROUPS; ++i) {
        if (tg_l[i][g] > 0.0f) {
          big_m = max(big_m, tg_m[i][g]);
        }
      }
      float big_l = 0.0f;
      float o = 0.0f;
      for (int i = 0; i < SIMDGROUPS; ++i) {
        if (tg_l[i][g] > 0.0f) {
          const float f = exp(tg_m[i][g] - big_m);
          big_l += tg_l[i][g] * f;
          o += tg_acc[i][tid] * f;
        }
      }
      out_b[g * D + int(tid)] = T(big_l > 0.0f ? o / big_l : 0.0f);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup); // before tg_acc is reused
  }
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
