// Week 3 Day 9: PagedAttention over a quantized pool, as an MLX primitive
// with a CPU kernel and a Metal kernel that dequantize each row as they read
// it (no float copy of the pool is ever made).
//
// Layouts (Day 2's, with each row of D numbers stored as codes + per-group
// scale and bias; tiny_llm_ref/quantized_kv_cache.py writes them):
//   query        [B, H_q, D]                 float32, float16 or bfloat16
//   *_codes      [num_blocks, block_size, H_kv, D * bits / 8]  uint8; 4-bit:
//                element 2i in the low nibble of byte i, 2i + 1 in the high
//   *_scales     [num_blocks, block_size, H_kv, D / group_size]  float16
//   *_biases     likewise; element i = code_i * scale + bias of its group
//   block_tables [B, max_blocks] int32 (padded with -1), context_lens [B]
#pragma once

#include <vector>

#include "encoder.h"
#include "mlx/array.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"
#include "paged_attention_quantized_params.h"
#include "recording_encoder.h"

namespace tiny_llm {

namespace mx = mlx::core;

// out[b, h] = softmax(scale * q[b, h] . K_b^T) V_b, where K_b and V_b are the
// dequantized keys and values of the context_lens[b] tokens block_tables[b]
// points at; query head h reads KV head h / (H_q / H_kv). bits 4 or 8,
// group_size 32 or 64, head dim 64 or 128. Raises TypeError/ValueError for bad
// arguments before any node is built; block ids and lengths are checked as
// paged_attention checks them (now when already evaluated, else by the CPU
// task before it reads the pool; NaN on the GPU).
mx::array paged_attention_quantized(
    const mx::array& query,
    const mx::array& key_codes,
    const mx::array& key_scales,
    const mx::array& key_biases,
    const mx::array& value_codes,
    const mx::array& value_scales,
    const mx::array& value_biases,
    const mx::array& block_tables,
    const mx::array& context_lens,
    float scale,
    int bits,
    int group_size,
    mx::StreamOrDevice s = {});

// The CPU kernel (paged_attention_quantized_cpu.cpp). It runs inside the task
// eval_cpu queues: inputs computed and row-major, values already checked,
// output allocated. inputs as the primitive's, in the order of the op.
void paged_attention_quantized_cpu(
    const std::vector<mx::array>& inputs,
    mx::array& out,
    float scale,
    int bits,
    int group_size);

// The Metal dispatch (written once; run by eval_gpu and recorded).
void encode_paged_attention_quantized(
    Encoder& encoder,
    const std::vector<mx::array>& inputs,
    const PagedAttentionQuantizedParams& params,
    int bits);

// The commands eval_gpu would encode (evaluates the inputs).
std::vector<Command> plan_paged_attention_quantized(
    const mx::array& query,
    const mx::array& key_codes,
    const mx::array& key_scales,
    const mx::array& key_biases,
    const mx::array& value_codes,
    const mx::array& value_scales,
    const mx::array& value_biases,
    const mx::array& block_tables,
    const mx::array& context_lens,
    float scale,
    int bits,
    int group_size);

// inputs: query, key codes/scales/biases, value codes/scales/biases,
// block_tables, context_lens.
class PagedAttentionQuantized : public mx::UnaryPrimitive {
 public:
  PagedAttentionQuantized(
      mx::Stream stream, float scale, int bits, int group_size)
      : mx::UnaryPrimitive(stream),
        scale_(scale),
        bits_(bits),
        group_size_(group_size) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override {
    return "PagedAttentionQuantized";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  float scale_;
  int bits_;
  int group_size_;
};

} // namespace tiny_llm
