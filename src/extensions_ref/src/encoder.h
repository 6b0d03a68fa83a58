// The encoder interface every GPU dispatch in this extension is written
// against.
//
// An op's dispatch code (which kernel, which buffer goes to which index, how
// many threads) is written once, as a function taking an `Encoder&`. Two
// encoders implement it:
//   - MetalEncoder (metal_encoder.h, macOS only) forwards every call to MLX's
//     metal::CommandEncoder: this is what eval_gpu runs on a Mac.
//   - RecordingEncoder (recording_encoder.h, everywhere) writes the calls down
//     as a plan; the `_plan_<op>` functions hand that plan to Python, where
//     tiny_llm_common.metal_dispatch runs it through the Metal-on-CPU harness.
// So Linux tests exercise the very dispatch code a Mac executes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace tiny_llm {

struct Size3 {
  size_t x = 1;
  size_t y = 1;
  size_t z = 1;
};

class Encoder {
 public:
  virtual ~Encoder() = default;

  // Select the kernel by its host name (the `[[host_name("...")]]` of its
  // instantiation in the .metal file). Must come before any set_* call.
  virtual void set_kernel(const std::string& name) = 0;
  // Bind inputs[input] / outputs[output] of the primitive to [[buffer(index)]].
  // The array's own offset into its buffer is applied, as MLX does.
  virtual void set_input(int input, int index) = 0;
  virtual void set_output(int output, int index) = 0;
  // Copy small constant data (sizes, strides, scalars) to [[buffer(index)]].
  virtual void set_bytes(const void* data, size_t nbytes, int index) = 0;
  // Size of the [[threadgroup(index)]] argument, in bytes.
  virtual void set_threadgroup_memory(size_t nbytes, int index) = 0;
  // `grid` counts threadgroups; `group` counts threads per threadgroup.
  virtual void dispatch_threadgroups(Size3 grid, Size3 group) = 0;
  // `threads` counts threads in the whole grid (the last group may be partial).
  virtual void dispatch_threads(Size3 threads, Size3 group) = 0;

  template <typename T>
  void set_value(const T& value, int index) {
    set_bytes(&value, sizeof(T), index);
  }

  // Metal rejects zero-length setBytes, so an empty vector sends one zero.
  template <typename T>
  void set_vector(const std::vector<T>& values, int index) {
    if (values.empty()) {
      T zero{};
      set_bytes(&zero, sizeof(T), index);
    } else {
      set_bytes(values.data(), values.size() * sizeof(T), index);
    }
  }
};

} // namespace tiny_llm
