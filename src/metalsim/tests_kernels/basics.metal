// Small kernels for tests_refsol/test_course_metalsim.py: each exercises one part of the
// harness (dispatch, SIMD-group functions, barriers, threadgroup memory, types, atomics) or one
// of the mistakes it must report.
#include <metal_stdlib>
using namespace metal;

kernel void add_scaled(device const float* a [[buffer(0)]], device const float* b [[buffer(1)]],
                       device float* out [[buffer(2)]], constant uint& n [[buffer(3)]],
                       uint gid [[thread_position_in_grid]]) {
  if (gid >= n) return;
  out[gid] = a[gid] + 0.5 * b[gid];
}

// Every SIMD-group function, one row of `out` each: out[k * total + gid].
kernel void simd_ops(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                     uint gid [[thread_position_in_grid]], uint total [[threads_per_grid]],
                     uint lane [[thread_index_in_simdgroup]]) {
  float v = x[gid];
  out[0 * total + gid] = simd_sum(v);
  out[1 * total + gid] = simd_max(v);
  out[2 * total + gid] = simd_min(v);
  out[3 * total + gid] = simd_prefix_exclusive_sum(v);
  out[4 * total + gid] = simd_shuffle_xor(v, 5);
  out[5 * total + gid] = simd_broadcast(v, 3);
  out[6 * total + gid] = simd_shuffle_down(v, 4);
  out[7 * total + gid] = simd_shuffle(v, (lane * 7) % 32);
  out[8 * total + gid] = simd_broadcast_first(v);
  out[9 * total + gid] = simd_prefix_inclusive_sum(v);
}

// Sum of 256 values per threadgroup: SIMD sums, then 8 partial sums through threadgroup memory.
kernel void tg_reduce(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                      uint tid [[thread_index_in_threadgroup]],
                      uint tg [[threadgroup_position_in_grid]],
                      uint lane [[thread_index_in_simdgroup]],
                      uint sg [[simdgroup_index_in_threadgroup]],
                      uint nsg [[simdgroups_per_threadgroup]],
                      uint tpg [[threads_per_threadgroup]]) {
  threadgroup float partial[32];
  float v = simd_sum(x[tg * tpg + tid]);
  if (lane == 0) partial[sg] = v;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    float p = lane < nsg ? partial[lane] : 0.0f;
    p = simd_sum(p);
    if (lane == 0) out[tg] = p;
  }
}

// The same reduction with the barrier forgotten: simdgroup 0 reads partial sums not yet written.
kernel void tg_reduce_no_barrier(
    device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
    uint tid [[thread_index_in_threadgroup]], uint tg [[threadgroup_position_in_grid]],
    uint lane [[thread_index_in_simdgroup]], uint sg [[simdgroup_index_in_threadgroup]],
    uint nsg [[simdgroups_per_threadgroup]], uint tpg [[threads_per_threadgroup]]) {
  threadgroup float partial[32];
  float v = simd_sum(x[tg * tpg + tid]);
  if (lane == 0) partial[sg] = v;
  if (sg == 0) {
    float p = lane < nsg ? partial[lane] : 0.0f;
    p = simd_sum(p);
    if (lane == 0) out[tg] = p;
  }
}

// The same reduction with the partial sums in [[threadgroup(0)]] memory sized by the host.
kernel void tg_reduce_dynamic(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                              threadgroup float* partial [[threadgroup(0)]],
                              uint tid [[thread_index_in_threadgroup]],
                              uint tg [[threadgroup_position_in_grid]],
                              uint lane [[thread_index_in_simdgroup]],
                              uint sg [[simdgroup_index_in_threadgroup]],
                              uint nsg [[simdgroups_per_threadgroup]],
                              uint tpg [[threads_per_threadgroup]]) {
  float v = simd_sum(x[tg * tpg + tid]);
  if (lane == 0) partial[sg] = v;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    float p = lane < nsg ? partial[lane] : 0.0f;
    p = simd_sum(p);
    if (lane == 0) out[tg] = p;
  }
}

// Half of the threadgroup waits at one barrier, the other half at another.
kernel void divergent_barrier(device float* out [[buffer(0)]],
                              uint tid [[thread_index_in_threadgroup]]) {
  if (tid < 64) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  } else {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  out[tid] = 1.0f;
}

// Lanes 0-15 call simd_sum, lanes 16-31 simd_max: not the same SIMD-group call.
kernel void divergent_simd(device float* out [[buffer(0)]],
                           uint lane [[thread_index_in_simdgroup]]) {
  float v = float(lane);
  if (lane < 16) {
    v = simd_sum(v);
  } else {
    v = simd_max(v);
  }
  out[lane] = v;
}

// One element too far: the last thread reads past the end of `x`.
kernel void shift_left(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                       uint gid [[thread_position_in_grid]]) {
  out[gid] = x[gid + 1];
}

