// Week 2 Day 4, task 2: the SwiGLU gate on the GPU, out = silu(gate) * up.
// One thread per output element; encode_swiglu (swiglu.cpp) binds the buffers.
#include <metal_stdlib>

using namespace metal;

// Compute in float whatever the storage type, round once on the store.
template <typename T>
inline T silu_times(T gate, T up) {
  float g = float(gate);
  return T(g / (1.0f + metal::exp(-g)) * float(up));
}

// Both inputs row-contiguous: element i of each is at index i.
template <typename T>
[[kernel]] void swiglu_contiguous(
    device const T* gate [[buffer(0)]],
    device const T* up [[buffer(1)]],
    device T* out [[buffer(2)]],
    constant uint& n [[buffer(3)]],
    uint i [[thread_position_in_grid]]) {
  if (i >= n) {
    return;
  }
  out[i] = silu_times(gate[i], up[i]);
}

// Any strides (in elements; 0 along broadcast axes, negative when flipped):
// turn the output's row-major index into each input's offset.
template <typename T>
[[kernel]] void swiglu_strided(
    device const T* gate [[buffer(0)]],
    device const T* up [[buffer(1)]],
    device T* out [[buffer(2)]],
    constant uint& n [[buffer(3)]],
    constant int& ndim [[buffer(4)]],
    constant int* shape [[buffer(5)]],
    constant int64_t* gate_strides [[buffer(6)]],
    constant int64_t* up_strides [[buffer(7)]],
    uint i [[thread_position_in_grid]]) {
  if (i >= n) {
    return;
  }
  int64_t g = 0;
  int64_t u = 0;
  uint rest = i;
  for (int axis = ndim - 1; axis >= 0; --axis) {
    uint extent = uint(shape[axis]);
    int64_t coord = int64_t(rest % extent);
    rest /= extent;
    g += coord * gate_strides[axis];
    u += coord * up_strides[axis];
  }
  out[i] = silu_times(gate[g], up[u]);
}

// clang-format off
#define instantiate_swiglu(type, contiguous_name, strided_name)            \
  template [[host_name(contiguous_name)]] [[kernel]] void                  \
  swiglu_contiguous<type>(                                                 \
      device const type* gate [[buffer(0)]],                               \
      device const type* up [[buffer(1)]],                                 \
      device type* out [[buffer(2)]],                                      \
      constant uint& n [[buffer(3)]],                                      \
      uint i [[thread_position_in_grid]]);                                 \
  template [[host_name(strided_name)]] [[kernel]] void                     \
  swiglu_strided<type>(                                                    \
      device const type* gate [[buffer(0)]],                               \
      device const type* up [[buffer(1)]],                                 \
      device type* out [[buffer(2)]],                                      \
      constant uint& n [[buffer(3)]],                                      \
      constant int& ndim [[buffer(4)]],                                    \
      constant int* shape [[buffer(5)]],                                   \
      constant int64_t* gate_strides [[buffer(6)]],                        \
      constant int64_t* up_strides [[buffer(7)]],                          \
      uint i [[thread_position_in_grid]]);

// Host names: swiglu_{contiguous,strided}_<dtype>, as encode_swiglu builds them.
instantiate_swiglu(float, "swiglu_contiguous_float32", "swiglu_strided_float32")
instantiate_swiglu(half, "swiglu_contiguous_float16", "swiglu_strided_float16")
instantiate_swiglu(bfloat, "swiglu_contiguous_bfloat16", "swiglu_strided_bfloat16")
// clang-format on
