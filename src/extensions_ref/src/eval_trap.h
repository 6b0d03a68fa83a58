// A deliberately wrong primitive for the book and tests_refsol: it computes
// inside eval_cpu instead of queueing the work (see swiglu.cpp for the right
// way). Reference extension only.
#pragma once

#include "swiglu.h"

namespace tiny_llm {

class SwigluSynchronous : public Swiglu {
 public:
  using Swiglu::Swiglu;
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "SwigluSynchronous";
  }
};

// Like swiglu() for float32 inputs of one shape, but evaluated synchronously.
mx::array swiglu_synchronous(const mx::array& gate, const mx::array& up);

} // namespace tiny_llm
