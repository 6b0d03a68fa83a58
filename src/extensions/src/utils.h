// Small helpers the ops share: dtype names and argument checks.
#pragma once

#include <cstdint>
#include <string>

#include "errors.h"
#include "mlx/array.h"
#include "mlx/utils.h"

namespace tiny_llm {

namespace mx = mlx::core;

// The suffix of a kernel's host name, e.g. "swiglu_contiguous_" + "float16".
inline std::string dtype_name(mx::Dtype dtype) {
  if (dtype == mx::float32) {
    return "float32";
  }
  if (dtype == mx::float16) {
    return "float16";
  }
  if (dtype == mx::bfloat16) {
    return "bfloat16";
  }
  throw TypeError("no kernel for this dtype");
}

inline bool is_kernel_float(mx::Dtype dtype) {
  return dtype == mx::float32 || dtype == mx::float16 || dtype == mx::bfloat16;
}

inline std::string describe(mx::Dtype dtype) {
  std::ostringstream os;
  os << dtype;
  return os.str();
}

inline std::string describe(const mx::Shape& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    s += (i ? ", " : "") + std::to_string(shape[i]);
  }
  return s + (shape.size() == 1 ? ",)" : ")");
}

// TypeError unless `a` is float32, float16 or bfloat16.
inline void check_float(const char* op, const char* arg, const mx::array& a) {
  if (!is_kernel_float(a.dtype())) {
    throw TypeError(
        std::string(op) + ": " + arg + " has dtype " + describe(a.dtype()) +
        "; expected float32, float16 or bfloat16");
  }
}

// Offset in elements of the `linear`-th element (row-major order) of a view.
inline int64_t strided_offset(
    size_t linear, const mx::Shape& shape, const mx::Strides& strides) {
  int64_t offset = 0;
  for (int i = static_cast<int>(shape.size()) - 1; i >= 0; --i) {
    size_t extent = static_cast<size_t>(shape[i]);
    offset += static_cast<int64_t>(linear % extent) * strides[i];
    linear /= extent;
  }
  return offset;
}

} // namespace tiny_llm
