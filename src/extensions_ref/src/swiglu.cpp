#include "swiglu.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <typeinfo>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/transforms.h"
#include "utils.h"

#ifdef _METAL_
#include "metal_encoder.h"
#endif

namespace tiny_llm {

// ---------------------------------------------------------------------------
// The op: checks the arguments, then adds one Swiglu node to the graph.
// Nothing is computed here; MLX calls eval_cpu/eval_gpu later, when the
// result is needed.
// ---------------------------------------------------------------------------

mx::array swiglu(
    const mx::array& gate,
    const mx::array& up,
    mx::StreamOrDevice s /* = {} */) {
  check_float("swiglu", "gate", gate);
  check_float("swiglu", "up", up);
  if (gate.dtype() != up.dtype()) {
    throw TypeError(
        "swiglu: gate is " + describe(gate.dtype()) + " but up is " +
        describe(up.dtype()) + "; cast one of them so the dtypes match");
  }
  mx::Shape shape;
  try {
    shape = mx::broadcast_shapes(gate.shape(), up.shape());
  } catch (const std::invalid_argument&) {
    throw std::invalid_argument(
        "swiglu: gate " + describe(gate.shape()) + " and up " +
        describe(up.shape()) + " do not broadcast to one shape");
  }
  auto stream = mx::to_stream(s);
  // Broadcasting only makes views (stride 0 along the new axes): the kernels
  // read strided inputs directly, so no copy is made.
  auto inputs = mx::broadcast_arrays({gate, up}, stream);
  return mx::array(
      shape, gate.dtype(), std::make_shared<Swiglu>(stream), std::move(inputs));
}

bool Swiglu::is_equivalent(const mx::Primitive& other) const {
  return typeid(other) == typeid(*this);
}

// ---------------------------------------------------------------------------
// Week 2 Day 4, task 1: the CPU kernel.
// ---------------------------------------------------------------------------

namespace {

template <typename T>
inline T silu_times(T gate, T up) {
  float g = static_cast<float>(gate);
  return static_cast<T>(g / (1.0f + std::exp(-g)) * static_cast<float>(up));
}

template <typename T>
void swiglu_cpu(const mx::array& gate, const mx::array& up, mx::array& out) {
  // data<T>() already points at the view's first element (offset applied).
  const T* g = gate.data<T>();
  const T* u = up.data<T>();
  T* o = out.data<T>();
  size_t n = out.size();
  if (gate.flags().row_contiguous && up.flags().row_contiguous) {
    for (size_t i = 0; i < n; ++i) {
      o[i] = silu_times(g[i], u[i]);
    }
    return;
  }
  // Transposed, sliced or broadcast inputs: walk the output row by row along
  // the last axis; strides are in elements and may be 0 or negative.
  if (n == 0) {
    return;
  }
  const auto& shape = out.shape();
  size_t inner = shape.back();
  int64_t g_step = gate.strides().back();
  int64_t u_step = up.strides().back();
  for (size_t row = 0; row < n / inner; ++row) {
    const T* g_row = g + strided_offset(row * inner, shape, gate.strides());
    const T* u_row = u + strided_offset(row * inner, shape, up.strides());
    T* o_row = o + row * inner;
    for (size_t j = 0; j < inner; ++j) {
      o_row[j] = silu_times(g_row[j * g_step], u_row[j * u_step]);
    }
  }
}

} // namespace

void Swiglu::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  // eval_cpu runs while the graph is being walked: the inputs may not have
  // been computed yet. So only allocate and describe the work here, and queue
  // the loop on the stream's encoder, which runs it after the tasks that
  // produce the inputs.
  auto& gate = inputs[0];
  auto& up = inputs[1];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(gate);
  encoder.set_input_array(up);
  encoder.set_output_array(out);
  encoder.dispatch([gate = mx::array::unsafe_weak_copy(gate),
                    up = mx::array::unsafe_weak_copy(up),
                    out = mx::array::unsafe_weak_copy(out)]() mutable {
    switch (out.dtype()) {
      case mx::float32:
        swiglu_cpu<float>(gate, up, out);
        break;
      case mx::float16:
        swiglu_cpu<mx::float16_t>(gate, up, out);
        break;
      case mx::bfloat16:
        swiglu_cpu<mx::bfloat16_t>(gate, up, out);
        break;
      default:
        throw std::runtime_error("swiglu: unsupported dtype");
    }
  });
}

// ---------------------------------------------------------------------------
// Week 2 Day 4, task 3: the Metal dispatch of the kernels in swiglu.metal.
// Buffers: 0 gate, 1 up, 2 out, 3 n (uint); the strided kernel also takes
// 4 ndim (int), 5 shape (int[ndim]), 6 gate strides, 7 up strides
// (int64_t[ndim], in elements).
// ---------------------------------------------------------------------------

void encode_swiglu(Encoder& encoder, const std::vector<mx::array>& inputs) {
  const auto& gate = inputs[0];
  const auto& up = inputs[1];
  size_t n = gate.size();
  if (n == 0) {
    return; // Metal rejects empty grids; there is nothing to compute.
  }
  if (n > std::numeric_limits<uint32_t>::max()) {
    throw std::invalid_argument("swiglu: more than 2^32 - 1 elements");
  }
  bool contiguous = gate.flags().row_contiguous && up.flags().row_contiguous;
  encoder.set_kernel(
      std::string(contiguous ? "swiglu_contiguous_" : "swiglu_strided_") +
      dtype_name(gate.dtype()));
  encoder.set_input(0, 0);
  encoder.set_input(1, 1);
  encoder.set_output(0, 2);
  encoder.set_value(static_cast<uint32_t>(n), 3);
  if (!contiguous) {
    std::vector<int32_t> shape(gate.shape().begin(), gate.shape().end());
    std::vector<int64_t> g_strides(
        gate.strides().begin(), gate.strides().end());
    std::vector<int64_t> u_strides(up.strides().begin(), up.strides().end());
    encoder.set_value(static_cast<int32_t>(gate.ndim()), 4);
    encoder.set_vector(shape, 5);
    encoder.set_vector(g_strides, 6);
    encoder.set_vector(u_strides, 7);
  }
  // One thread per element; the last threadgroup may be partial.
  encoder.dispatch_threads({n, 1, 1}, {std::min<size_t>(n, 256), 1, 1});
}

// ---------------------------------------------------------------------------
// Provided: eval_gpu and the recorded plan both run encode_swiglu.
// ---------------------------------------------------------------------------

void Swiglu::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
#ifdef _METAL_
  out.set_data(mx::allocator::malloc(out.nbytes()));
  std::vector<mx::array> outputs{out};
  MetalEncoder encoder(stream(), inputs, outputs);
  encode_swiglu(encoder, inputs);
#else
  (void)inputs;
  (void)out;
  throw std::runtime_error(
      "swiglu: this MLX build has no Metal back-end; run it on the CPU stream");
#endif
}

std::vector<Command> plan_swiglu(const mx::array& gate, const mx::array& up) {
  // Build the node exactly as swiglu() does, then evaluate its (broadcast)
  // inputs so their strides and offsets are known, as they are in eval_gpu.
  auto out = swiglu(gate, up, mx::Device(mx::Device::cpu));
  auto inputs = out.inputs();
  mx::eval(inputs);
  RecordingEncoder encoder(inputs, {out});
  encode_swiglu(encoder, inputs);
  return encoder.commands();
}

} // namespace tiny_llm
