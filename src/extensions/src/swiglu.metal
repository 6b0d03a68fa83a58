// Week 2 Day 4, task 2: the SwiGLU gate on the GPU, out = silu(gate) * up.
// One thread per output element; encode_swiglu (swiglu.cpp) binds the buffers.
#include <metal_stdlib>

using namespace metal;

// Both inputs row-contiguous: element i of each is at index i.
template <typename T>
[[kernel]] void swiglu_contiguous(
    device const T* gate [[buffer(0)]],
    device const T* up [[buffer(1)]],
    device T* out [[buffer(2)]],
    constant uint& n [[buffer(3)]],
    uint i [[thread_position_in_grid]]) {
  // TODO(Week 2 Day 4, task 2): out[i] = silu(gate[i]) * up[i], computed in
  // float and rounded once to T. The grid may be larger than n.
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
  // TODO(Week 2 Day 4, task 2): split i into coordinates (last axis fastest),
  // find the element of gate and of up from their strides, and write
  // out[i] = silu(gate) * up.
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
