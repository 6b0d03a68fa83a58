// Week 2 Day 5: single-query (decode) attention over a contiguous KV cache,
// as an MLX primitive with a C++ kernel (CPU) and a Metal kernel (GPU).
#pragma once

#include <vector>

#include "encoder.h"
#include "mlx/array.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"
#include "recording_encoder.h"

namespace tiny_llm {

namespace mx = mlx::core;

// out[b, h] = softmax(scale * q[b, h] . key[b, kv(h), t]) over t < lengths[b],
// applied to value[b, kv(h), t], with kv(h) = h / (H_q / H_kv).
//   query [B, H_q, D], key and value [B, H_kv, S, D] (any strides), lengths
//   [B] int32 with 0 <= lengths[b] <= S; D is 64 or 128; float32, float16 or
//   bfloat16 (all three alike), accumulated in float32. Returns [B, H_q, D].
// Shapes and dtypes are checked here (ValueError / TypeError); the lengths are
// values, checked by the CPU kernel before it reads K/V (RuntimeError from
// mx.eval). A sequence of length 0 gets zeros.
mx::array decode_attention(
    const mx::array& query,
    const mx::array& key,
    const mx::array& value,
    const mx::array& lengths,
    float scale,
    mx::StreamOrDevice s = {});

// The CPU kernel (decode_attention_cpu.cpp): writes `out` (allocated,
// [B, H_q, D]) from evaluated inputs {query, key, value, lengths}. It runs in
// the task eval_cpu queues, and throws std::out_of_range, before reading any
// K/V, if a length lies outside [0, S].
void decode_attention_cpu(
    const mx::array& query,
    const mx::array& key,
    const mx::array& value,
    const mx::array& lengths,
    mx::array& out,
    float scale);

// The Metal dispatch for evaluated inputs {query, key, value, lengths}: what
// eval_gpu encodes on a Mac and plan_decode_attention records everywhere.
void encode_decode_attention(
    Encoder& encoder, const std::vector<mx::array>& inputs, float scale);

// The commands eval_gpu would encode for these arrays (evaluates them).
std::vector<Command> plan_decode_attention(
    const mx::array& query,
    const mx::array& key,
    const mx::array& value,
    const mx::array& lengths,
    float scale);

class DecodeAttention : public mx::UnaryPrimitive {
 public:
  DecodeAttention(mx::Stream stream, float scale)
      : mx::UnaryPrimitive(stream), scale_(scale) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override {
    return "DecodeAttention";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
  float scale() const {
    return scale_;
  }

 private:
  float scale_;
};

} // namespace tiny_llm
