// An Encoder that records commands instead of running them (every platform).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "encoder.h"
#include "mlx/array.h"

namespace tiny_llm {

struct Binding {
  enum class Kind { Input, Output, Bytes };
  Kind kind = Kind::Bytes;
  int array = -1;     // Input/Output: index into the primitive's inputs/outputs
  int64_t offset = 0; // Input/Output: byte offset of the array in its buffer
  std::vector<uint8_t> bytes; // Bytes: the data
  // Input: the array's memory, from the start of its buffer through its last
  // element, so the plan can be replayed without knowing how MLX laid it out.
  std::shared_ptr<const std::vector<uint8_t>> memory;
};

struct Command {
  std::string kernel;
  bool per_thread = false; // dispatch_threads (true) or dispatch_threadgroups
  Size3 grid;              // threadgroups, or threads when per_thread
  Size3 group;             // threads per threadgroup
  std::map<int, Binding> buffers;
  std::map<int, size_t> threadgroup_memory;
};

class RecordingEncoder : public Encoder {
 public:
  RecordingEncoder(
      const std::vector<mlx::core::array>& inputs,
      const std::vector<mlx::core::array>& outputs);

  void set_kernel(const std::string& name) override;
  void set_input(int input, int index) override;
  void set_output(int output, int index) override;
  void set_bytes(const void* data, size_t nbytes, int index) override;
  void set_threadgroup_memory(size_t nbytes, int index) override;
  void dispatch_threadgroups(Size3 grid, Size3 group) override;
  void dispatch_threads(Size3 threads, Size3 group) override;

  const std::vector<Command>& commands() const {
    return commands_;
  }

 private:
  void dispatch(Size3 grid, Size3 group, bool per_thread);

  std::vector<int64_t> input_offsets_;
  std::vector<std::shared_ptr<const std::vector<uint8_t>>> input_memory_;
  std::vector<int64_t> output_offsets_;
  // Bound state persists across dispatches, as on a MTLComputeCommandEncoder.
  Command current_;
  bool has_kernel_ = false;
  std::vector<Command> commands_;
};

// The checks both encoders apply, so a plan that passes here is legal Metal.
void check_buffer_index(int index, const char* what);
void check_group_size(Size3 group);
void check_threadgroup_memory(size_t nbytes);

} // namespace tiny_llm
