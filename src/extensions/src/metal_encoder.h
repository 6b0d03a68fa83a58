// An Encoder that forwards to MLX's Metal command encoder (macOS builds only).
#pragma once

#ifdef _METAL_

#include <vector>

#include "encoder.h"
#include "mlx/array.h"
#include "mlx/stream.h"

namespace mlx::core::metal {
class CommandEncoder;
class Device;
} // namespace mlx::core::metal

namespace tiny_llm {

class MetalEncoder : public Encoder {
 public:
  // `outputs` must already have their data allocated (eval_gpu does that).
  MetalEncoder(
      mlx::core::Stream stream,
      const std::vector<mlx::core::array>& inputs,
      std::vector<mlx::core::array>& outputs);

  void set_kernel(const std::string& name) override;
  void set_input(int input, int index) override;
  void set_output(int output, int index) override;
  void set_bytes(const void* data, size_t nbytes, int index) override;
  void set_threadgroup_memory(size_t nbytes, int index) override;
  void dispatch_threadgroups(Size3 grid, Size3 group) override;
  void dispatch_threads(Size3 threads, Size3 group) override;

 private:
  mlx::core::metal::Device& device_;
  mlx::core::metal::CommandEncoder& encoder_;
  const std::vector<mlx::core::array>& inputs_;
  std::vector<mlx::core::array>& outputs_;
  bool has_kernel_ = false;
};

} // namespace tiny_llm

#endif // _METAL_
