// Compiled only where MLX was built with Metal (the macOS wheels define
// _METAL_).
#ifdef _METAL_

#include "metal_encoder.h"

#include <dlfcn.h>

#include <filesystem>
#include <stdexcept>
#include <string>

#include "mlx/backend/metal/device.h"
#include "recording_encoder.h" // the shared limit checks

#ifndef TINY_LLM_EXT_NAME
#error "CMakeLists.txt defines TINY_LLM_EXT_NAME (the metallib's name)"
#endif

namespace tiny_llm {

namespace {

// build_ext.py puts <TINY_LLM_EXT_NAME>.metallib beside this module. MLX's own
// current_binary_dir() is not exported from libmlx, so ask the loader.
std::string metallib_path() {
  Dl_info info;
  if (dladdr(reinterpret_cast<const void*>(&metallib_path), &info) == 0 ||
      info.dli_fname == nullptr) {
    throw std::runtime_error("cannot locate the extension module on disk");
  }
  auto dir = std::filesystem::path(info.dli_fname).parent_path();
  return (dir / (std::string(TINY_LLM_EXT_NAME) + ".metallib")).string();
}

} // namespace

MetalEncoder::MetalEncoder(
    mlx::core::Stream stream,
    const std::vector<mlx::core::array>& inputs,
    std::vector<mlx::core::array>& outputs)
    : device_(mlx::core::metal::device(stream.device)),
      encoder_(mlx::core::metal::get_command_encoder(stream)),
      inputs_(inputs),
      outputs_(outputs) {}

void MetalEncoder::set_kernel(const std::string& name) {
  MTL::ComputePipelineState* kernel = nullptr;
  std::string path;
  try {
    path = metallib_path();
    auto* library = device_.get_library(TINY_LLM_EXT_NAME, path);
    kernel = device_.get_kernel(name, library);
  } catch (const std::exception& e) {
    // A missing metallib or kernel must be an exception, not a crash.
    throw std::runtime_error(
        "Metal kernel '" + name + "' is not available from " + path +
        " (rebuild the extension: `pdm run build-ext` or `pdm run "
        "build-ext-ref`): " +
        e.what());
  }
  encoder_.set_compute_pipeline_state(kernel);
  has_kernel_ = true;
}

static void require_kernel(bool has_kernel, const char* call) {
  if (!has_kernel) {
    throw std::logic_error(
        std::string(call) + " before set_kernel: select the kernel first");
  }
}

void MetalEncoder::set_input(int input, int index) {
  require_kernel(has_kernel_, "set_input");
  check_buffer_index(index, "set_input");
  encoder_.set_input_array(inputs_.at(input), index);
}

void MetalEncoder::set_output(int output, int index) {
  require_kernel(has_kernel_, "set_output");
  check_buffer_index(index, "set_output");
  encoder_.set_output_array(outputs_.at(output), index);
}

void MetalEncoder::set_bytes(const void* data, size_t nbytes, int index) {
  require_kernel(has_kernel_, "set_bytes");
  check_buffer_index(index, "set_bytes");
  if (nbytes == 0 || nbytes > 4096) {
    throw std::invalid_argument("set_bytes: Metal's setBytes takes 1..4096");
  }
  encoder_.set_bytes(
      static_cast<const uint8_t*>(data), static_cast<int>(nbytes), index);
}

void MetalEncoder::set_threadgroup_memory(size_t nbytes, int index) {
  require_kernel(has_kernel_, "set_threadgroup_memory");
  check_buffer_index(index, "set_threadgroup_memory");
  check_threadgroup_memory(nbytes);
  encoder_.set_threadgroup_memory_length(nbytes, index);
}

void MetalEncoder::dispatch_threadgroups(Size3 grid, Size3 group) {
  require_kernel(has_kernel_, "dispatch_threadgroups");
  check_group_size(group);
  encoder_.dispatch_threadgroups(
      MTL::Size(grid.x, grid.y, grid.z), MTL::Size(group.x, group.y, group.z));
}

void MetalEncoder::dispatch_threads(Size3 threads, Size3 group) {
  require_kernel(has_kernel_, "dispatch_threads");
  check_group_size(group);
  encoder_.dispatch_threads(
      MTL::Size(threads.x, threads.y, threads.z),
      MTL::Size(group.x, group.y, group.z));
}

} // namespace tiny_llm

#endif // _METAL_
