// Single-query (decode) attention over a paged KV cache, written the way the course's Week 3
// kernel is: one threadgroup per (query head, sequence), its SIMD-groups taking keys in turn,
// each SIMD-group keeping an online softmax (running max m, running sum l, weighted values),
// then the SIMD-groups combined through threadgroup memory. Grouped-query attention: query head
// h reads key/value head h / (num_heads / num_kv_heads).
//
//   q            [num_seqs, num_heads, D]
//   k_cache      [num_blocks, num_kv_heads, block_size, D]   (v_cache likewise)
//   block_tables [num_seqs, max_blocks] int32: the cache blocks of each sequence, in order
//   seq_lens     [num_seqs] int32
//   out          [num_seqs, num_heads, D]
#include <metal_stdlib>
using namespace metal;

struct DecodeParams {
  uint num_heads;
  uint num_kv_heads;
  uint max_blocks;
  uint block_size;
  float scale;
};

template <typename T, int D, int SIMDGROUPS>
kernel void paged_decode(device const T* q [[buffer(0)]], device const T* k_cache [[buffer(1)]],
                         device const T* v_cache [[buffer(2)]],
                         device const int* block_tables [[buffer(3)]],
                         device const int* seq_lens [[buffer(4)]], device T* out [[buffer(5)]],
                         constant DecodeParams& p [[buffer(6)]],
                         uint3 group [[threadgroup_position_in_grid]],
                         uint tid [[thread_index_in_threadgroup]],
                         uint sg [[simdgroup_index_in_threadgroup]],
                         uint lane [[thread_index_in_simdgroup]]) {
  constexpr int E = D / 32;  // dimensions per lane: lane owns [lane * E, lane * E + E)
  const uint head = group.x;
  const uint seq = group.y;
  const uint kv_head = head / (p.num_heads / p.num_kv_heads);
  const int len = seq_lens[seq];

  float qv[E];
  for (int e = 0; e < E; ++e)
    qv[e] = float(q[(seq * p.num_heads + head) * D + lane * E + e]) * p.scale;

  float m = -INFINITY;  // running max of the scores this SIMD-group has seen
  float l = 0.0f;       // running sum of exp(score - m)
  float acc[E];         // running sum of exp(score - m) * v, for this lane's dimensions
  for (int e = 0; e < E; ++e) acc[e] = 0.0f;

  for (int t = int(sg); t < len; t += SIMDGROUPS) {
    const int block = block_tables[seq * p.max_blocks + uint(t) / p.block_size];
    const uint slot = uint(t) % p.block_size;
    const ulong base =
        ((ulong(block) * p.num_kv_heads + kv_head) * p.block_size + slot) * D + lane * E;
    float s = 0.0f;
    for (int e = 0; e < E; ++e) s += qv[e] * float(k_cache[base + e]);
    s = simd_sum(s);  // the full dot product, in every lane
    const float m_new = max(m, s);
    const float correction = exp(m - m_new);
    const float w = exp(s - m_new);
    l = l * correction + w;
    for (int e = 0; e < E; ++e) acc[e] = acc[e] * correction + w * float(v_cache[base + e]);
    m = m_new;
  }

  threadgroup float sg_m[SIMDGROUPS];
  threadgroup float sg_l[SIMDGROUPS];
  threadgroup float sg_acc[SIMDGROUPS][D];
  if (lane == 0) {
    sg_m[sg] = m;
    sg_l[sg] = l;
  }
  for (int e = 0; e < E; ++e) sg_acc[sg][lane * E + e] = acc[e];
  threadgroup_barrier(mem_flags::mem_threadgroup);

  float big_m = -INFINITY;
  for (int i = 0; i < SIMDGROUPS; ++i) big_m = max(big_m, sg_m[i]);
  float big_l = 0.0f;
  for (int i = 0; i < SIMDGROUPS; ++i) big_l += sg_l[i] * exp(sg_m[i] - big_m);
  for (uint d = tid; d < uint(D); d += SIMDGROUPS * 32) {
    float o = 0.0f;
    for (int i = 0; i < SIMDGROUPS; ++i) o += sg_acc[i][d] * exp(sg_m[i] - big_m);
    out[(seq * p.num_heads + head) * D + d] = static_cast<T>(o / big_l);
  }
}

#define INSTANTIATE(name, T, D) \
  template [[host_name(name)]] [[kernel]] decltype(paged_decode<T, D, 8>) paged_decode<T, D, 8>;
INSTANTIATE("paged_decode_float32_d64", float, 64)
INSTANTIATE("paged_decode_float32_d128", float, 128)
INSTANTIATE("paged_decode_float16_d64", half, 64)
INSTANTIATE("paged_decode_float16_d128", half, 128)
INSTANTIATE("paged_decode_bfloat16_d64", bfloat, 64)