// Reads backwards from where `x` points: bound at an offset, as a negative-stride view is.
kernel void read_backwards(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                           uint gid [[thread_position_in_grid]]) {
  out[gid] = x[-int(gid)];
}

// Writes through a `constant` pointer's memory (cast away): read-only buffers stay read-only.
kernel void write_constant(constant float* x [[buffer(0)]], uint gid [[thread_position_in_grid]]) {
  const_cast<device float*>(x)[gid] = 0.0f;
}

// A kernel that never finishes (for the watchdog).
kernel void spin(device const uint* flag [[buffer(0)]], device uint* out [[buffer(1)]]) {
  uint i = 0;
  while (((volatile device const uint*)flag)[0] == 0u) ++i;
  out[0] = i;
}

// half and bfloat arithmetic: each operation rounds to the type, as on the GPU.
kernel void half_bfloat(device const half* ah [[buffer(0)]], device const half* bh [[buffer(1)]],
                        device half* outh [[buffer(2)]], device const bfloat* ab [[buffer(3)]],
                        device const bfloat* bb [[buffer(4)]], device bfloat* outb [[buffer(5)]],
                        device float* outf [[buffer(6)]], uint gid [[thread_position_in_grid]]) {
  half x = ah[gid], y = bh[gid];
  outh[gid] = x * y + x;
  bfloat p = ab[gid], q = bb[gid];
  outb[gid] = p * q + p;
  outf[gid] = float(p) * float(q) + static_cast<float>(x);
}

// float -> bfloat and float -> half conversions.
kernel void convert(device const float* x [[buffer(0)]], device half* h [[buffer(1)]],
                    device bfloat* b [[buffer(2)]], uint gid [[thread_position_in_grid]]) {
  h[gid] = static_cast<half>(x[gid]);
  b[gid] = static_cast<bfloat>(x[gid]);
}

// MSL sizes and alignments, as the kernel sees them.
kernel void type_sizes(device uint* out [[buffer(0)]]) {
  out[0] = sizeof(float3);
  out[1] = alignof(float3);
  out[2] = sizeof(half3);
  out[3] = sizeof(packed_float3);
  out[4] = sizeof(float2);
  out[5] = sizeof(uchar3);
  out[6] = sizeof(bfloat4);
  out[7] = sizeof(int4);
}

// Vectors: constructors, swizzles, element-wise arithmetic and math.
kernel void vectors(device const float4* x [[buffer(0)]], device float4* out [[buffer(1)]],
                    device float* dots [[buffer(2)]], uint gid [[thread_position_in_grid]]) {
  float4 v = x[gid];
  float4 r = float4(v.xy, v.w, 1.0f) * 2.0f + v.wzyx;
  r.xz = r.zx;
  r.y += dot(v, v);
  r.w = max(r.w, 0.5f) + clamp(v.x, 0.0f, 1.0f);
  out[gid] = r;
  dots[gid] = length(v.xyz) + exp(v.x) + select(0.0f, 1.0f, v.y > 0.5f);
}

// Atomics on device memory (float) and threadgroup memory (uint).
kernel void atomics(device atomic_float* total [[buffer(0)]], device uint* counts [[buffer(1)]],
                    device const float* x [[buffer(2)]], uint gid [[thread_position_in_grid]],
                    uint tid [[thread_index_in_threadgroup]],
                    uint tg [[threadgroup_position_in_grid]]) {
  threadgroup atomic_uint count;
  if (tid == 0) atomic_store_explicit(&count, 0u, memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  atomic_fetch_add_explicit(total, x[gid], memory_order_relaxed);
  if (x[gid] > 0.5f) atomic_fetch_add_explicit(&count, 1u, memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) counts[tg] = atomic_load_explicit(&count, memory_order_relaxed);
}

// Built-in values of a 2-D dispatchThreads with partial edge threadgroups.
kernel void positions(device uint4* out [[buffer(0)]], uint2 gid [[thread_position_in_grid]],
                      uint2 grid [[grid_size]], uint2 tpg [[threads_per_threadgroup]],
                      ushort2 lid [[thread_position_in_threadgroup]],
                      uint2 group [[threadgroup_position_in_grid]]) {
  out[gid.y * grid.x + gid.x] = uint4(lid.x, lid.y, tpg.x * 100 + tpg.y, group.x * 100 + group.y);
}

// A template kernel, instantiated under two host names.
template <typename T>
kernel void scale(device const T* x [[buffer(0)]], device T* out [[buffer(1)]],
                  constant float& s [[buffer(2)]], uint gid [[thread_position_in_grid]]) {
  out[gid] = static_cast<T>(float(x[gid]) * s);
}
template [[host_name("scale_float")]] [[kernel]] void scale<float>(device const float*,
                                                                   device float*, constant float&,
                                                                   uint);
template [[host_name("scale_half")]] [[kernel]] decltype(scale<half>) scale<half>;
