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
