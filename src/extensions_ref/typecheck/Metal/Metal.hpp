// A stand-in for Apple's metal-cpp, for Linux only: just enough declarations
// for MLX's mlx/backend/metal/device.h to parse, so that the extension's Metal
// host code (compiled only under _METAL_) can be type-checked with `c++
// -fsyntax-only -D_METAL_` against MLX's real headers. Never linked or run.
// Used by tests_refsol/test_course_extension.py.
#pragma once

#include <cstddef>
#include <cstdint>

namespace NS {
using UInteger = unsigned long;
template <class T>
struct SharedPtr {
  T* get() const {
    return nullptr;
  }
  T* operator->() const {
    return nullptr;
  }
  explicit operator bool() const {
    return false;
  }
};
struct AutoreleasePool {};
struct String {};
struct Error {};
struct Object {};
} // namespace NS

namespace MTL {
struct Size {
  Size(NS::UInteger w, NS::UInteger h, NS::UInteger d)
      : width(w), height(h), depth(d) {}
  NS::UInteger width, height, depth;
};
enum class DataType { Float };
struct Resource {};
struct Allocation {};
struct Buffer : Resource {};
struct ComputePipelineState {};
struct Library {};
struct Function {};
struct LinkedFunctions {};
struct CommandQueue {};
struct CommandBuffer {};
struct Fence {};
struct ResidencySet {};
struct Device {};
struct ComputeCommandEncoder {
  void setComputePipelineState(ComputePipelineState*) {}
  void setBytes(const void*, NS::UInteger, NS::UInteger) {}
  void setThreadgroupMemoryLength(NS::UInteger, NS::UInteger) {}
};
} // namespace MTL
