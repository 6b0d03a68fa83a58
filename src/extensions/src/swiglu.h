// Week 2 Day 4: a fused SwiGLU gate, silu(gate) * up, as an MLX primitive.
#pragma once

#include <vector>

#include "encoder.h"
#include "mlx/array.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"
#include "recording_encoder.h"

namespace tiny_llm {

namespace mx = mlx::core;

// silu(gate) * up elementwise, computed in float32 and rounded once to the
// inputs' dtype. gate and up broadcast against each other like NumPy arrays
// and must share one of float32, float16, bfloat16.
mx::array swiglu(
    const mx::array& gate, const mx::array& up, mx::StreamOrDevice s = {});

// The Metal dispatch for evaluated inputs (already broadcast to one shape):
// what eval_gpu encodes on a Mac and plan_swiglu records everywhere.
void encode_swiglu(Encoder& encoder, const std::vector<mx::array>& inputs);

// The commands eval_gpu would encode for these arrays (evaluates them).
std::vector<Command> plan_swiglu(const mx::array& gate, const mx::array& up);

class Swiglu : public mx::UnaryPrimitive {
 public:
  explicit Swiglu(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override {
    return "Swiglu";
  }
  // No parameters: any two Swiglu nodes on the same inputs compute the same.
  bool is_equivalent(const mx::Primitive& other) const override;
  // Lets mx.compile(shapeless=True) re-infer shapes without evaluating.
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
};

} // namespace tiny_llm
