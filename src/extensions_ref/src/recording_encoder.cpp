#include "recording_encoder.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

namespace tiny_llm {

namespace {
// Metal's limits: 31 buffer slots per kernel, setBytes up to 4 KiB, at most
// 1024 threads per threadgroup on every Apple GPU.
constexpr int kMaxBufferIndex = 30;
constexpr size_t kMaxSetBytes = 4096;
constexpr size_t kMaxThreadsPerGroup = 1024;
constexpr size_t kMaxThreadgroupMemory = 32768;
} // namespace

void check_buffer_index(int index, const char* what) {
  if (index < 0 || index > kMaxBufferIndex) {
    throw std::out_of_range(
        std::string(what) + ": buffer index " + std::to_string(index) +
        " is outside Metal's [[buffer(0..30)]]");
  }
}

void check_group_size(Size3 group) {
  size_t n = group.x * group.y * group.z;
  if (n == 0 || n > kMaxThreadsPerGroup) {
    throw std::invalid_argument(
        "dispatch: " + std::to_string(n) +
        " threads per threadgroup (must be 1..1024)");
  }
}

void check_threadgroup_memory(size_t nbytes) {
  // setThreadgroupMemoryLength wants a multiple of 16 bytes, at most 32 KiB.
  if (nbytes == 0 || nbytes % 16 != 0 || nbytes > kMaxThreadgroupMemory) {
    throw std::invalid_argument(
        "set_threadgroup_memory: " + std::to_string(nbytes) +
        " bytes (must be a multiple of 16, at most 32768)");
  }
}

// The bytes of `a`'s buffer from its start through the last byte a reaches.
static std::shared_ptr<const std::vector<uint8_t>> memory_of(
    const mlx::core::array& a) {
  auto memory = std::make_shared<std::vector<uint8_t>>();
  if (a.size() == 0) {
    return memory;
  }
  int64_t last = 0; // element offset of the farthest element past data()
  for (size_t i = 0; i < a.ndim(); ++i) {
    last += std::max<int64_t>(0, int64_t(a.shape(i) - 1) * a.strides()[i]);
  }
  const uint8_t* begin = a.data<uint8_t>() - a.offset();
  size_t end = a.offset() + (last + 1) * a.itemsize();
  memory->assign(begin, begin + end);
  return memory;
}

RecordingEncoder::RecordingEncoder(
    const std::vector<mlx::core::array>& inputs,
    const std::vector<mlx::core::array>& outputs) {
  for (auto& a : inputs) {
    input_offsets_.push_back(a.offset());
    input_memory_.push_back(memory_of(a));
  }
  // Outputs are allocated fresh by eval_gpu, so they start at offset 0.
  output_offsets_.assign(outputs.size(), 0);
}

void RecordingEncoder::set_kernel(const std::string& name) {
  current_.kernel = name;
  has_kernel_ = true;
}

static void require_kernel(bool has_kernel, const char* call) {
  if (!has_kernel) {
    throw std::logic_error(
        std::string(call) + " before set_kernel: select the kernel first");
  }
}

void RecordingEncoder::set_input(int input, int index) {
  require_kernel(has_kernel_, "set_input");
  check_buffer_index(index, "set_input");
  if (input < 0 || input >= static_cast<int>(input_offsets_.size())) {
    throw std::out_of_range(
        "set_input: the primitive has no input " + std::to_string(input));
  }
  current_.buffers[index] = Binding{
      Binding::Kind::Input,
      input,
      input_offsets_[input],
      {},
      input_memory_[input]};
}

void RecordingEncoder::set_output(int output, int index) {
  require_kernel(has_kernel_, "set_output");
  check_buffer_index(index, "set_output");
  if (output < 0 || output >= static_cast<int>(output_offsets_.size())) {
    throw std::out_of_range(
        "set_output: the primitive has no output " + std::to_string(output));
  }
  current_.buffers[index] =
      Binding{Binding::Kind::Output, output, output_offsets_[output], {}};
}

void RecordingEncoder::set_bytes(const void* data, size_t nbytes, int index) {
  require_kernel(has_kernel_, "set_bytes");
  check_buffer_index(index, "set_bytes");
  if (nbytes == 0 || nbytes > kMaxSetBytes) {
    throw std::invalid_argument(
        "set_bytes: " + std::to_string(nbytes) +
        " bytes (Metal's setBytes takes 1..4096)");
  }
  Binding b{Binding::Kind::Bytes, -1, 0, std::vector<uint8_t>(nbytes)};
  std::memcpy(b.bytes.data(), data, nbytes);
  current_.buffers[index] = std::move(b);
}

void RecordingEncoder::set_threadgroup_memory(size_t nbytes, int index) {
  require_kernel(has_kernel_, "set_threadgroup_memory");
  check_buffer_index(index, "set_threadgroup_memory");
  check_threadgroup_memory(nbytes);
  current_.threadgroup_memory[index] = nbytes;
}

void RecordingEncoder::dispatch(Size3 grid, Size3 group, bool per_thread) {
  require_kernel(has_kernel_, "dispatch");
  check_group_size(group);
  Command c = current_;
  c.grid = grid;
  c.group = group;
  c.per_thread = per_thread;
  commands_.push_back(std::move(c));
}

void RecordingEncoder::dispatch_threadgroups(Size3 grid, Size3 group) {
  dispatch(grid, group, false);
}

void RecordingEncoder::dispatch_threads(Size3 threads, Size3 group) {
  dispatch(threads, group, true);
}

} // namespace tiny_llm
