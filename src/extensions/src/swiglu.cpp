#include "swiglu.h"

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

void Swiglu::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  // TODO(Week 2 Day 4, task 1):
  // - allocate the output: out.set_data(mx::allocator::malloc(out.nbytes()));
  // - get mx::cpu::get_command_encoder(stream()), register the inputs and the
  //   output with it, and queue the loop with encoder.dispatch([...] { ... }).
  //   Do not compute here: eval_cpu runs before the inputs are computed.
  //   Capture the arrays with mx::array::unsafe_weak_copy(...).
  // - in the loop: out = silu(gate) * up, computed in float, for float32,
  //   float16 (mx::float16_t) and bfloat16 (mx::bfloat16_t). Inputs may be
  //   strided (transposed, sliced, broadcast with stride 0): data<T>() points
  //   at the first element, strides() are in elements; strided_offset() in
  //   utils.h maps a row-major index to an offset.
  (void)inputs;
  (void)out;
  throw NotImplemented(
      "Week 2 Day 4, task 1: implement `Swiglu::eval_cpu` in "
      "src/extensions/src/swiglu.cpp");
}

// ---------------------------------------------------------------------------
// Week 2 Day 4, task 3: the Metal dispatch of the kernels in swiglu.metal.
// Buffers: 0 gate, 1 up, 2 out, 3 n (uint); the strided kernel also takes
// 4 ndim (int), 5 shape (int[ndim]), 6 gate strides, 7 up strides
// (int64_t[ndim], in elements).
// ---------------------------------------------------------------------------

void encode_swiglu(Encoder& encoder, const std::vector<mx::array>& inputs) {
  // TODO(Week 2 Day 4, task 3), against the Encoder interface (encoder.h):
  // - nothing to do for an empty array (Metal rejects empty grids);
  // - pick "swiglu_contiguous_<dtype>" when both inputs are row-contiguous,
  //   else "swiglu_strided_<dtype>" (dtype_name() in utils.h);
  // - bind inputs 0 and 1, output 0 and the constants to the buffer indices
  //   above (set_input, set_output, set_value, set_vector);
  // - one thread per element: dispatch_threads with at most 256 threads per
  //   threadgroup.
  (void)encoder;
  (void)inputs;
  throw NotImplemented(
      "Week 2 Day 4, task 3: implement `encode_swiglu` in "
      "src/extensions/src/swiglu.cpp");
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
