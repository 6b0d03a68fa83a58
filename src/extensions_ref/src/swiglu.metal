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
#define instantiate_swiglu(name, type)                                     \
  template [[host_name("swiglu_contiguous_" #name)]] [[kernel]] void       \
  swiglu_contiguous<type>(                                                 \
      device const type* gate [[buffer(0)]],                               \
      device const type* up [[buffer(1)]],                                 \
      device type* out [[buffer(2)]],                                      \
      constant uint& n [[buffer(3)]],                                      \
      uint i [[thread_position_in_grid]]);                                 \
  template [[host_name("swiglu_strided_" #name)]] [[kernel]] void          \
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

instantiate_swiglu(float32, float)
instantiate_swiglu(float16, half)
instantiate_swiglu(bfloat16, bfloat)
    // clang-format on
