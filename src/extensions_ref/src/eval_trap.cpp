#include "eval_trap.h"

#include <cmath>
#include <stdexcept>

#include "mlx/allocator.h"

namespace tiny_llm {

mx::array swiglu_synchronous(const mx::array& gate, const mx::array& up) {
  if (gate.dtype() != mx::float32 || up.dtype() != mx::float32 ||
      gate.shape() != up.shape()) {
    throw std::invalid_argument(
        "_swiglu_synchronous: float32 inputs of one shape only");
  }
  auto stream = mx::to_stream(mx::Device(mx::Device::cpu));
  return mx::array(
      gate.shape(),
      mx::float32,
      std::make_shared<SwigluSynchronous>(stream),
      {gate, up});
}

void SwigluSynchronous::eval_cpu(
    const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  // WRONG on purpose: this runs while MLX walks the graph, before the tasks
  // that compute `inputs` have run, so it reads whatever their freshly
  // allocated buffers hold.
  const mx::array& gate = inputs[0];
  const mx::array& up = inputs[1];
  bool contiguous = gate.flags().row_contiguous && up.flags().row_contiguous;
  if (!contiguous) {
    throw std::invalid_argument("_swiglu_synchronous: contiguous inputs only");
  }
  const float* g = gate.data<float>();
  const float* u = up.data<float>();
  float* o = out.data<float>();
  for (size_t i = 0; i < out.size(); ++i) {
    o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}

} // namespace tiny_llm
